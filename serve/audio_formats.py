"""PCM float32 -> the response formats: wav, pcm (raw 16-bit little-endian), flac, and the lossy mp3 / opus
that libsndfile (>= 1.1, in soundfile's wheels) encodes.

Rates: wav / flac / mp3 carry the decoder's rate in their headers (22.05 kHz). Headerless pcm is at OpenAI's
24 kHz wherever OpenAI sends pcm (speech `pcm`, chat `pcm16`, realtime output), so an unchanged client plays it
at the right speed; Opus is at 48 kHz (Opus takes 8/12/16/24/48 kHz). All resampling is soxr's, here: a
streamed response resamples through one `PcmStream` (one soxr stream), so its chunks join without clicks or
drift and equal the whole answer resampled at once."""
from __future__ import annotations

import io

import numpy as np
import soundfile
import soxr

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
                 "opus": "audio/ogg"}
OPUS_RATE = 48000
PCM_RATE = 24000  # OpenAI's pcm rate
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
              "opus": ("OGG", "OPUS")}


def int16_samples(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> rounded 16-bit samples: one conversion for every format, so wav, flac and pcm carry
    the same samples."""
    return np.round(np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")


def to_int16(pcm: np.ndarray) -> bytes:
    return int16_samples(pcm).tobytes()


class PcmStream:
    """One response's audio as 16-bit pcm at 24 kHz, chunk after chunk: one soxr stream made at the first
    chunk (from the decoder's rate) carries its filter state across chunk boundaries; `end` flushes its tail."""

    def __init__(self):
        self.resampler: soxr.ResampleStream | None = None
        self.rate: int | None = None

    def samples(self, pcm: np.ndarray, sample_rate: int, last: bool = False) -> np.ndarray:
        """`pcm` (float32 at `sample_rate`) as float32 at 24 kHz; `last` flushes the stream."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if self.resampler is None:
            if last and not len(pcm):
                return pcm  # a response without audio
            self.rate = sample_rate
            self.resampler = soxr.ResampleStream(sample_rate, PCM_RATE, 1, dtype="float32")
        elif len(pcm) and sample_rate != self.rate:
            raise ValueError(f"a response's audio changed rate from {self.rate} to {sample_rate} Hz")
        return self.resampler.resample_chunk(pcm, last=last)

    def chunk(self, pcm: np.ndarray, sample_rate: int) -> bytes:
        return to_int16(self.samples(pcm, sample_rate))

    def end(self) -> bytes:
        """The resampler's last samples (after the final chunk)."""
        return to_int16(self.samples(np.zeros(0, np.float32), self.rate or PCM_RATE, last=True))


def pcm_24k(pcm: np.ndarray, sample_rate: int) -> bytes:
    """A whole clip as 16-bit pcm at 24 kHz (equal to the same audio sent chunk by chunk through a PcmStream)."""
    return to_int16(PcmStream().samples(pcm, sample_rate, last=True))


def encode(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole clip in `fmt` (pcm: at 24 kHz)."""
    if fmt == "pcm":
        return pcm_24k(pcm, sample_rate)
    container, subtype = _SOUNDFILE[fmt]
    samples = int16_samples(pcm)
    if fmt in ("mp3", "opus"):  # lossy encoders take float input
        samples = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    if fmt == "opus" and sample_rate != OPUS_RATE:
        samples = soxr.resample(samples, sample_rate, OPUS_RATE).astype(np.float32)
        sample_rate = OPUS_RATE
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()
