"""Audio admission: everything that turns "some audio" into a checked mono float32 waveform, written once.

The speech tokenizer of GLM-4-Voice reads a file, resamples it to 16 kHz and keeps **channel 0**
(spec §4.1); `admit_audio` does the same with soundfile + soxr, and also accepts encoded bytes and
raw arrays. Every front end (CLI, Serve uploads, realtime, prepare, batch) calls it with an `AudioLimits`
and maps its typed errors (all `AudioError`, a `ValueError`) to its own answer: exit 2, HTTP 400/413, an
error event, an error row.

What it withstands (audio bombs): the header is read first (rate, channels, frames) and a file that would
decode too large — a rate or channel count out of range, too many seconds, too many decoded bytes — is
refused before any sample is decoded. A header that does not give the length (a streamed FLAC/WAV) is read
in blocks and refused as soon as it passes the caps. Each file is decoded once, only the frames asked for
(`start`/`duration`), one block at a time straight into the mono output, so the memory of an admission is
the mono waveform at the source rate plus one block, never the decoded multi-channel file.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "AudioError", "AudioUnreadable", "AudioNotFound", "AudioTruncated", "AudioTooShort", "AudioEmpty",
    "AudioTooLong", "AudioTooLarge", "BadSampleRate", "TooManyChannels", "NonFiniteAudio",
    "AudioLimits", "DEFAULT_LIMITS", "AudioHeader", "AdmittedAudio",
    "admit_audio", "probe_audio", "load_audio", "write_audio", "WRITE_FORMATS",
]

WRITE_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
_ARRAY_MAX_CHANNELS = 64    # an array axis this short is a channel axis, not time
_FLOAT_PEAK_LIMIT = 1.5     # float samples above this are unnormalised PCM, not overshoot
_BLOCK_SAMPLES = 1 << 18    # samples (frames x channels) decoded per block: 1 MiB of float32
_UNKNOWN_FRAMES = 1 << 62   # libsndfile reports SF_COUNT_MAX when a header does not give the length


# ---------------------------------------------------------------------------------------------------------
# errors


class AudioError(ValueError):
    """The input cannot be used as audio; the message says why.

    `reason`: a short category (prepare's error rows use it). `limit`: the `AudioLimits` field that refused
    the input, if one did; front ends render it under their own name with `message(names)` (Serve:
    max_audio_seconds, the CLI: --max-audio-seconds) so the answer names the setting that would accept it.
    """

    reason = "bad_audio"
    too_large = False  # True: the input is over a size cap (HTTP 413), else it is malformed (400)

    def __init__(self, text: str, limit: str | None = None, reason: str | None = None):
        self.text, self.limit = text, limit
        if reason:
            self.reason = reason
        super().__init__(self.message())

    def message(self, names: dict[str, str] | None = None) -> str:
        """The message with the refusing limit named as the caller names it (`{"max_seconds": "--max-seconds"}`)."""
        if self.limit is None:
            return self.text
        return self.text.replace("{limit}", (names or {}).get(self.limit, self.limit))

    def prefixed(self, prefix: str) -> "AudioError":
        """The same error (same type, limit, reason) with `prefix: ` in front of its message."""
        return type(self)(f"{prefix}: {self.text}", self.limit, self.reason)

    def __reduce__(self):  # keep the type, limit and reason across pickling (Ray)
        return (type(self), (self.text, self.limit, self.reason))


class AudioUnreadable(AudioError):
    """Not audio soundfile can decode (corrupt, not audio, an unsupported container)."""

    reason = "unreadable"


class AudioNotFound(AudioUnreadable):
    reason = "missing_file"


class AudioTruncated(AudioUnreadable):
    """The header announces more than the file holds."""

    reason = "truncated"


class AudioTooShort(AudioError):
    reason = "too_short"


class AudioEmpty(AudioTooShort):
    """No samples at all (0 bytes, 0 frames)."""

    reason = "empty"


class AudioTooLong(AudioError):
    reason = "too_long"
    too_large = True


class AudioTooLarge(AudioError):
    """It would decode to more samples than `max_decoded_bytes` (e.g. many channels at a high rate)."""

    reason = "too_large"
    too_large = True


class BadSampleRate(AudioError):
    reason = "bad_sample_rate"  # "low_sample_rate" / "high_sample_rate" when a limit refused it


class TooManyChannels(AudioError):
    reason = "too_many_channels"


class NonFiniteAudio(AudioError):
    reason = "non_finite"


# ---------------------------------------------------------------------------------------------------------
# limits


@dataclass(frozen=True)
class AudioLimits:
    """What admission accepts. One default (`DEFAULT_LIMITS`) for every front end; each sets its caps with
    `dataclasses.replace` (or `.with_(...)`). Checked by the header before decoding, and again on the samples."""

    max_seconds: float | None = 600.0   # of the span read (None: no cap)
    min_seconds: float = 0.0            # of the span read, at the source rate
    min_sample_rate: int = 8000         # telephone quality; below that the header is wrong, not the audio
    max_sample_rate: int = 96000        # the realtime input range is the same 8-96 kHz
    max_channels: int = 8
    # float32 samples over all channels of the span read: the decoder's work (memory is the output only).
    # None: what `max_seconds` of 48 kHz stereo takes, at least 64 MiB (600 s: 220 MiB).
    max_decoded_bytes: int | None = None

    def __post_init__(self):
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number{' or None' if allow_none else ''}, "
                                 f"got {value!r}")

        positive("max_seconds", self.max_seconds, allow_none=True)
        if isinstance(self.min_seconds, bool) or not isinstance(self.min_seconds, (int, float)) \
                or not math.isfinite(self.min_seconds) or self.min_seconds < 0:
            raise ValueError(f"min_seconds must be a finite number >= 0, got {self.min_seconds!r}")
        if self.max_seconds is not None and self.min_seconds >= self.max_seconds:
            raise ValueError(f"need min_seconds < max_seconds, got {self.min_seconds} and {self.max_seconds}")
        for name in ("min_sample_rate", "max_sample_rate", "max_channels", "max_decoded_bytes"):
            value = getattr(self, name)
            if value is None and name == "max_decoded_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError(f"need min_sample_rate <= max_sample_rate, got {self.min_sample_rate} and "
                             f"{self.max_sample_rate}")

    def with_(self, **changes) -> "AudioLimits":
        return dataclasses.replace(self, **changes)

    @property
    def decoded_cap(self) -> int | None:
        """`max_decoded_bytes`, or the one derived from `max_seconds` (None: no cap)."""
        if self.max_decoded_bytes is not None:
            return self.max_decoded_bytes
        if self.max_seconds is None:
            return None
        return max(64 << 20, int(self.max_seconds * 48000 * 2 * 4))

    # -- checks (each raises the typed error naming the limit) ------------------------------------------
    def check_sample_rate(self, rate: int, name: str = "audio") -> None:
        if rate < self.min_sample_rate:
            raise BadSampleRate(f"{name}: sample rate {rate} Hz is below the limit of {{limit}}={self.min_sample_rate}",
                                "min_sample_rate", "low_sample_rate")
        if rate > self.max_sample_rate:
            raise BadSampleRate(f"{name}: sample rate {rate} Hz is over the limit of {{limit}}={self.max_sample_rate}",
                                "max_sample_rate", "high_sample_rate")

    def check_channels(self, channels: int, name: str = "audio") -> None:
        if channels > self.max_channels:
            raise TooManyChannels(f"{name}: {channels} channels, over the limit of {{limit}}={self.max_channels}",
                                  "max_channels")

    def check_frames(self, frames: int, rate: int, channels: int, name: str = "audio", *, read: bool = False) -> None:
        """A span of `frames` at `rate`: too long, or too large to decode? (`read`: counted while reading a
        file whose header gives no length.)"""
        how = " (while reading: its header gives no length)" if read else ""
        seconds = frames / rate
        if self.max_seconds is not None and seconds > self.max_seconds:
            shown = f"over {self.max_seconds:g} s" if read else f"{seconds:.1f} s long"
            raise AudioTooLong(f"{name} is {shown}, over the limit of {{limit}}={self.max_seconds:g}{how}",
                               "max_seconds")
        decoded, cap = frames * channels * 4, self.decoded_cap
        if cap is not None and decoded > cap:
            raise AudioTooLarge(f"{name} would decode to {_mib(decoded)} ({channels} channel(s) at {rate} Hz), over "
                                f"the limit of {{limit}}={cap}{how}", "max_decoded_bytes")

    def check_min(self, frames: int, rate: int, name: str = "audio") -> None:
        if frames == 0:
            raise AudioEmpty(f"{name} holds no audio samples")
        if frames / rate < self.min_seconds:
            raise AudioTooShort(f"{name} is {frames / rate:.3f} s long, under the limit of "
                                f"{{limit}}={self.min_seconds:g}", "min_seconds")

    def check_header(self, header: "AudioHeader", name: str = "audio") -> None:
        """Everything the header tells, before a sample is decoded."""
        self.check_sample_rate(header.sample_rate, name)
        self.check_channels(header.channels, name)
        if header.frames is not None:
            self.check_frames(header.frames, header.sample_rate, header.channels, name)

    def max_frames(self, rate: int, channels: int) -> int | None:
        """The most frames of a span that pass `check_frames` (None: no cap)."""
        cap = self.decoded_cap
        caps = [cap // (4 * channels)] if cap is not None else []
        if self.max_seconds is not None:
            caps.append(math.floor(self.max_seconds * rate))
        return min(caps) if caps else None


DEFAULT_LIMITS = AudioLimits()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


# ---------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class AudioHeader:
    """What a file's header says: rate, channels, frames (None: the header does not give the length)."""

    sample_rate: int
    channels: int
    frames: int | None
    format: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.frames is None else self.frames / self.sample_rate


@dataclass
class AdmittedAudio:
    """A checked mono float32 waveform in [-1, 1] at `sample_rate`, and what it came from."""

    pcm: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int
    name: str = "audio"

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.sample_rate

    def conversions(self, channel: int | None = 0) -> list[str]:
        """What admission changed: ["resampled 22050 Hz", "channel 0 of 2"] (empty for 16 kHz mono in)."""
        done = [f"resampled {self.source_rate} Hz"] if self.source_rate != self.sample_rate else []
        if self.source_channels > 1:
            done.append(f"mixed {self.source_channels} channels" if channel is None
                        else f"channel {channel} of {self.source_channels}")
        return done


# ---------------------------------------------------------------------------------------------------------
# the one admission


def admit_audio(
    source: str | os.PathLike | bytes | np.ndarray,
    sample_rate: int | None = None,
    *,
    limits: AudioLimits = DEFAULT_LIMITS,
    target_sample_rate: int = 16000,
    channel: int | None = 0,
    start: float = 0.0,
    duration: float | None = None,
    name: str | None = None,
) -> AdmittedAudio:
    """Any audio -> a checked `AdmittedAudio` (mono float32 at `target_sample_rate`), or a typed `AudioError`.

    source: a path to anything soundfile reads (wav, flac, ogg, mp3 ...), the encoded bytes of such a file,
        or an array of samples: 1-D mono, or 2-D with one short channel axis ((samples, channels) as
        soundfile returns, or (channels, samples)). Integer arrays are PCM, scaled to [-1, 1).
    sample_rate: the rate of an array source (required); for files and bytes None or the header's rate.
    limits: what is accepted; refused by the header before decoding where the header tells.
    channel: which channel to keep (0 as the original tokenizer), or None to average all channels.
    start, duration: the span to read, in seconds (only its frames are decoded; limits apply to the span).
    name: how messages name the input (default: the path, "audio bytes" or "audio").
    Blocking (CPU): an event loop runs it in a thread (`asyncio.to_thread`).
    """
    if not isinstance(target_sample_rate, (int, np.integer)) or target_sample_rate <= 0:
        raise AudioError(f"target_sample_rate must be a positive integer, got {target_sample_rate!r}")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, (int, np.integer))
                                or channel < 0):
        raise AudioError(f"channel must be a non-negative integer or None (mix down), got {channel!r}")
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start >= 0):
        raise AudioError(f"start must be a finite number of seconds >= 0, got {start!r}")
    if duration is not None and not (isinstance(duration, (int, float)) and math.isfinite(duration)
                                     and duration > 0):
        raise AudioError(f"duration must be a positive finite number of seconds or None, got {duration!r}")
    if not isinstance(limits, AudioLimits):
        raise TypeError(f"limits must be an AudioLimits, got {type(limits).__name__}")
    target = int(target_sample_rate)

    if isinstance(source, np.ndarray) or _is_tensor(source):
        name = name or "audio"
        samples, rate = _from_array(source, sample_rate)
        limits.check_sample_rate(rate, name)
        n_channels = samples.shape[1]
        lo, hi = _span(len(samples), rate, start, duration, name)
        samples = samples[lo:hi]
        limits.check_frames(len(samples), rate, 1, name)  # already in memory: only its length counts
        limits.check_min(len(samples), rate, name)
        mono = _to_mono(samples, channel, n_channels)
        _check_samples(mono, name)
        if rate != target:
            mono = soxr.resample(mono, rate, target, quality="HQ").astype(np.float32, copy=False)
        else:
            mono = mono.copy() if not mono.flags.owndata else mono
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise AudioEmpty(f"{name} is empty (0 bytes)" if name else "audio bytes are empty (0 bytes)")
        name = name or "audio bytes"
        mono, rate, n_channels = _decode(bytes(source), name, sample_rate, limits, channel, start, duration, target)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        if not path.exists():
            raise AudioNotFound(f"audio file not found: {path}")
        if not path.is_file():
            raise AudioUnreadable(f"audio path is not a file: {path}")
        if path.stat().st_size == 0:
            raise AudioEmpty(f"audio file is empty (0 bytes): {path}")
        mono, rate, n_channels = _decode(path, name, sample_rate, limits, channel, start, duration, target)
    else:
        raise AudioError(f"audio source must be a path, bytes or a numpy array, got {type(source).__name__}")

    if mono.size == 0:
        raise AudioTooShort(f"{name} is too short to resample from {rate} Hz to {target} Hz")
    np.clip(mono, -1.0, 1.0, out=mono)
    return AdmittedAudio(mono, target, int(rate), int(n_channels), name)


