"""pipeline.audio: reading any soundfile format / bytes / arrays, resampling, channels, and clear errors."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline.audio import AudioError, load_audio, write_audio

CORPUS = "corpora/mini-speech/LibriSpeech"


@pytest.fixture(scope="module")
def speech(shared_dir) -> tuple[np.ndarray, Path]:
    """One corpus utterance (16 kHz flac) and its path."""
    path = sorted((shared_dir / CORPUS).rglob("*.flac"))[0]
    pcm, rate = sf.read(path, dtype="float32")
    assert rate == 16000
    return pcm, path


def test_reads_corpus_flac_like_pcm16(speech):
    pcm, path = speech
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_array_equal(out, pcm)  # 16 kHz in: no resampling, PCM-16 / 32768 exactly
    assert load_audio(str(path)).shape == out.shape
    np.testing.assert_array_equal(load_audio(path.read_bytes()), pcm)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_other_rates_and_formats_resample_to_16k(speech, tmp_path, rate, fmt):
    pcm, _ = speech
    resampled = soxr.resample(pcm, 16000, rate)
    path = tmp_path / f"clip_{rate}.{fmt}"
    sf.write(path, resampled, rate)
    out = load_audio(path)
    assert abs(len(out) - len(pcm)) <= 2
    assert np.abs(out).max() <= 1.0
    if fmt != "ogg":  # lossy codec: only the length is comparable
        n = min(len(out), len(pcm))
        # band-limited round trip (8 kHz keeps only < 4 kHz): the signal stays strongly correlated
        assert np.corrcoef(out[:n], pcm[:n])[0, 1] > (0.8 if rate == 8000 else 0.99)


def test_stereo_channel_zero_by_default_and_mix_down(tmp_path):
    rate = 48000
    t = np.arange(rate) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 1000 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="FLOAT")
    expect_left = soxr.resample(left.astype(np.float32), rate, 16000, quality="HQ")
    np.testing.assert_allclose(load_audio(path), expect_left, atol=1e-6)
    np.testing.assert_allclose(load_audio(path, channel=1), soxr.resample(right.astype(np.float32), rate, 16000),
                               atol=1e-6)
    mixed = soxr.resample(((left + right) / 2).astype(np.float32), rate, 16000)
    np.testing.assert_allclose(load_audio(path, channel=None), mixed, atol=1e-5)
    with pytest.raises(AudioError, match="channel 2 requested but the audio has 2 channel"):
        load_audio(path, channel=2)


def test_arrays_int_float_and_channel_layouts():
    pcm16 = (np.sin(np.arange(1600) / 5) * 20000).astype(np.int16)
    out = load_audio(pcm16, 16000)
    np.testing.assert_allclose(out, pcm16 / 32768.0, atol=1e-7)
    stereo_tc = np.stack([pcm16, -pcm16], axis=1)  # (T, C) as soundfile returns
    stereo_ct = stereo_tc.T  # (C, T) as torchaudio returns
    np.testing.assert_array_equal(load_audio(stereo_tc, 16000), out)
    np.testing.assert_array_equal(load_audio(stereo_ct, 16000), out)
    np.testing.assert_array_equal(load_audio(stereo_ct, 16000, channel=1), -out)
    assert len(load_audio(out, 8000)) == 2 * len(out)


def test_write_audio_roundtrip(tmp_path):
    pcm = (0.3 * np.sin(np.arange(22050) / 7)).astype(np.float32)
    for suffix in (".wav", ".flac"):
        path = write_audio(tmp_path / f"sub/out{suffix}", pcm, 22050)
        back, rate = sf.read(path, dtype="float32")
        assert rate == 22050 and sf.info(path).subtype == "PCM_16"
        np.testing.assert_allclose(back, pcm, atol=1 / 32768)
    with pytest.raises(AudioError, match="suffix"):
        write_audio(tmp_path / "out.mp4", pcm, 22050)
    with pytest.raises(AudioError, match="NaN"):
        write_audio(tmp_path / "nan.wav", np.array([np.nan, 0.0]), 22050)
    with pytest.raises(AudioError, match="sample_rate"):
        write_audio(tmp_path / "x.wav", pcm, 0)


def _wav_bytes(pcm: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, pcm, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _flac_bytes(pcm: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, pcm, rate, format="FLAC")
    return buffer.getvalue()


NOISE = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)


@pytest.mark.parametrize(
    "make_source, sample_rate, message",
    [
        (lambda d: d / "missing.wav", None, "audio file not found"),
        (lambda d: d, None, "not a file"),
        (lambda d: _touch(d / "empty.wav", b""), None, "empty \\(0 bytes\\)"),
        (lambda d: b"", None, "audio bytes are empty"),
        (lambda d: _touch(d / "notes.txt", b"just some text, not audio\n" * 40), None, "cannot decode .*not an audio"),
        (lambda d: b"\x00\x01garbage" * 50, None, "cannot decode audio bytes"),
        (lambda d: _touch(d / "cut.wav", _wav_bytes(NOISE)[:20000]), None, "truncated"),
        (lambda d: _flac_bytes(NOISE)[: len(_flac_bytes(NOISE)) // 2], None, "cannot decode|truncated"),
        (lambda d: _wav_bytes(NOISE)[:40], None, "cannot decode"),
        (lambda d: _wav_bytes(np.zeros(0, np.float32)), None, "no audio samples|empty"),
        (lambda d: np.zeros(0, np.float32), 16000, "empty"),
        (lambda d: np.array([0.1, np.nan, 0.2], np.float32), 16000, "NaN/inf"),
        (lambda d: np.array([0.1, np.inf], np.float32), 16000, "NaN/inf"),
        (lambda d: np.zeros((4, 4, 4), np.float32), 16000, "1-D or 2-D"),
        (lambda d: np.zeros((1000, 1000), np.float32), 16000, "channel axis"),
        (lambda d: np.array(["a", "b"]), 16000, "unsupported dtype"),
        (lambda d: NOISE * 30000, 16000, "peak"),
        (lambda d: NOISE, None, "sample_rate is required"),
        (lambda d: NOISE, -5, "sample_rate must be a positive"),
        (lambda d: _wav_bytes(NOISE), 8000, "sample_rate=8000 given but audio bytes is 16000 Hz"),
        (lambda d: 12345, None, "must be a path, bytes or a numpy array"),
    ],
)
def test_malformed_inputs_raise_specific_audio_errors(tmp_path, make_source, sample_rate, message):
    source = make_source(tmp_path)
    with pytest.raises(AudioError, match=message):
        load_audio(source, sample_rate)


def test_length_cap_is_checked_before_decoding_and_configurable(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, np.zeros(16000 * 12, np.float32), 16000)
    with pytest.raises(AudioError, match="12.0 s long, over the limit of max_seconds=10"):
        load_audio(path, max_seconds=10)
    assert len(load_audio(path, max_seconds=None)) == 16000 * 12
    with pytest.raises(AudioError, match="over the limit"):
        load_audio(np.zeros(16000 * 3, np.float32), 16000, max_seconds=2.5)
    with pytest.raises(AudioError, match="max_seconds"):
        load_audio(path, max_seconds=0)


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


def _touch(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
