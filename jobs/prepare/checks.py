"""Audio checks of corpus preparation: one audio reference -> a checked 16 kHz mono waveform, or a `Reject`.

An audio may also be a tar member, a Parquet row or an object on a store (`jobs.archives`: read in place).
Reading is the one audio admission, `pipeline.audio.admit_audio` (soundfile + soxr, the loader of the speech
encoder, so a sample's codes are what the encoder gives for that file): the header is checked first (rate,
channels, length: nothing decoded when it is refused), the file is decoded once, only the span a manifest asks
for. What is rejected (an error row with a reason; its detail names the flag that accepts the file, where one
does) and what is converted (the sample's `converted` column, counted in report.md):

| input                                   | outcome                                                           |
|-----------------------------------------|-------------------------------------------------------------------|
| missing file                            | rejected `missing_file`                                           |
| empty (0 bytes, no samples)             | rejected `empty`                                                  |
| truncated (header announces more)       | rejected `truncated`                                              |
| not audio / undecodable                 | rejected `unreadable`                                             |
| NaN or inf samples                      | rejected `non_finite`                                             |
| rate below `min_sample_rate` (16 kHz)   | rejected `low_sample_rate` (`--min-sample-rate`): upsampling cannot restore the band |
| any other rate (22.05 kHz LJSpeech, 48 kHz Common Voice, a 48 kHz file in a 16 kHz corpus) | converted: resampled to 16 kHz (`resampled 22050 Hz`), as Lhotse and NeMo do |
| several channels                        | converted: channel 0 kept, as the original tokenizer does (`channel 0 of 2`); `channels="mix"`: averaged; `"reject"`: rejected `multichannel` (`--channels first` accepts it) |
| shorter than `min_seconds` / longer than `max_seconds` | rejected `too_short` / `too_long` (`--min-seconds` / `--max-seconds`), longer ones by the header |
| over 96 kHz, over 8 channels, too large to decode | rejected `high_sample_rate`, `too_many_channels`, `too_large` (audio bombs) |
| RMS below `silence_rms`                 | rejected `silent`                                                 |
| over `max_clipped_fraction` of samples at full scale | rejected `clipped`                                   |
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from jobs import archives
from jobs.storage import is_remote

TARGET_RATE = 16000
CHANNEL_POLICIES = ("first", "mix", "reject")
_FULL_SCALE = 0.999
# the limits of admission under the names of `vita-audio prepare`'s flags (an error row names the one to change)
FLAGS = {"max_seconds": "--max-seconds", "min_seconds": "--min-seconds", "min_sample_rate": "--min-sample-rate"}


@dataclass(frozen=True)
class AudioChecks:
    min_seconds: float = 0.3
    max_seconds: float = 60.0
    min_sample_rate: int | None = TARGET_RATE  # None: upsample anything
    silence_rms: float = 1e-4  # about -80 dBFS
    max_clipped_fraction: float = 0.01
    channels: str = "first"  # several channels: keep channel 0 (the original tokenizer), "mix" or "reject"

    def __post_init__(self):
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds} and {self.max_seconds}")
        if self.channels not in CHANNEL_POLICIES:
            raise ValueError(f"channels={self.channels!r}; expected one of {CHANNEL_POLICIES}")
        if not 0 <= self.max_clipped_fraction <= 1 or self.silence_rms < 0:
            raise ValueError("max_clipped_fraction must lie in [0, 1] and silence_rms be >= 0")
        self.limits()  # the rates and seconds make valid admission limits

    def limits(self):
        """The admission limits of these checks (`pipeline.audio.AudioLimits`)."""
        from pipeline.audio import DEFAULT_LIMITS

        return DEFAULT_LIMITS.with_(min_seconds=self.min_seconds, max_seconds=self.max_seconds,
                                    min_sample_rate=self.min_sample_rate or 1)


class Reject(Exception):
    """An input that cannot be a training sample: `reason` (a short category) and a message naming the problem."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_checked(ref, checks: AudioChecks) -> tuple[np.ndarray, list[str]]:
    """The 16 kHz mono float32 waveform of `ref` (a recipes.AudioRef) and what was converted ("resampled
    22050 Hz", "channel 0 of 2"); a Reject otherwise. The file is decoded once (only `ref`'s span)."""
    from pipeline.audio import AudioError, admit_audio, probe_audio

    path = ref.path
    source = path
    if archives.split(path) is not None or is_remote(path):  # a tar member, a Parquet row, an object
        try:
            source = archives.read_audio(path)
        except FileNotFoundError as err:
            raise Reject("missing_file", str(err)) from None
        except (OSError, ValueError) as err:
            raise Reject("unreadable", f"{path}: {err}") from None
    elif not os.path.isfile(path):
        raise Reject("missing_file", f"{path}: no such file")
    channel = ref.channel if ref.channel is not None else (None if checks.channels == "mix" else 0)
    try:
        if checks.channels == "reject" and ref.channel is None:
            channels = probe_audio(source, limits=None, name=path).channels
            if channels > 1:
                raise Reject("multichannel", f"{path}: {channels} channels (--channels reject); --channels first "
                                             "keeps channel 0, --channels mix averages them")
        audio = admit_audio(source, limits=checks.limits(), target_sample_rate=TARGET_RATE, channel=channel,
                            start=ref.offset or 0.0, duration=ref.duration, name=path)
    except AudioError as err:
        raise Reject("unreadable" if err.reason == "bad_audio" else err.reason, err.message(FLAGS)) from None
    _check_signal(audio.pcm, checks, path)
    return audio.pcm, audio.conversions(channel)


def content_hash(waves: list[np.ndarray]) -> str:
    """sha1 of the 16 kHz audio as 16-bit samples (the same speech in WAV and FLAC hashes alike)."""
    digest = hashlib.sha1()
    for wave in waves:
        digest.update(np.round(np.asarray(wave) * 32767).astype("<i2").tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _check_signal(wave: np.ndarray, checks: AudioChecks, path: str) -> None:
    """Silence and clipping of the 16 kHz waveform (its length was admission's, at the source rate)."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    if rms < checks.silence_rms:
        raise Reject("silent", f"{path}: RMS {rms:.2e}, under silence_rms={checks.silence_rms:g}")
    clipped = float(np.mean(np.abs(wave) >= _FULL_SCALE))
    if clipped > checks.max_clipped_fraction:
        raise Reject("clipped", f"{path}: {clipped:.1%} of samples at full scale "
                                f"(max_clipped_fraction={checks.max_clipped_fraction:g})")