def probe_audio(source: str | os.PathLike | bytes, limits: AudioLimits | None = DEFAULT_LIMITS,
                name: str | None = None) -> AudioHeader:
    """The header of a file or encoded bytes (nothing decoded), checked against `limits` unless None."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise AudioEmpty(f"{name} is empty (0 bytes)" if name else "audio bytes are empty (0 bytes)")
        name = name or "audio bytes"
        opened = io.BytesIO(bytes(source))
    else:
        name = name or str(source)
        if not Path(source).is_file():
            raise AudioNotFound(f"audio file not found: {source}")
        opened = Path(source)
    try:
        with sf.SoundFile(opened) as f:
            header = _header(f)
    except sf.LibsndfileError as err:
        raise AudioUnreadable(f"cannot decode {name}: {_libsndfile_reason(err)}") from None
    except (RuntimeError, EOFError) as err:
        raise AudioUnreadable(f"cannot decode {name}: {err}") from None
    if limits is not None:
        limits.check_header(header, name)
    return header


def load_audio(
    source: str | os.PathLike | bytes | np.ndarray,
    sample_rate: int | None = None,
    *,
    target_sample_rate: int = 16000,
    channel: int | None = 0,
    max_seconds: float | None = 600.0,
    limits: AudioLimits | None = None,
) -> np.ndarray:
    """`admit_audio(...).pcm`: the waveform only. `max_seconds` overrides the limits' cap (None: no cap)."""
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise AudioError(f"max_seconds must be positive or None, got {max_seconds!r}")
    limits = limits or DEFAULT_LIMITS
    if max_seconds != limits.max_seconds:
        limits = limits.with_(max_seconds=max_seconds)
    return admit_audio(source, sample_rate, limits=limits, target_sample_rate=target_sample_rate,
                       channel=channel).pcm


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
        raise NonFiniteAudio("pcm contains NaN/inf samples")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(pcm, -1.0, 1.0), int(sample_rate), format=fmt, subtype="PCM_16")
    return path


