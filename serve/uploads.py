"""Audio that arrives in a request (a multipart file or base64 `input_audio`): decoded and checked against
the caps here, so a bad or oversized clip is a 4xx naming the problem before any stage is called."""
from __future__ import annotations

import base64
import binascii

import numpy as np

from serve.api import APIError


def decode_base64(data, param: str) -> bytes:
    """Strict base64 -> bytes (400 naming `param` for anything else)."""
    if not isinstance(data, str) or not data:
        raise APIError(400, f"{param} must be a non-empty base64 string", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"{param} is not valid base64: {err}", param=param) from None


def check_audio(data: bytes, max_seconds: float, param: str) -> np.ndarray:
    """Encoded audio bytes -> 16 kHz mono float32, refusing empty / broken / truncated clips (400) and clips
    longer than `max_seconds` (413, naming max_audio_seconds) before they are decoded in full."""
    import io

    import soundfile

    from pipeline.audio import AudioError, load_audio

    if not data:
        raise APIError(400, f"{param}: the audio is empty (0 bytes)", param=param)
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError for anything it cannot read
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise APIError(400, f"{param}: cannot decode the audio ({reason}); send wav, flac or ogg", param=param) from None
    if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise APIError(413, f"{param}: the audio is {info.frames / info.samplerate:.1f} s long, over "
                            f"max_audio_seconds={max_seconds:g}", param=param, code="max_audio_seconds")
    try:
        return load_audio(data, max_seconds=max_seconds)
    except AudioError as err:
        raise APIError(400, f"{param}: {err}", param=param) from None
