"""Audio admission (pipeline.audio.admit_audio) under abuse: an audio-bomb battery — high rates, many channels,
long silent FLAC/OGG/WAV, lying headers — each refused quickly with bounded memory, directly and through the
endpoint's upload path (serve.uploads, in-process); typed errors, limits, spans, one decode per file."""
from __future__ import annotations

import asyncio
import io
import resource
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline.audio import (DEFAULT_LIMITS, AudioEmpty, AudioError, AudioLimits, AudioTooLarge, AudioTooLong,
                            AudioTooShort, AudioTruncated, AudioUnreadable, BadSampleRate, NonFiniteAudio,
                            TooManyChannels, admit_audio, load_audio, probe_audio)

MiB = 1 << 20
SERVE_CAP_S = 60.0  # the endpoint's default max_audio_seconds


def _encode(fmt: str, rate: int, channels: int, seconds: float, subtype: str | None = None) -> bytes:
    """Silence written block by block (never the whole decoded array in memory)."""
    buffer = io.BytesIO()
    block = np.zeros((max(1, min(int(rate * seconds), (1 << 20) // channels)), channels), np.float32)
    with sf.SoundFile(buffer, "w", rate, channels, format=fmt, subtype=subtype) as f:
        left = int(rate * seconds)
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    return buffer.getvalue()


def _flac_total_samples(data: bytes, total: int) -> bytes:
    """The FLAC with STREAMINFO's 36-bit total_samples set to `total` (0: "unknown", as a streamed FLAC)."""
    assert data[:4] == b"fLaC"
    patched = bytearray(data)
    field = int.from_bytes(patched[18:26], "big")
    patched[18:26] = ((field & ~((1 << 36) - 1)) | total).to_bytes(8, "big")
    return bytes(patched)


def _wav_header(rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    """A RIFF/WAVE header declaring `data_bytes` of PCM (the file holds only what the caller appends)."""
    import struct

    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_bytes))


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, type]]:
    """name -> (encoded bytes, the AudioError type admission must raise at the endpoint's limits)."""
    long_flac = _encode("FLAC", 16000, 1, 300.0)  # 5 min of silence: a few KB
    wide_flac = _encode("FLAC", 96000, 8, 30.0, "PCM_16")  # 88 MiB of float32 decoded
    return {
        # the issue's bomb (8 channels at 655 kHz, 59 s: 1.2 GB of float32 decoded) by its header: the file
        # holds 1 s (the whole 59 s, 337 KB, takes 10 s to write: test_the_issues_bomb, marked slow)
        "flac 655 kHz x 8 ch, 59 s": (_flac_total_samples(_encode("FLAC", 655350, 8, 1.0, "PCM_16"), 655350 * 59),
                                      BadSampleRate),
        "flac 96 kHz x 8 ch, 30 s": (wide_flac, AudioTooLarge),
        "flac 16 kHz x 1, 5 min silent": (long_flac, AudioTooLong),
        "ogg vorbis 16 kHz, 2 min silent": (_encode("OGG", 16000, 1, 120.0, "VORBIS"), AudioTooLong),
        "ogg opus 48 kHz, 2 min silent": (_encode("OGG", 48000, 1, 120.0, "OPUS"), AudioTooLong),
        "wav 8 kHz u8, 10 min silent": (_encode("WAV", 8000, 1, 600.0, "PCM_U8"), AudioTooLong),
        "wav 384 kHz header": (_wav_header(384000, 1, 384000 * 2) + bytes(384000 * 2), BadSampleRate),
        "wav 200 channels header": (_wav_header(16000, 200, 200 * 2 * 1600) + bytes(200 * 2 * 1600),
                                    TooManyChannels),
        # lying headers
        "flac declaring 10 h, holding 5 min": (_flac_total_samples(long_flac, 16000 * 36000), AudioTooLong),
        "flac hiding its length (total_samples 0), 5 min": (_flac_total_samples(long_flac, 0), AudioTooLong),
        "flac hiding its length, 96 kHz x 8 ch": (
            _flac_total_samples(wide_flac, 0), AudioTooLarge),
        "wav declaring 1 h of data, holding 1 s": (_wav_header(16000, 1, 16000 * 2 * 3600) + bytes(32000),
                                                   AudioTruncated),
        "wav declaring 8 ch at 655 kHz, holding 10 ms": (_wav_header(655350, 8, 655350 * 16 * 59)
                                                         + bytes(655350 * 16 // 100), BadSampleRate),
    }


def _measure(call) -> tuple[float, int, int, BaseException | None]:
    """(seconds, tracemalloc peak bytes, max-RSS growth bytes, the exception raised) of `call()`."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    start = time.perf_counter()
    raised = None
    try:
        call()
    except BaseException as err:  # noqa: BLE001 - returned to the caller
        raised = err
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before, raised


def test_bomb_battery_refused_fast_with_bounded_memory(bombs):
    """Each bomb is refused with its typed error in well under a second, the process' memory growing by less
    than 50 MB (tracemalloc peak: numpy's buffers; max RSS: everything, libsndfile included)."""
    limits = DEFAULT_LIMITS.with_(max_seconds=SERVE_CAP_S, max_decoded_bytes=64 * MiB)
    table = []
    for name, (data, expected) in bombs.items():
        elapsed, peak, rss, raised = _measure(lambda: admit_audio(data, limits=limits))
        table.append(f"{name}: {len(data)} bytes, {elapsed * 1000:.0f} ms, peak {peak / MiB:.1f} MiB, "
                     f"RSS +{rss / MiB:.1f} MiB -> {type(raised).__name__}")
        assert isinstance(raised, expected), (name, raised)
        assert elapsed < 1.0 and peak < 50 * MiB and rss < 50 * MiB, table[-1]
    print("\n".join(table))


def test_bombs_through_the_upload_path(bombs):
    """serve.uploads (in-process, no Serve): 413 for too long / too large naming the limit, 400 otherwise, in
    OpenAI's shape; decoding runs off the event loop (a ticker keeps ticking while a long clip decodes)."""
    from serve.api import APIError
    from serve.uploads import admit_upload, admit_upload_now

    for name, (data, expected) in bombs.items():
        elapsed, peak, rss, raised = _measure(lambda: admit_upload_now(data, SERVE_CAP_S, "file"))
        assert isinstance(raised, APIError), (name, raised)
        assert raised.status == (413 if expected.too_large else 400), (name, raised.status, raised.message)
        assert raised.param == "file" and raised.message.startswith("file: "), raised.message
        assert "object at 0x" not in raised.message
        if expected is AudioTooLong:
            assert raised.code == "max_audio_seconds" and f"max_audio_seconds={SERVE_CAP_S:g}" in raised.message
        assert elapsed < 1.0 and peak < 50 * MiB and rss < 50 * MiB, (name, elapsed, peak, rss)

    good = _encode("FLAC", 48000, 2, 50.0)  # a legal clip that takes a while to decode and resample

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        start = time.perf_counter()
        payload = await admit_upload(good, SERVE_CAP_S, "file")
        took = time.perf_counter() - start
        task.cancel()
        return payload, ticks, took

    payload, ticks, took = asyncio.run(run())
    assert payload.sample_rate == 16000 and abs(payload.seconds - 50.0) < 0.01
    assert ticks >= min(3, took / 0.005 / 4), (ticks, took)  # the loop ran while the clip decoded


@pytest.mark.slow
def test_the_issues_bomb():
    """The real 337 KB FLAC of issue 25 (8 channels at 655 kHz, 59 s of silence): refused by its header in
    milliseconds, directly and as an upload (400 naming max_sample_rate), memory flat."""
    from serve.api import APIError
    from serve.uploads import admit_upload_now

    data = _encode("FLAC", 655350, 8, 59.0, "PCM_16")
    assert len(data) < 400_000
    for call in (lambda: admit_audio(data), lambda: admit_upload_now(data, SERVE_CAP_S, "file")):
        elapsed, peak, rss, raised = _measure(call)
        assert isinstance(raised, (BadSampleRate, APIError)) and "max_sample_rate=96000" in str(raised)
        assert elapsed < 0.5 and peak < MiB and rss < 50 * MiB


def test_probe_reads_the_header_only(bombs):
    data, _ = bombs["flac 655 kHz x 8 ch, 59 s"]
    header = probe_audio(data, limits=None)
    assert (header.sample_rate, header.channels, header.frames) == (655350, 8, 655350 * 59)
    with pytest.raises(BadSampleRate, match="655350 Hz is over the limit of max_sample_rate=96000"):
        probe_audio(data)
    unknown = probe_audio(bombs["flac hiding its length (total_samples 0), 5 min"][0], limits=None)
    assert unknown.frames is None and unknown.seconds is None


def test_typed_errors_reasons_and_limit_names(tmp_path):
    with pytest.raises(AudioTooLong) as err:
        admit_audio(_encode("WAV", 16000, 1, 3.0), limits=AudioLimits(max_seconds=2.0))
    assert err.value.reason == "too_long" and err.value.limit == "max_seconds" and err.value.too_large
    assert "over the limit of max_seconds=2" in str(err.value)
    assert "over the limit of --max-seconds=2" in err.value.message({"max_seconds": "--max-seconds"})
    with pytest.raises(AudioTooShort, match="under the limit of min_seconds=0.5") as err:
        admit_audio(_encode("WAV", 16000, 1, 0.2), limits=AudioLimits(min_seconds=0.5))
    assert not err.value.too_large
    with pytest.raises(BadSampleRate) as err:
        admit_audio(_encode("WAV", 4000, 1, 1.0))
    assert err.value.reason == "low_sample_rate" and err.value.limit == "min_sample_rate"
    with pytest.raises(AudioEmpty):
        admit_audio(b"")
    with pytest.raises(AudioUnreadable, match="cannot decode"):
        admit_audio(b"not audio at all" * 10)
    with pytest.raises(NonFiniteAudio):
        admit_audio(np.array([0.0, np.inf], np.float32), 16000)
    assert all(issubclass(t, AudioError) and issubclass(t, ValueError)
               for t in (AudioTooLong, AudioTooLarge, BadSampleRate, TooManyChannels, AudioTruncated))
    with pytest.raises(ValueError, match="min_seconds < max_seconds"):
        AudioLimits(min_seconds=5, max_seconds=1)
    with pytest.raises(ValueError, match="max_seconds must be a positive finite"):
        AudioLimits(max_seconds=float("nan"))
    import pickle

    again = pickle.loads(pickle.dumps(err.value))  # crosses Ray as itself
    assert type(again) is BadSampleRate and again.limit == "min_sample_rate" and str(again) == str(err.value)


def test_span_channels_and_streamed_resampling_equal_the_whole(tmp_path):
    """Only the span's frames are read; a down-mix or channel pick and the block-wise resampling equal doing
    it on the whole decoded file."""
    rate = 44100
    t = np.arange(rate * 3) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 660 * t)], 1).astype(np.float32)
    path = tmp_path / "s.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    whole = admit_audio(path, channel=None)
    np.testing.assert_array_equal(
        whole.pcm, soxr.resample(stereo.mean(axis=1, dtype=np.float64).astype(np.float32), rate, 16000, "HQ"))
    assert whole.conversions(None) == ["resampled 44100 Hz", "mixed 2 channels"]
    span = admit_audio(path, channel=1, start=1.0, duration=0.5)
    np.testing.assert_allclose(span.pcm, soxr.resample(stereo[rate:rate + rate // 2, 1], rate, 16000, "HQ"),
                               atol=1e-6)
    with pytest.raises(AudioTruncated, match="lies beyond"):
        admit_audio(path, start=2.9, duration=1.0)
    # a stream that hides its length decodes to the same samples as the file that gives it
    flac = _encode("FLAC", 22050, 1, 2.0)
    assert np.array_equal(admit_audio(_flac_total_samples(flac, 0)).pcm, admit_audio(flac).pcm)
    assert np.array_equal(load_audio(flac), admit_audio(flac).pcm)


def test_load_waveform_takes_an_admitted_clip_as_is():
    """The request path (actors.payloads.load_waveform) passes an AudioPayload the front end admitted: a clip is
    decoded once."""
    from actors.payloads import AudioPayload, load_waveform

    payload = AudioPayload(np.zeros(1600, np.float32), 16000, "clip")
    assert load_waveform(payload) is payload
    with pytest.raises(AudioError, match="at 8000 Hz"):
        load_waveform(AudioPayload(np.zeros(800, np.float32), 8000, "clip"))
    with pytest.raises(BadSampleRate):
        load_waveform(_encode("FLAC", 655350, 8, 1.0, "PCM_16"))


def test_prepare_rates_and_channels_as_the_readme_says(tmp_path):
    """README's prepare section and jobs.prepare.checks agree: other rates are resampled to 16 kHz (noted in
    `converted`, counted in report.md), multi-channel audio keeps channel 0 by default (`--channels mix`
    averages, `--channels reject` refuses), and an error row's detail names the flag that accepts the file."""
    from pathlib import Path

    import cli.prepare
    from jobs.prepare.checks import AudioChecks, Reject, read_checked
    from jobs.prepare.recipes import LJSPEECH_RATE, AudioRef

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    for promise in ("are resampled to 16 kHz", "multi-channel audio keeps channel 0 like the original tokenizer",
                    "`--channels mix`", "`--channels reject`", "`report.md` count what was resampled or down-mixed",
                    "names the flag that accepts the file"):
        assert promise in readme, promise
    import argparse

    parser = argparse.ArgumentParser()
    cli.prepare.add_arguments(parser, "prepare")  # the CLI's default is the library's
    assert parser.parse_args(["--out", "x", "--source", "ljspeech:x"]).channels == AudioChecks().channels == "first"

    rng = np.random.default_rng(1)
    speech = (0.1 * rng.standard_normal(LJSPEECH_RATE * 2)).astype(np.float32)
    lj = tmp_path / "lj.wav"
    sf.write(lj, speech, LJSPEECH_RATE)
    wave, converted = read_checked(AudioRef(str(lj), sample_rate=LJSPEECH_RATE), AudioChecks())
    assert converted == ["resampled 22050 Hz"] and abs(len(wave) - 32000) <= 1
    cv = tmp_path / "cv48k.wav"  # a 48 kHz file in a corpus that declares 16 kHz: resampled too
    sf.write(cv, soxr.resample(speech, LJSPEECH_RATE, 48000), 48000)
    assert read_checked(AudioRef(str(cv), sample_rate=16000), AudioChecks())[1] == ["resampled 48000 Hz"]

    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([speech, -0.5 * speech], 1), LJSPEECH_RATE)
    wave, converted = read_checked(AudioRef(str(stereo)), AudioChecks())
    assert converted == ["resampled 22050 Hz", "channel 0 of 2"]
    np.testing.assert_allclose(wave, soxr.resample(speech, LJSPEECH_RATE, 16000, "HQ"), atol=1e-4)
    assert read_checked(AudioRef(str(stereo)), AudioChecks(channels="mix"))[1][-1] == "mixed 2 channels"
    with pytest.raises(Reject) as err:
        read_checked(AudioRef(str(stereo)), AudioChecks(channels="reject"))
    assert err.value.reason == "multichannel" and "--channels first" in err.value.detail

    low = tmp_path / "low.wav"
    sf.write(low, speech[:8000], 8000)
    with pytest.raises(Reject) as err:
        read_checked(AudioRef(str(low)), AudioChecks())
    assert err.value.reason == "low_sample_rate" and "--min-sample-rate=16000" in err.value.detail
    assert read_checked(AudioRef(str(low)), AudioChecks(min_sample_rate=None))[1] == ["resampled 8000 Hz"]
    long = tmp_path / "long.flac"
    long.write_bytes(_encode("FLAC", 16000, 1, 120.0))
    with pytest.raises(Reject) as err:
        read_checked(AudioRef(str(long)), AudioChecks())
    assert err.value.reason == "too_long" and "--max-seconds=60" in err.value.detail
    bomb = tmp_path / "bomb.flac"
    bomb.write_bytes(_encode("FLAC", 655350, 8, 5.0, "PCM_16"))
    with pytest.raises(Reject) as err:
        read_checked(AudioRef(str(bomb)), AudioChecks())
    assert err.value.reason == "high_sample_rate"


def test_bombs_on_every_route_that_takes_audio(bombs, tiny_models):
    """The ingress in-process (its FastAPI app over a LocalPipeline, no Serve): transcriptions, chat
    `input_audio` and voice uploads refuse each bomb in under a second, in OpenAI's error shape, the process'
    memory growing by less than 50 MB; a good clip is still transcribed afterwards."""
    import base64

    import serve_testing

    if not hasattr(serve_testing, "local_ingress"):
        pytest.skip("serve_testing.local_ingress (the in-process ingress) is not in this tree yet")
    names = ["flac 655 kHz x 8 ch, 59 s", "flac 96 kHz x 8 ch, 30 s", "flac 16 kHz x 1, 5 min silent",
             "ogg vorbis 16 kHz, 2 min silent", "flac hiding its length (total_samples 0), 5 min",
             "flac hiding its length, 96 kHz x 8 ch", "wav declaring 8 ch at 655 kHz, holding 10 ms"]

    def routes(data: bytes):
        audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}
        yield "transcriptions", "file", lambda c: c.post(
            "/v1/audio/transcriptions", data={"model": "vita-audio"}, files={"file": ("a.flac", data, "audio/flac")})
        yield "chat", "messages.input_audio", lambda c: c.post(
            "/v1/chat/completions", json={"model": "vita-audio", "messages": [{"role": "user", "content": [audio_part]}]})
        yield "voices", "audio_sample", lambda c: c.post(
            "/v1/audio/voices", data={"name": "bomb"}, files={"audio_sample": ("v.flac", data, "audio/flac")})

    table = []
    with serve_testing.local_ingress(tiny_models) as client:
        client.post("/v1/audio/transcriptions", data={"model": "vita-audio"},
                    files={"file": ("a.wav", serve_testing.clip(), "audio/wav")})  # warm: later growth is the bombs'
        for name in names:
            data, expected = bombs[name]
            for route, param, send in routes(data):
                responses = []
                elapsed, peak, rss, raised = _measure(lambda: responses.append(send(client)))
                assert raised is None, (name, route, raised)
                r = responses[0]
                assert r.status_code == (413 if expected.too_large else 400), (name, route, r.text)
                error = r.json()["error"]
                assert set(error) >= {"message", "type", "param", "code"} and error["param"] == param, error
                assert elapsed < 1.0 and peak < 50 * MiB and rss < 50 * MiB, (name, route, elapsed, peak, rss)
                table.append(f"{route} {name}: {r.status_code} {error['code'] or ''} in {elapsed * 1000:.0f} ms, "
                             f"peak {peak / MiB:.1f} MiB, RSS +{rss / MiB:.1f} MiB")
        print("\n".join(table))
        r = client.post("/v1/audio/transcriptions", data={"model": "vita-audio"},
                        files={"file": ("a.wav", serve_testing.clip(), "audio/wav")})
        assert r.status_code == 200 and "text" in r.json()


def test_realtime_helpers_use_the_same_limits():
    """What realtime needs from admission: the 8-96 kHz input rate rule (400 naming the field) and raw pcm16
    admitted off the loop to the same samples as its 16-bit wav."""
    from serve.api import APIError
    from serve.uploads import admit_pcm16, admit_upload_now, check_sample_rate

    assert (DEFAULT_LIMITS.min_sample_rate, DEFAULT_LIMITS.max_sample_rate) == (8000, 96000)
    for rate in (8000, 24000, 96000):
        check_sample_rate(rate, "session.audio.input.format.rate")
    for rate in (7999, 96001, 655350):
        with pytest.raises(APIError) as err:
            check_sample_rate(rate, "session.audio.input.format.rate")
        assert err.value.status == 400 and err.value.param == "session.audio.input.format.rate"
    pcm16 = (np.sin(np.arange(24000) / 7) * 12000).astype("<i2")
    buffer = io.BytesIO()
    sf.write(buffer, pcm16, 24000, format="WAV", subtype="PCM_16")
    payload = asyncio.run(admit_pcm16(pcm16.tobytes(), 24000, 60.0, "audio"))
    np.testing.assert_array_equal(payload.pcm, admit_upload_now(buffer.getvalue(), 60.0, "audio").pcm)
    with pytest.raises(APIError) as err:
        asyncio.run(admit_pcm16(bytes(2 * 8000 * 3), 8000, 2.0, "audio"))
    assert err.value.status == 413 and err.value.code == "max_audio_seconds"


def test_admit_input_is_what_the_cli_passes_on(tmp_path):
    """actors.payloads.admit_input: one decode, the front end's flag names in the InputError, the typed cause."""
    from actors.errors import InputError
    from actors.payloads import admit_input, load_waveform

    path = tmp_path / "a.flac"
    path.write_bytes(_encode("FLAC", 22050, 2, 3.0))
    payload = admit_input(path, max_seconds=10, min_seconds=0.1)
    assert payload.sample_rate == 16000 and payload.seconds == pytest.approx(3.0) and load_waveform(payload) is payload
    with pytest.raises(InputError, match="over the limit of --max-audio-seconds=2") as err:
        admit_input(path, max_seconds=2, names={"max_seconds": "--max-audio-seconds"}, field="AUDIO")
    assert isinstance(err.value.__cause__, AudioTooLong) and err.value.field == "AUDIO"
    with pytest.raises(InputError, match="under the limit of min_seconds=5"):
        admit_input(path, max_seconds=10, min_seconds=5)
