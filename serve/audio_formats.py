"""PCM float32 -> the response formats (wav, pcm = raw 16-bit little-endian, flac)."""
from __future__ import annotations

import io

import numpy as np
import soundfile

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}


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
    buffer = io.BytesIO()
    soundfile.write(buffer, int16_samples(pcm), sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buffer.getvalue()
