"""Streaming voice activity detection: Silero VAD (the TorchScript model shipped inside the `silero-vad` wheel, no
download) over a live stream of pcm16 at any rate, reporting where speech starts and stops.

Ray-free and blocking (one 32 ms frame costs ~1 ms of CPU): an async caller runs `SpeechDetector.feed` off its
event loop (`asyncio.to_thread`). Each detector has its own model instance, as the model keeps the stream's
recurrent state between frames.

The decision is Silero's own streaming rule (its VADIterator): speech starts at the first frame whose speech
probability reaches `threshold`; it stops once the probability has stayed below `threshold - 0.15` for
`silence_ms` (the stop time is where that silence began). Times are milliseconds of audio fed so far.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

RATE = 16000  # the model's rate
FRAME = 512  # samples per model call at 16 kHz (32 ms), the size the model takes
FRAME_MS = FRAME * 1000 / RATE
HYSTERESIS = 0.15  # Silero's: speech ends below threshold - 0.15


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    silence_ms: int = 500


@dataclass(frozen=True)
class SpeechEvent:
    kind: str  # "start" | "stop"
    ms: int  # milliseconds of audio since the detector's first sample


def model_path() -> Path:
    """The TorchScript model inside the installed silero-vad package (found without importing the package, whose
    import sets torch's global thread count)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise RuntimeError("server VAD needs the silero-vad package (pip install silero-vad --no-deps)")
    return Path(spec.origin).parent / "data" / "silero_vad.jit"


def load_model():
    import torch

    model = torch.jit.load(str(model_path()), map_location="cpu")
    model.eval()
    return model


class SpeechDetector:
    """Feed pcm16 (or float) samples at `rate`; get speech start / stop events with their times."""

    def __init__(self, params: VadParams = VadParams(), rate: int = RATE, model=None):
        self.params = params
        self.model = model if model is not None else load_model()
        self.model.reset_states()
        self.resampler = soxr.ResampleStream(rate, RATE, 1, dtype="float32") if rate != RATE else None
        self.pending = np.zeros(0, np.float32)  # 16 kHz samples not yet a whole frame
        self.frames = 0  # frames judged
        self.speaking = False
        self.silence_from: int | None = None  # frame where the current run of silence began (while speaking)
        self.last_probability = 0.0

    @property
    def ms(self) -> int:
        """Audio judged so far, in milliseconds."""
        return int(self.frames * FRAME_MS)

    def feed(self, samples: np.ndarray | bytes) -> list[SpeechEvent]:
        """More audio (int16 pcm bytes / array, or float32 in [-1, 1]); the events it completes."""
        if isinstance(samples, (bytes, bytearray, memoryview)):
            samples = np.frombuffer(samples, "<i2")
        audio = samples.astype(np.float32) / 32768.0 if samples.dtype == np.int16 else samples.astype(np.float32)
        if self.resampler is not None:
            audio = self.resampler.resample_chunk(audio)
        self.pending = np.concatenate([self.pending, audio])
        whole = len(self.pending) // FRAME * FRAME
        frames, self.pending = self.pending[:whole].reshape(-1, FRAME), self.pending[whole:]
        events = []
        for frame in frames:
            event = self._judge(frame)
            if event is not None:
                events.append(event)
        return events

    def _judge(self, frame: np.ndarray) -> SpeechEvent | None:
        import torch

        with torch.inference_mode():
            probability = float(self.model(torch.from_numpy(np.ascontiguousarray(frame)), RATE))
        self.last_probability = probability
        index, self.frames = self.frames, self.frames + 1
        threshold = self.params.threshold
        if probability >= threshold:
            self.silence_from = None
            if not self.speaking:
                self.speaking = True
                return SpeechEvent("start", int(index * FRAME_MS))
            return None
        if self.speaking and probability < threshold - HYSTERESIS:
            if self.silence_from is None:
                self.silence_from = index
            if (self.frames - self.silence_from) * FRAME_MS >= self.params.silence_ms:
                self.speaking, stop, self.silence_from = False, self.silence_from, None
                return SpeechEvent("stop", int(stop * FRAME_MS))
        return None

    def reset(self) -> None:
        """Forget the stream (the model's state too): the next sample is time 0 again."""
        self.model.reset_states()
        self.pending = np.zeros(0, np.float32)
        self.frames, self.speaking, self.silence_from = 0, False, None
