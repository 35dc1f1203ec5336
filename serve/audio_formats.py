"""PCM float32 -> the response formats: wav, pcm (raw 16-bit little-endian), flac, and the lossy mp3 / opus
that libsndfile (>= 1.1, in soundfile's wheels) encodes. Opus is resampled to 48 kHz (Opus takes 8/12/16/24/48 kHz)."""
from __future__ import annotations

import io

import numpy as np
import soundfile

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
                 "opus": "audio/ogg"}
OPUS_RATE = 48000
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
              "opus": ("OGG", "OPUS")}


def int16_samples(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> rounded 16-bit samples: one conversion for every format, so wav, flac and pcm carry
    the same samples."""
    return np.round(np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")


def to_int16(pcm: np.ndarray) -> bytes:
    return int16_samples(pcm).tobytes()


def encode(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole clip in `fmt`."""
    if fmt == "pcm":
        return to_int16(pcm)
    container, subtype = _SOUNDFILE[fmt]
    samples = int16_samples(pcm)
    if fmt in ("mp3", "opus"):  # lossy encoders take float input
        samples = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    if fmt == "opus" and sample_rate != OPUS_RATE:
        import soxr

        samples = soxr.resample(samples, sample_rate, OPUS_RATE).astype(np.float32)
        sample_rate = OPUS_RATE
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()
