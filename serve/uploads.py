"""Audio that arrives in a request (a multipart file or base64 `input_audio`): admitted by the one audio admission
(`pipeline.audio.admit_audio`) before any stage is called, off the event loop, each clip decoded once.

A clip is refused by its header before a sample is decoded when it would decode too large (rate, channels,
frames: the audio bombs of a tiny FLAC declaring 8 channels at 655 kHz), and a header that hides the length
is cut off while reading. Too long / too large is 413 (code `max_audio_seconds` / `max_decoded_bytes`),
anything else 400, both in OpenAI's error shape, naming the request field."""
from __future__ import annotations

import asyncio
import base64
import binascii

import numpy as np

from actors.payloads import AudioPayload
from pipeline.audio import DEFAULT_LIMITS, AudioError, AudioLimits, AudioUnreadable, admit_audio
from serve.api import APIError

ENCODER_RATE = 16000
# the endpoint's audio limits: the one default (8-96 kHz, <= 8 channels), its seconds set by the caps; an
# upload decodes to at most 64 MiB of float32 samples over all channels (60 s of 96 kHz stereo is 44 MiB)
UPLOAD_LIMITS = DEFAULT_LIMITS.with_(max_decoded_bytes=64 << 20)
# the limits under the names the endpoint's settings have
LIMIT_NAMES = {"max_seconds": "max_audio_seconds"}


def upload_limits(max_seconds: float) -> AudioLimits:
    """The endpoint's audio limits with the cap of a route (max_audio_seconds, or a voice's shorter cap)."""
    return UPLOAD_LIMITS.with_(max_seconds=float(max_seconds))


def decode_base64(data, param: str) -> bytes:
    """Strict base64 -> bytes (400 naming `param` for anything else)."""
    if not isinstance(data, str) or not data:
        raise APIError(400, f"{param} must be a non-empty base64 string", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"{param} is not valid base64: {err}", param=param) from None


def audio_refusal(err: AudioError, param: str) -> APIError:
    """An admission error as OpenAI's error: 413 for too long / too large (its limit as the code), else 400."""
    message = f"{param}: {err.message(LIMIT_NAMES)}"
    if isinstance(err, AudioUnreadable) and err.reason == "unreadable":
        message += "; send wav, flac or ogg"
    if err.too_large:
        code = LIMIT_NAMES.get(err.limit, err.limit)
        return APIError(413, message, param=param, code=code)
    return APIError(400, message, param=param)


def admit_upload_now(data: bytes, max_seconds: float, param: str) -> AudioPayload:
    """Encoded audio bytes -> a checked 16 kHz mono AudioPayload, or the APIError (blocking: decodes)."""
    if not data:
        raise APIError(400, f"{param}: the audio is empty (0 bytes)", param=param)
    try:
        audio = admit_audio(data, limits=upload_limits(max_seconds), target_sample_rate=ENCODER_RATE,
                            name="the audio")
    except AudioError as err:
        raise audio_refusal(err, param) from None
    return AudioPayload(audio.pcm, ENCODER_RATE, param)


async def admit_upload(data: bytes, max_seconds: float, param: str) -> AudioPayload:
    """`admit_upload_now` in a worker thread: decoding never blocks the ingress' event loop."""
    return await asyncio.to_thread(admit_upload_now, data, max_seconds, param)


async def admit_pcm16(pcm16: bytes, rate: int, max_seconds: float, param: str) -> AudioPayload:
    """Raw little-endian pcm16 mono at `rate` (realtime's input audio) -> its admitted 16 kHz AudioPayload, off
    the event loop; the same samples as admitting it as a 16-bit wav (no wav round trip, decoded once)."""
    def admit() -> AudioPayload:
        try:
            audio = admit_audio(np.frombuffer(pcm16, "<i2"), int(rate), limits=upload_limits(max_seconds),
                                target_sample_rate=ENCODER_RATE, name="the audio")
        except AudioError as err:
            raise audio_refusal(err, param) from None
        return AudioPayload(audio.pcm, ENCODER_RATE, param)

    return await asyncio.to_thread(admit)


def check_sample_rate(rate: int, param: str) -> None:
    """An input rate the endpoint accepts (the limits' 8-96 kHz), else a 400 naming `param`."""
    try:
        UPLOAD_LIMITS.check_sample_rate(rate, "the input audio")
    except AudioError as err:
        raise audio_refusal(err, param) from None


def check_audio(data: bytes, max_seconds: float, param: str) -> np.ndarray:
    """The 16 kHz samples of `admit_upload_now` (blocking; routes await `admit_upload`)."""
    return admit_upload_now(data, max_seconds, param).pcm