# ---------------------------------------------------------------------------------------------------------
# decoding


def _header(f: sf.SoundFile) -> AudioHeader:
    frames = f.frames if 0 <= f.frames < _UNKNOWN_FRAMES else None
    return AudioHeader(int(f.samplerate), int(f.channels), frames, f.format)


def _decode(data: Path | bytes, name: str, sample_rate: int | None, limits: AudioLimits, channel: int | None,
            start: float, duration: float | None, target: int) -> tuple[np.ndarray, int, int]:
    """Decode a file or its bytes once, block by block, into the mono span at `target` Hz:
    (mono, source rate, source channels). Each block is down-mixed and resampled (one soxr stream, equal to
    resampling the whole) as it is read: memory is the output plus one block."""
    opened = data if isinstance(data, Path) else io.BytesIO(data)
    try:
        with sf.SoundFile(opened) as f:
            header = _header(f)
            rate, n_channels = header.sample_rate, header.channels
            if sample_rate is not None and sample_rate != rate:
                raise BadSampleRate(f"sample_rate={sample_rate} given but {name} is {rate} Hz")
            limits.check_sample_rate(rate, name)
            limits.check_channels(n_channels, name)
            if channel is not None and channel >= n_channels:
                raise AudioError(f"{name}: channel {channel} requested but the audio has {n_channels} channel(s)")
            if header.frames is not None:
                lo, hi = _span(header.frames, rate, start, duration, name)
                limits.check_frames(hi - lo, rate, n_channels, name)
                if hi - lo == 0:
                    raise AudioEmpty(f"{name} holds no audio samples")
                if f.format in ("WAV", "WAVEX"):
                    _check_wav_complete(data, name)
                want, cap = hi - lo, None
            else:  # the header hides the length: cut off while reading
                lo = int(round(start * rate))
                want = None if duration is None else int(round(duration * rate))
                cap = limits.max_frames(rate, n_channels)
            if lo:
                f.seek(lo)
            mono, frames = _read(f, want, cap, limits, channel, name, target)
            if header.frames is not None and frames < want and (start == 0 and duration is None):
                raise AudioTruncated(f"{name} is truncated: the header announces {want} frames, only {frames} "
                                     "decode")
    except sf.LibsndfileError as err:
        raise AudioUnreadable(f"cannot decode {name}: {_libsndfile_reason(err)}") from None
    except (RuntimeError, EOFError) as err:  # soundfile raises plain RuntimeError for some decode failures
        raise AudioUnreadable(f"cannot decode {name}: {err}") from None
    limits.check_min(frames, rate, name)
    return mono, rate, n_channels


