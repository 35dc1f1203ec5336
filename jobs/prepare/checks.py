"""Audio checks of corpus preparation: one audio reference -> a checked 16 kHz mono waveform, or a `Reject`.

Reading and resampling are `pipeline.audio.load_audio` (soundfile + soxr), the loader of the speech encoder,
so a sample's codes are what the encoder gives for that file. What is rejected (an error row with a reason)
and what is converted:

| input                                   | outcome                                                           |
|-----------------------------------------|-------------------------------------------------------------------|
| missing file                            | rejected `missing_file`                                           |
| empty (0 bytes, no samples)             | rejected `empty`                                                  |
| truncated (header announces more)       | rejected `truncated`                                              |
| not audio / undecodable                 | rejected `unreadable`                                             |
| NaN or inf samples                      | rejected `non_finite`                                             |
| rate below `min_sample_rate` (16 kHz)   | rejected `low_sample_rate`: upsampling cannot restore the band    |
| rate other than the corpus declares     | rejected `rate_mismatch` (LibriSpeech 16 kHz, LibriTTS 24 kHz, LJSpeech 22.05 kHz, Lhotse recordings their own) |
| any other rate where none is declared   | converted: resampled to 16 kHz (VITA JSONL, Common Voice)         |
| several channels                        | rejected `multichannel` (the corpora are mono); `channels="first"`: channel 0 kept, as the original tokenizer does; `"mix"`: averaged |
| shorter than `min_seconds` / longer than `max_seconds` | rejected `too_short` / `too_long`                  |
| RMS below `silence_rms`                 | rejected `silent`                                                 |
| over `max_clipped_fraction` of samples at full scale | rejected `clipped`                                   |
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

TARGET_RATE = 16000
CHANNEL_POLICIES = ("first", "mix", "reject")
_FULL_SCALE = 0.999


@dataclass(frozen=True)
class AudioChecks:
    min_seconds: float = 0.3
    max_seconds: float = 60.0
    min_sample_rate: int | None = TARGET_RATE  # None: upsample anything
    silence_rms: float = 1e-4  # about -80 dBFS
    max_clipped_fraction: float = 0.01
    channels: str = "reject"

    def __post_init__(self):
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds} and {self.max_seconds}")
        if self.channels not in CHANNEL_POLICIES:
            raise ValueError(f"channels={self.channels!r}; expected one of {CHANNEL_POLICIES}")
        if not 0 <= self.max_clipped_fraction <= 1 or self.silence_rms < 0:
            raise ValueError("max_clipped_fraction must lie in [0, 1] and silence_rms be >= 0")


class Reject(Exception):
    """An input that cannot be a training sample: `reason` (a short category) and a message naming the problem."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_checked(ref, checks: AudioChecks) -> tuple[np.ndarray, list[str]]:
    """The 16 kHz mono float32 waveform of `ref` (a recipes.AudioRef) and what was converted ("resampled
    22050 Hz", "channel 0 of 2"); a Reject otherwise."""
    import soundfile as sf

    from pipeline.audio import AudioError, load_audio

    path = ref.path
    if not os.path.isfile(path):
        raise Reject("missing_file", f"{path}: no such file")
    try:
        info = sf.info(path)
    except Exception:  # noqa: BLE001 - let load_audio name the problem precisely
        info = None
    converted = []
    if info is not None:
        _check_rate(info.samplerate, ref, checks, path)
        if info.samplerate != TARGET_RATE:
            converted.append(f"resampled {info.samplerate} Hz")
        if info.channels > 1:
            if checks.channels == "reject" and ref.channel is None:
                raise Reject("multichannel", f"{path}: {info.channels} channels (channels='reject')")
            converted.append(f"mixed {info.channels} channels" if checks.channels == "mix" and ref.channel is None
                             else f"channel {ref.channel or 0} of {info.channels}")
    channel = ref.channel if ref.channel is not None else (None if checks.channels == "mix" else 0)
    try:
        if ref.offset or ref.duration is not None:
            wave = _segment(path, ref, channel, info, load_audio)
        else:
            wave = load_audio(path, target_sample_rate=TARGET_RATE, channel=channel,
                              max_seconds=max(checks.max_seconds, 1.0) * 4)
    except AudioError as err:
        raise Reject(_reason(str(err)), str(err)) from None
    _check_signal(wave, checks, path)
    return wave, converted


def content_hash(waves: list[np.ndarray]) -> str:
    """sha1 of the 16 kHz audio as 16-bit samples (the same speech in WAV and FLAC hashes alike)."""
    digest = hashlib.sha1()
    for wave in waves:
        digest.update(np.round(np.asarray(wave) * 32767).astype("<i2").tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _check_rate(rate: int, ref, checks: AudioChecks, path: str) -> None:
    if checks.min_sample_rate and rate < checks.min_sample_rate:
        raise Reject("low_sample_rate", f"{path}: {rate} Hz, below the minimum of {checks.min_sample_rate} Hz "
                                        "(min_sample_rate)")
    if ref.sample_rate and rate != ref.sample_rate:
        raise Reject("rate_mismatch", f"{path}: the corpus declares {ref.sample_rate} Hz, the file is {rate} Hz")


def _segment(path: str, ref, channel, info, load_audio) -> np.ndarray:
    """A span of a longer recording: only its frames are decoded, then checked and resampled as a whole file."""
    import soundfile as sf

    from pipeline.audio import AudioError

    if info is None:
        raise AudioError(f"cannot decode {path}")
    start = int(round(ref.offset * info.samplerate))
    stop = info.frames if ref.duration is None else start + int(round(ref.duration * info.samplerate))
    if start >= info.frames or stop > info.frames + info.samplerate // 100:
        raise AudioError(f"{path} is truncated: the span {ref.offset:.2f}+{ref.duration or 0:.2f} s lies beyond its "
                         f"{info.frames / info.samplerate:.2f} s")
    pcm, rate = sf.read(path, start=start, stop=min(stop, info.frames), dtype="float32", always_2d=True)
    return load_audio(pcm, rate, target_sample_rate=TARGET_RATE, channel=channel, max_seconds=None)


def _check_signal(wave: np.ndarray, checks: AudioChecks, path: str) -> None:
    seconds = len(wave) / TARGET_RATE
    if seconds < checks.min_seconds:
        raise Reject("too_short", f"{path}: {seconds:.3f} s, under min_seconds={checks.min_seconds:g}")
    if seconds > checks.max_seconds:
        raise Reject("too_long", f"{path}: {seconds:.1f} s, over max_seconds={checks.max_seconds:g}")
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    if rms < checks.silence_rms:
        raise Reject("silent", f"{path}: RMS {rms:.2e}, under silence_rms={checks.silence_rms:g}")
    clipped = float(np.mean(np.abs(wave) >= _FULL_SCALE))
    if clipped > checks.max_clipped_fraction:
        raise Reject("clipped", f"{path}: {clipped:.1%} of samples at full scale "
                                f"(max_clipped_fraction={checks.max_clipped_fraction:g})")


def _reason(message: str) -> str:
    """A load_audio message -> its category."""
    text = message.lower()
    for words, reason in ((("not found",), "missing_file"), (("truncated",), "truncated"),
                          (("nan/inf",), "non_finite"), (("empty", "no audio samples", "0 bytes"), "empty"),
                          (("over the limit",), "too_long"), (("too short",), "too_short")):
        if any(w in text for w in words):
            return reason
    return "unreadable"
