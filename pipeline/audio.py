"""Read, check, resample and write audio: everything that turns "some audio" into 16 kHz mono float32.

The speech tokenizer of GLM-4-Voice reads a file, resamples it to 16 kHz and keeps **channel 0**
(spec §4.1); `load_audio` does the same with soundfile + soxr, and also accepts encoded bytes and
raw arrays. Anything that is not usable audio (empty, corrupt, truncated, not audio, NaN/inf,
longer than a cap) raises `AudioError` with a message that names the problem, so callers (CLI,
actors, data jobs) can report it instead of crashing.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = ["AudioError", "load_audio", "write_audio", "WRITE_FORMATS"]

WRITE_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
_MAX_CHANNELS = 64          # an array axis this short is a channel axis, not time
_FLOAT_PEAK_LIMIT = 1.5     # float samples above this are unnormalised PCM, not overshoot


class AudioError(ValueError):
    """The input cannot be used as audio; the message says why."""


def load_audio(
    source: str | os.PathLike | bytes | np.ndarray,
    sample_rate: int | None = None,
    *,
    target_sample_rate: int = 16000,
    channel: int | None = 0,
    max_seconds: float | None = 600.0,
) -> np.ndarray:
    """Any audio -> float32 mono waveform at `target_sample_rate`, samples in [-1, 1].

    source: a path to anything soundfile reads (wav, flac, ogg, mp3 ...), the encoded bytes of such
        a file, or an array of samples: 1-D mono, or 2-D with one short channel axis
        ((samples, channels) as soundfile returns, or (channels, samples)). Integer arrays are PCM
        and are scaled to [-1, 1) (int16 / 32768, as torchaudio reads 16-bit files).
    sample_rate: the rate of an array source (required: a wrong rate would pass silently); for
        files and bytes it must be None or match the rate in the header.
    channel: which channel to keep (0 as the original tokenizer), or None to average all channels.
    max_seconds: reject input longer than this (None: no cap); checked before decoding a file.
    """
    if not isinstance(target_sample_rate, (int, np.integer)) or target_sample_rate <= 0:
        raise AudioError(f"target_sample_rate must be a positive integer, got {target_sample_rate!r}")
    if channel is not None and (not isinstance(channel, (int, np.integer)) or channel < 0):
        raise AudioError(f"channel must be a non-negative integer or None (mix down), got {channel!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise AudioError(f"max_seconds must be positive or None, got {max_seconds!r}")

    if isinstance(source, np.ndarray) or _is_tensor(source):
        samples, rate = _from_array(source, sample_rate)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        samples, rate = _read_encoded(bytes(source), "audio bytes", sample_rate, max_seconds)
    elif isinstance(source, (str, os.PathLike)):
        samples, rate = _read_file(Path(source), sample_rate, max_seconds)
    else:
        raise AudioError(
            f"audio source must be a path, bytes or a numpy array, got {type(source).__name__}"
        )

    # samples: (T, C) float32 from here on
    n_frames, n_channels = samples.shape
    if n_frames == 0:
        raise AudioError("audio is empty (0 samples)")
    if max_seconds is not None and n_frames / rate > max_seconds:
        raise AudioError(f"audio is {n_frames / rate:.1f} s long, over the limit of {max_seconds:g} s (max_seconds)")
    if channel is None:
        mono = samples.mean(axis=1, dtype=np.float64).astype(np.float32)
    elif channel >= n_channels:
        raise AudioError(f"channel {channel} requested but the audio has {n_channels} channel(s)")
    else:
        mono = np.ascontiguousarray(samples[:, channel])
    if not np.isfinite(mono).all():
        bad = int((~np.isfinite(mono)).sum())
        raise AudioError(f"audio contains {bad} NaN/inf sample(s)")
    peak = float(np.abs(mono).max())
    if peak > _FLOAT_PEAK_LIMIT:
        raise AudioError(
            f"float samples must lie in [-1, 1], got a peak of {peak:.4g} "
            "(integer PCM should be passed with its integer dtype)"
        )

    if rate != target_sample_rate:
        mono = soxr.resample(mono, rate, target_sample_rate, quality="HQ").astype(np.float32, copy=False)
        if mono.size == 0:
            raise AudioError(f"audio is too short to resample from {rate} Hz to {target_sample_rate} Hz")
    return np.clip(mono, -1.0, 1.0, out=mono)


def write_audio(path: str | os.PathLike, pcm: np.ndarray, sample_rate: int) -> Path:
    """Write a mono (T,) or multi-channel (T, C) float waveform as 16-bit wav or flac (by suffix)."""
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(f"cannot write {path.name!r}: the suffix must be one of {sorted(WRITE_FORMATS)}")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    pcm = np.asarray(pcm.detach().cpu().numpy() if _is_tensor(pcm) else pcm)
    if pcm.ndim not in (1, 2) or pcm.size == 0:
        raise AudioError(f"pcm must be a non-empty (T,) or (T, C) array, got shape {pcm.shape}")
    pcm = pcm.astype(np.float32, copy=False)
    if not np.isfinite(pcm).all():
        raise AudioError("pcm contains NaN/inf samples")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(pcm, -1.0, 1.0), int(sample_rate), format=fmt, subtype="PCM_16")
    return path


# ---------------------------------------------------------------------------------------------
# sources


def _read_file(path: Path, sample_rate: int | None, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"audio path is not a file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    return _read_encoded(path, str(path), sample_rate, max_seconds)


def _read_encoded(
    data: Path | bytes, name: str, sample_rate: int | None, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    """Decode a file or its bytes with soundfile; (T, C) float32 and the header's rate."""
    if isinstance(data, bytes) and not data:
        raise AudioError("audio bytes are empty")
    opened = data if isinstance(data, Path) else io.BytesIO(data)
    try:
        with sf.SoundFile(opened) as f:
            rate, frames = f.samplerate, f.frames
            if sample_rate is not None and sample_rate != rate:
                raise AudioError(f"sample_rate={sample_rate} given but {name} is {rate} Hz")
            if max_seconds is not None and frames / rate > max_seconds:
                raise AudioError(
                    f"{name} is {frames / rate:.1f} s long, over the limit of {max_seconds:g} s (max_seconds)"
                )
            if f.format in ("WAV", "WAVEX"):
                _check_wav_complete(data, name)
            samples = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as err:
        raise AudioError(f"cannot decode {name}: {_libsndfile_reason(err)}") from None
    except (RuntimeError, EOFError) as err:  # soundfile raises plain RuntimeError for some decode failures
        raise AudioError(f"cannot decode {name}: {err}") from None
    if len(samples) == 0:
        raise AudioError(f"{name} holds no audio samples")
    if len(samples) < frames:
        raise AudioError(f"{name} is truncated: the header announces {frames} frames, only {len(samples)} decode")
    return samples, rate