def _span(frames: int, rate: int, start: float, duration: float | None, name: str) -> tuple[int, int]:
    """[lo, hi) frames of the span (start, duration) in a recording of `frames` frames."""
    if not start and duration is None:
        return 0, frames
    lo = int(round(start * rate))
    hi = frames if duration is None else lo + int(round(duration * rate))
    if lo >= frames or hi > frames + rate // 100:  # 10 ms of rounding slack at the end
        raise AudioTruncated(f"{name} is truncated: the span {start:.2f}+{duration or 0:.2f} s lies beyond its "
                             f"{frames / rate:.2f} s")
    return lo, min(hi, frames)


def _read_block(f: sf.SoundFile, out: np.ndarray) -> int:
    """Decode up to len(out) frames into the (n, channels) float32 `out`; the frames decoded (0 at the end).

    libsndfile's own call: soundfile's `read` seeks after each read, which fails on a stream whose
    header gives no length (a FLAC with total_samples 0)."""
    snd, ffi = sf._snd, sf._ffi  # noqa: SLF001 - the plain C call; see the docstring
    n = snd.sf_readf_float(f._file, ffi.cast("float *", out.ctypes.data), len(out))  # noqa: SLF001
    err = snd.sf_error(f._file)  # noqa: SLF001
    if err:
        raise sf.LibsndfileError(err)
    return int(n)