def _from_array(array, sample_rate: int | None) -> tuple[np.ndarray, int]:
    """A raw sample array -> (T, C) float32 and its rate."""
    if _is_tensor(array):
        array = array.detach().cpu().numpy()
    rate = sample_rate
    if rate is None:
        raise AudioError("sample_rate is required for an array source (e.g. sample_rate=16000)")
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"sample_rate must be a positive integer, got {rate!r}")
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim == 2:
        if array.shape[1] > _MAX_CHANNELS and array.shape[0] <= _MAX_CHANNELS:
            array = array.T  # (C, T) -> (T, C)
        elif array.shape[1] > _MAX_CHANNELS:
            raise AudioError(f"cannot tell the channel axis of an array of shape {array.shape}")
    else:
        raise AudioError(f"audio array must be 1-D or 2-D, got shape {array.shape}")
    if array.size == 0:
        raise AudioError(f"audio array is empty (shape {array.shape})")
    kind = array.dtype.kind
    if kind == "f":
        samples = array.astype(np.float32)
    elif kind == "i":
        samples = (array / float(2 ** (8 * array.dtype.itemsize - 1))).astype(np.float32)
    elif kind == "u":
        half = float(2 ** (8 * array.dtype.itemsize - 1))
        samples = ((array - half) / half).astype(np.float32)
    elif kind == "b":
        raise AudioError("audio array has boolean dtype, expected float or integer PCM")
    else:
        raise AudioError(f"audio array has unsupported dtype {array.dtype}")
    return samples, int(rate)


def _check_wav_complete(data: Path | bytes, name: str) -> None:
    """libsndfile silently shortens a truncated WAV; compare the data chunk's declared size to the file."""
    if isinstance(data, Path):
        total = data.stat().st_size
        with open(data, "rb") as fh:
            head = fh.read(1 << 16)
    else:
        total, head = len(data), data[: 1 << 16]
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return  # RF64 / other containers: trust libsndfile
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            if size in (0, 0xFFFFFFFF):  # streamed WAV: length unknown by design
                return
            if pos + 8 + size > total:
                raise AudioError(
                    f"{name} is truncated: its data chunk announces {size} bytes, the file holds {total - pos - 8}"
                )
            return
        pos += 8 + size + (size & 1)


def _libsndfile_reason(err: Exception) -> str:
    text = str(err)
    reason = text.split(": ", 1)[1] if text.startswith("Error opening") and ": " in text else text
    reason = reason.strip() or "unknown decoder error"
    if "Format not recognised" in reason or "unimplemented format" in reason:
        reason += " (not an audio file soundfile can read?)"
    return reason


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")