def _read(f: sf.SoundFile, want: int | None, cap: int | None, limits: AudioLimits, channel: int | None, name: str,
          target: int) -> tuple[np.ndarray, int]:
    """Up to `want` frames (None: to the end, refused once past `cap`) -> (mono at `target` Hz, frames read)."""
    rate, n_channels = f.samplerate, f.channels
    block = np.empty((max(1, _BLOCK_SAMPLES // n_channels), n_channels), np.float32)
    if want is not None:
        block = block[: max(1, min(len(block), want))]
    resampler = soxr.ResampleStream(rate, target, 1, dtype="float32", quality="HQ") if rate != target else None
    # the output: preallocated from the known length (a little slack for the resampler), else grown
    out = np.empty(int(math.ceil(want * target / rate)) + 64 if want is not None else 1 << 16, np.float32)
    filled, frames = 0, 0
    while want is None or frames < want:
        n = _read_block(f, block if want is None else block[: min(len(block), want - frames)])
        if n <= 0:
            break
        frames += n
        if cap is not None and frames > cap:
            limits.check_frames(frames, rate, n_channels, name, read=True)
        mono = _to_mono(block[:n], channel, n_channels)
        _check_samples(mono, name)
        if resampler is not None:
            mono = resampler.resample_chunk(mono, last=False)
        out, filled = _put(mono, out, filled)
    if resampler is not None:
        out, filled = _put(resampler.resample_chunk(np.zeros(0, np.float32), last=True), out, filled)
    return out[:filled], frames


def _put(chunk: np.ndarray, out: np.ndarray, filled: int) -> tuple[np.ndarray, int]:
    """Append `chunk` to the output buffer, growing it by half when full."""
    if filled + len(chunk) > len(out):
        grown = np.empty(max(filled + len(chunk), len(out) + len(out) // 2), np.float32)
        grown[:filled] = out[:filled]
        out = grown
    out[filled:filled + len(chunk)] = chunk
    return out, filled + len(chunk)


def _to_mono(samples: np.ndarray, channel: int | None, n_channels: int) -> np.ndarray:
    if n_channels == 1:
        return samples[:, 0]
    if channel is None:
        return samples.mean(axis=1, dtype=np.float64).astype(np.float32)
    if channel >= n_channels:
        raise AudioError(f"channel {channel} requested but the audio has {n_channels} channel(s)")
    return samples[:, channel]


def _check_samples(mono: np.ndarray, name: str) -> None:
    """NaN/inf, and float samples far outside [-1, 1] (unnormalised PCM passed as float)."""
    if not mono.size:
        return
    finite = np.isfinite(mono)
    if not finite.all():
        raise NonFiniteAudio(f"{name} contains {int((~finite).sum())} NaN/inf sample(s)")
    peak = float(np.abs(mono).max())
    if peak > _FLOAT_PEAK_LIMIT:
        raise AudioError(f"{name}: float samples must lie in [-1, 1], got a peak of {peak:.4g} "
                         "(integer PCM should be passed with its integer dtype)")


def _from_array(array, sample_rate: int | None) -> tuple[np.ndarray, int]:
    """A raw sample array -> (T, C) float32 and its rate."""
    if _is_tensor(array):
        array = array.detach().cpu().numpy()
    rate = sample_rate
    if rate is None:
        raise AudioError("sample_rate is required for an array source (e.g. sample_rate=16000)")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise BadSampleRate(f"sample_rate must be a positive integer, got {rate!r}")
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim == 2:
        if array.shape[1] > _ARRAY_MAX_CHANNELS and array.shape[0] <= _ARRAY_MAX_CHANNELS:
            array = array.T  # (C, T) -> (T, C)
        elif array.shape[1] > _ARRAY_MAX_CHANNELS:
            raise AudioError(f"cannot tell the channel axis of an array of shape {array.shape}")
    else:
        raise AudioError(f"audio array must be 1-D or 2-D, got shape {array.shape}")
    if array.size == 0:
        raise AudioEmpty(f"audio array is empty (shape {array.shape})")
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
                raise AudioTruncated(
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
