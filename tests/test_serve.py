"""The Serve app through the official openai SDK on 127.0.0.1 (a free port), against the in-process pipeline:
speech, transcriptions, voices, the hostile battery over every route (each a 4xx in OpenAI's error shape naming
the problem; the server healthy and correct afterwards), and a client that goes away mid-stream freeing its
LLM request and decoder stream. (Chat: tests/test_serve_chat.py.)"""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from serve.audio_formats import pcm_24k
from serve_testing import API_KEY, clip, int16 as _int16, text_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "Hello there."
ASR_TOKENS = 24


@pytest.fixture(scope="module")
def client(serve_url):
    import openai

    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_tts(local):
    from actors.results import collect

    return collect(local.tts(TEXT, max_new_tokens=64))


@pytest.fixture(scope="module")
def local_asr(local):
    """(text, text ids, Done) of the reference transcription of clip()."""
    return text_ids(local.asr(clip(), max_new_tokens=ASR_TOKENS))


def test_speech_wav_matches_pipeline(client, local_tts):
    assert local_tts.ok and len(local_tts.pcm)
    audio = client.audio.speech.create(model="vita-audio", voice="alloy", input=TEXT, response_format="wav",
                                       extra_body={"max_new_tokens": 64})
    pcm, rate = soundfile.read(io.BytesIO(audio.content), dtype="int16")
    assert rate == local_tts.sample_rate
    np.testing.assert_array_equal(pcm, _int16(local_tts.pcm))


@pytest.mark.parametrize("fmt,ctype,rate", [("mp3", "audio/mpeg", None), ("opus", "audio/ogg", 48000)])
def test_speech_lossy_formats_decode_to_the_pipelines_audio(client, local_tts, fmt, ctype, rate):
    """mp3 / opus (libsndfile encodes them): the clip decodes, at the expected rate, as long as the pipeline's
    audio, and its loudness is the pipeline's (lossy: no sample equality)."""
    with client.audio.speech.with_streaming_response.create(model="vita-audio", voice="alloy", input=TEXT,
                                                            response_format=fmt,
                                                            extra_body={"max_new_tokens": 64}) as response:
        assert response.headers["content-type"] == ctype
        data = response.read()
    pcm, got_rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert got_rate == (rate or local_tts.sample_rate)
    assert len(pcm) / got_rate == pytest.approx(len(local_tts.pcm) / local_tts.sample_rate, abs=0.08)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    assert rms(pcm) == pytest.approx(rms(local_tts.pcm), rel=0.35)


def test_speech_streamed_pcm_matches_pipeline(client, local_tts):
    with client.audio.speech.with_streaming_response.create(
            model="vita-audio", voice="default", input=TEXT, response_format="pcm",
            extra_body={"max_new_tokens": 64}) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        data = b"".join(response.iter_bytes())
    assert data == pcm_24k(local_tts.pcm, local_tts.sample_rate)  # OpenAI's pcm rate, one soxr stream


def test_speech_sse_events(serve_url, local_tts):
    import base64
    import json

    import httpx

    r = httpx.post(f"{serve_url}/v1/audio/speech", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                   json={"model": "vita-audio", "input": TEXT, "response_format": "pcm", "stream_format": "sse",
                         "max_new_tokens": 64})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert audio == pcm_24k(local_tts.pcm, local_tts.sample_rate)


def test_models_and_health(client, serve_url):
    import httpx

    assert [m.id for m in client.models.list()] == ["vita-audio"]
    health = httpx.get(f"{serve_url}/health", timeout=30).json()
    assert health["status"] == "ok" and set(health["stages"]) == {"encoder", "llm", "decoder"}


BAD = [
    ("no auth", {}, {"model": "vita-audio", "input": "hi"}, 401, "API key"),
    ("unknown model", None, {"model": "gpt-x", "input": "hi"}, 404, "gpt-x"),
    ("empty input", None, {"model": "vita-audio", "input": "  "}, 400, "input"),
    ("missing input", None, {"model": "vita-audio"}, 400, "input"),
    ("wrong type", None, {"model": "vita-audio", "input": 5}, 400, "input"),
    ("unknown field", None, {"model": "vita-audio", "input": "hi", "bogus": 1}, 400, "bogus"),
    ("bad format", None, {"model": "vita-audio", "input": "hi", "response_format": "xyz"}, 400, "response_format"),
    ("unknown voice", None, {"model": "vita-audio", "input": "hi", "voice": "nobody"}, 400, "nobody"),
    ("speed", None, {"model": "vita-audio", "input": "hi", "speed": 2.0}, 400, "speed"),
    ("huge text", None, {"model": "vita-audio", "input": "a" * 500}, 400, "max_text_chars"),
    ("absurd tokens", None, {"model": "vita-audio", "input": "hi", "max_new_tokens": 10**6}, 400, "max_tokens"),
    ("negative tokens", None, {"model": "vita-audio", "input": "hi", "max_new_tokens": -1}, 400, "max_new_tokens"),
    ("huge body", None, {"model": "vita-audio", "input": "a" * 500_000}, 413, "max_body_bytes"),
]


@pytest.mark.parametrize("name,headers,body,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_speech_requests_are_4xx_in_openai_shape(serve_url, name, headers, body, status, needle):
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    r = httpx.post(f"{serve_url}/v1/audio/speech", json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and set(error) >= {"message", "type", "param", "code"}


@pytest.mark.parametrize("content,ctype,status", [(b"{not json", "application/json", 400),
                                                  (b"[1,2]", "application/json", 400),
                                                  (b"input=hi", "text/plain", 415),
                                                  (b"\xff\xfe", "application/json", 400)])
def test_broken_bodies_are_4xx(serve_url, content, ctype, status):
    import httpx

    r = httpx.post(f"{serve_url}/v1/audio/speech", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": ctype})
    assert r.status_code == status and "error" in r.json()


# -- transcriptions ---------------------------------------------------------------------------------------


def test_transcription_json_matches_pipeline(client, local_asr):
    text, _, done = local_asr
    assert done is not None and text
    result = client.audio.transcriptions.create(model="vita-audio", file=("clip.wav", clip(), "audio/wav"),
                                                extra_body={"max_new_tokens": ASR_TOKENS})
    assert result.text == text
    assert result.usage.type == "tokens" and result.usage.output_tokens == len(done.token_ids)
    assert result.usage.input_token_details.audio_tokens == done.usage["encoder"]["codes"] > 0


def test_transcription_text_and_verbose_json(client, local_asr):
    text, ids, done = local_asr
    plain = client.audio.transcriptions.create(model="vita-audio", file=("clip.wav", clip(), "audio/wav"),
                                               response_format="text", extra_body={"max_new_tokens": ASR_TOKENS})
    assert plain == text
    verbose = client.audio.transcriptions.create(model="vita-audio", file=("clip.wav", clip(), "audio/wav"),
                                                 response_format="verbose_json", timestamp_granularities=["segment"],
                                                 extra_body={"max_new_tokens": ASR_TOKENS})
    assert verbose.text == text and verbose.duration == pytest.approx(1.0, abs=1e-3)
    assert verbose.token_ids == done.token_ids  # every generated id, as the pipeline's (extension field)
    assert len(verbose.segments) == 1 and verbose.segments[0].text == text


def test_transcription_segment_tokens_are_the_pipelines_text_ids(client, local_asr):
    _, ids, _ = local_asr
    verbose = client.audio.transcriptions.create(model="vita-audio", file=("clip.wav", clip(), "audio/wav"),
                                                 response_format="verbose_json",
                                                 extra_body={"max_new_tokens": ASR_TOKENS})
    assert verbose.segments[0].tokens == ids


def test_transcription_streamed_events(client, local_asr):
    text, _, done = local_asr
    stream = client.audio.transcriptions.create(model="vita-audio", file=("clip.wav", clip(), "audio/wav"),
                                                stream=True, extra_body={"max_new_tokens": ASR_TOKENS})
    events = list(stream)
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) > 1
    assert events[-1].type == "transcript.text.done" and events[-1].text == text
    assert "".join(e.delta for e in events[:-1]) == text
    assert events[-1].usage.output_tokens == len(done.token_ids)


def test_transcription_of_flac_at_another_rate(client, local):
    data = clip(rate=22050, fmt="FLAC", seed=3)
    text, _, _ = text_ids(local.asr(data, max_new_tokens=ASR_TOKENS))
    result = client.audio.transcriptions.create(model="vita-audio", file=("clip.flac", data, "audio/flac"),
                                                extra_body={"max_new_tokens": ASR_TOKENS})
    assert result.text == text


# -- voices -----------------------------------------------------------------------------------------------


def test_voice_upload_list_use_and_delete(client, serve_url, local):
    import httpx

    from actors.results import collect

    auth = {"Authorization": f"Bearer {API_KEY}"}
    sample = clip(seconds=1.5, seed=7)
    voice = client.audio.voices.create(audio_sample=("me.wav", sample, "audio/wav"), name="me", consent="cons_test")
    assert voice.id.startswith("voice_") and voice.name == "me" and voice.type == "audio_sample"
    listing = httpx.get(f"{serve_url}/v1/audio/voices", headers=auth, timeout=30).json()
    assert {"default", "me"} <= set(listing["voices"]) and listing["aliases"]["alloy"] == "default"  # (others'
    # uploads may be there too: the app serves several test modules)
    # the uploaded clip is the voice prompt: the same audio as the pipeline given that clip as `voice`
    expected = collect(local.tts(TEXT, voice=sample, max_new_tokens=48))
    for ref in ("me", {"id": voice.id}):
        audio = client.audio.speech.create(model="vita-audio", voice=ref, input=TEXT, response_format="wav",
                                           extra_body={"max_new_tokens": 48})
        pcm, _ = soundfile.read(io.BytesIO(audio.content), dtype="int16")
        np.testing.assert_array_equal(pcm, _int16(expected.pcm))
    client.audio.voices.delete(voice.id)
    r = httpx.post(f"{serve_url}/v1/audio/speech", headers=auth, timeout=30,
                   json={"model": "vita-audio", "input": TEXT, "voice": "me"})
    assert r.status_code == 400 and "unknown voice 'me'" in r.json()["error"]["message"]


# -- the hostile battery over every route ------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _chat(**fields) -> dict:
    return {"model": "vita-audio", "messages": [{"role": "user", "content": "hi"}], **fields}


def _audio_msg(data_b64: str, fmt: str = "wav") -> list:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data_b64, "format": fmt}}]}]


def _form(model="vita-audio", **fields) -> dict:
    return {"model": model, **fields}


GOOD = clip()
TRUNCATED = GOOD[: len(GOOD) // 2]
LONG = clip(seconds=9.0)  # over max_audio_seconds=6, under max_body_bytes=400_000
MULTIPART_GARBAGE = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc"  # no closing boundary

# (name, method, path, request kwargs for httpx, status, needle in the message)
HOSTILE = [
    # transcriptions
    ("asr no file", "POST", "/v1/audio/transcriptions", {"files": {"model": (None, "vita-audio")}}, 400,
     "file is required"),
    ("asr urlencoded form", "POST", "/v1/audio/transcriptions", {"data": _form()}, 415, "multipart"),
    ("asr multipart without boundary", "POST", "/v1/audio/transcriptions",
     {"content": b"x", "headers": {**AUTH, "Content-Type": "multipart/form-data"}}, 400, "multipart"),
    ("asr not audio", "POST", "/v1/audio/transcriptions",
     {"data": _form(), "files": {"file": ("a.wav", b"this is not audio at all", "audio/wav")}}, 400, "cannot decode"),
    ("asr truncated wav", "POST", "/v1/audio/transcriptions",
     {"data": _form(), "files": {"file": ("a.wav", TRUNCATED, "audio/wav")}}, 400, "truncated"),
    ("asr empty file", "POST", "/v1/audio/transcriptions",
     {"data": _form(), "files": {"file": ("a.wav", b"", "audio/wav")}}, 400, "empty"),
    ("asr too long", "POST", "/v1/audio/transcriptions",
     {"data": _form(), "files": {"file": ("a.wav", LONG, "audio/wav")}}, 413, "max_audio_seconds=6"),
    ("asr unknown model", "POST", "/v1/audio/transcriptions",
     {"data": _form(model="whisper-1"), "files": {"file": ("a.wav", GOOD, "audio/wav")}}, 404, "whisper-1"),
    ("asr bad format", "POST", "/v1/audio/transcriptions",
     {"data": _form(response_format="diarized_json"), "files": {"file": ("a.wav", GOOD, "audio/wav")}}, 400,
     "response_format"),
    ("asr json body", "POST", "/v1/audio/transcriptions", {"json": {"model": "vita-audio"}}, 415, "multipart"),
    ("asr negative temperature", "POST", "/v1/audio/transcriptions",
     {"data": _form(temperature="-1"), "files": {"file": ("a.wav", GOOD, "audio/wav")}}, 400, "temperature"),
    ("asr temperature not a number", "POST", "/v1/audio/transcriptions",
     {"data": _form(temperature="hot"), "files": {"file": ("a.wav", GOOD, "audio/wav")}}, 400, "temperature"),
    ("asr unknown field", "POST", "/v1/audio/transcriptions",
     {"data": _form(bogus="1"), "files": {"file": ("a.wav", GOOD, "audio/wav")}}, 400, "bogus"),
    ("asr absurd tokens", "POST", "/v1/audio/transcriptions",
     {"data": _form(max_new_tokens="99999999"), "files": {"file": ("a.wav", GOOD, "audio/wav")}}, 400, "max_tokens"),
    ("asr word timestamps", "POST", "/v1/audio/transcriptions",
     {"data": _form(**{"timestamp_granularities[]": "word"}), "files": {"file": ("a.wav", GOOD, "audio/wav")}},
     400, "timestamp_granularities"),
    ("asr oversized upload", "POST", "/v1/audio/transcriptions",
     {"data": _form(), "files": {"file": ("a.wav", b"\0" * 450_000, "audio/wav")}}, 413, "max_body_bytes"),
    ("asr broken multipart", "POST", "/v1/audio/transcriptions",
     {"content": MULTIPART_GARBAGE, "headers": {**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}},
     400, "file"),
    ("asr no auth", "POST", "/v1/audio/transcriptions",
     {"data": _form(), "files": {"file": ("a.wav", GOOD, "audio/wav")}, "headers": {}}, 401, "API key"),
    # chat
    ("chat no messages", "POST", "/v1/chat/completions", {"json": _chat(messages=[])}, 400, "messages"),
    ("chat messages not a list", "POST", "/v1/chat/completions", {"json": _chat(messages="hi")}, 400, "messages"),
    ("chat bad base64", "POST", "/v1/chat/completions", {"json": _chat(messages=_audio_msg("%%%not base64"))},
     400, "base64"),
    ("chat broken audio", "POST", "/v1/chat/completions", {"json": _chat(messages=_audio_msg(_b64(b"RIFFjunk")))},
     400, "cannot decode"),
    ("chat truncated audio", "POST", "/v1/chat/completions", {"json": _chat(messages=_audio_msg(_b64(TRUNCATED)))},
     400, "truncated"),
    ("chat audio too long", "POST", "/v1/chat/completions",
     {"json": _chat(messages=_audio_msg(_b64(clip(seconds=7.0))))}, 413, "max_audio_seconds"),
    ("chat audio too long in total", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": [
         {"type": "input_audio", "input_audio": {"data": _b64(clip(seconds=3.5)), "format": "wav"}}] * 2}])},
     413, "7.0 s of audio, over max_audio_seconds=6"),
    ("chat audio format", "POST", "/v1/chat/completions", {"json": _chat(messages=_audio_msg(_b64(GOOD), "aiff"))},
     400, "format"),
    ("chat too many messages", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": "a"}] * 600)}, 400, "limit of 512"),
    ("chat tool role", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "tool", "content": "x"}])}, 400, "role"),
    ("chat ends with assistant", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])},
     400, "last message"),
    ("chat modality", "POST", "/v1/chat/completions", {"json": _chat(modalities=["video"])}, 400, "modalities"),
    ("chat n=2", "POST", "/v1/chat/completions", {"json": _chat(n=2)}, 400, "n"),
    ("chat absurd max_tokens", "POST", "/v1/chat/completions", {"json": _chat(max_tokens=10**7)}, 400, "max_tokens"),
    ("chat negative max_tokens", "POST", "/v1/chat/completions", {"json": _chat(max_tokens=-5)}, 400, "max_tokens"),
    ("chat image part", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])},
     400, "image_url"),
    ("chat streamed wav", "POST", "/v1/chat/completions",
     {"json": _chat(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, stream=True)},
     400, "pcm16"),
    ("chat unknown voice", "POST", "/v1/chat/completions",
     {"json": _chat(modalities=["text", "audio"], audio={"voice": "nobody", "format": "wav"})}, 400, "nobody"),
    ("chat huge text", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": "a" * 5000}])}, 400, "max_text_chars"),
    ("chat absurd temperature", "POST", "/v1/chat/completions", {"json": _chat(temperature=50)}, 400, "temperature"),
    ("chat unknown audio id", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "audio": {"id": "audio_x"}},
                              {"role": "user", "content": "b"}])}, 400, "audio_x"),
    ("chat audio placeholder", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": "say <|audio|>"}])}, 400, "<|audio|>"),
    ("chat unknown field", "POST", "/v1/chat/completions", {"json": _chat(tools=[])}, 400, "tools"),
    ("chat content a number", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": 5}])}, 400, "content"),
    ("chat unknown model", "POST", "/v1/chat/completions", {"json": _chat(model="gpt-4o")}, 404, "gpt-4o"),
    ("chat bad json", "POST", "/v1/chat/completions",
     {"content": b'{"model": "vita-audio", "messages": [', "headers": {**AUTH, "Content-Type": "application/json"}},
     400, "JSON"),
    ("chat deeply nested json", "POST", "/v1/chat/completions",
     {"content": b"[" * 50_000 + b"]" * 50_000, "headers": {**AUTH, "Content-Type": "application/json"}},
     400, "nested too deeply"),
    ("chat wrong key", "POST", "/v1/chat/completions", {"json": _chat(), "headers": {"Authorization": "Bearer no"}},
     401, "API key"),
    ("chat oversized body", "POST", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": "a" * 500_000}])}, 413, "max_body_bytes"),
    # voices
    ("voice no sample", "POST", "/v1/audio/voices", {"files": {"name": (None, "x")}}, 400, "audio_sample"),
    ("voice no name", "POST", "/v1/audio/voices", {"files": {"audio_sample": ("v.wav", GOOD, "audio/wav")}},
     400, "name"),
    ("voice too long", "POST", "/v1/audio/voices",
     {"data": {"name": "long"}, "files": {"audio_sample": ("v.wav", clip(seconds=7.0), "audio/wav")}},
     413, "max_audio_seconds"),
    ("voice not audio", "POST", "/v1/audio/voices",
     {"data": {"name": "junk"}, "files": {"audio_sample": ("v.wav", b"\x00\x01junk", "audio/wav")}},
     400, "cannot decode"),
    ("voice taken name", "POST", "/v1/audio/voices",
     {"data": {"name": "alloy"}, "files": {"audio_sample": ("v.wav", GOOD, "audio/wav")}}, 400, "alloy"),
    ("voice delete unknown", "DELETE", "/v1/audio/voices/voice_nope", {}, 404, "voice_nope"),
    # routes that do not exist, or not for that method
    ("unknown route", "POST", "/v1/audio/translations", {"json": {}}, 404, "Invalid URL (POST /v1/audio/translations)"),
    ("wrong method", "GET", "/v1/audio/speech", {}, 405, "Invalid URL (GET /v1/audio/speech)"),
    ("voices no auth", "GET", "/v1/audio/voices", {"headers": {}}, 401, "API key"),
    ("models no auth", "GET", "/v1/models", {"headers": {}}, 401, "API key"),
    # speech (beyond BAD above)
    ("speech unknown voice id", "POST", "/v1/audio/speech",
     {"json": {"model": "vita-audio", "input": "hi", "voice": {"id": "voice_nope"}}}, 400, "voice_nope"),
    ("speech unknown mode", "POST", "/v1/audio/speech",
     {"json": {"model": "vita-audio", "input": "hi", "mode": "warp"}}, 400, "mode"),
    ("speech temperature a string", "POST", "/v1/audio/speech",
     {"json": {"model": "vita-audio", "input": "hi", "temperature": "hot"}}, 400, "temperature"),
    ("speech audio placeholder", "POST", "/v1/audio/speech",
     {"json": {"model": "vita-audio", "input": "a <|audio|> b"}}, 400, "<|audio|>"),
    ("speech lone surrogate", "POST", "/v1/audio/speech",
     {"content": b'{"model": "vita-audio", "input": "a\\ud800b"}', "headers": {**AUTH, "Content-Type": "application/json"}},
     400, "not valid Unicode"),
    ("chat lone surrogate", "POST", "/v1/chat/completions",
     {"content": b'{"model": "vita-audio", "messages": [{"role": "user", "content": "x\\udfffy"}]}',
      "headers": {**AUTH, "Content-Type": "application/json"}}, 400, "not valid Unicode"),
    ("speech null input", "POST", "/v1/audio/speech", {"json": {"model": "vita-audio", "input": None}}, 400, "input"),
]


def _send(serve_url: str, method: str, path: str, kwargs: dict):
    import httpx

    kwargs = dict(kwargs)
    kwargs["headers"] = AUTH if "headers" not in kwargs else kwargs["headers"]
    return httpx.request(method, f"{serve_url}{path}", timeout=60, **kwargs)


def _assert_refused(r, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and needle in error["message"], error


@pytest.mark.parametrize("name,method,path,kwargs,status,needle", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_are_4xx_in_openai_shape(serve_url, name, method, path, kwargs, status, needle):
    _assert_refused(_send(serve_url, method, path, kwargs), status, needle)


def test_battery_size():
    assert len(HOSTILE) + len(BAD) + 4 >= 30


def test_healthy_and_correct_after_hostile_requests(client, serve_url, local_tts, local_asr):
    import httpx

    for _, method, path, kwargs, status, needle in HOSTILE:  # again, back to back: no 5xx, nothing left broken
        _assert_refused(_send(serve_url, method, path, kwargs), status, needle)
    for _, headers, body, status, _ in BAD:
        r = httpx.post(f"{serve_url}/v1/audio/speech", json=body, headers=AUTH if headers is None else headers,
                       timeout=60)
        assert 400 <= r.status_code < 500
    assert httpx.get(f"{serve_url}/health", timeout=30).json()["status"] == "ok"
    test_speech_wav_matches_pipeline(client, local_tts)
    test_transcription_json_matches_pipeline(client, local_asr)


# -- capacity and clients that go away ---------------------------------------------------------------------


def test_a_refused_llm_call_is_busy_even_though_cancel_reraises():
    """Serve refuses a call beyond max_queued_requests with BackPressureError while routing it, and the
    handle's cancel() (run when the stream closes) raises that error again: the stream still ends StageBusy."""
    import asyncio

    from ray.serve.exceptions import BackPressureError

    from actors.orchestration import StageBusy
    from serve.deployments import ServeStageClients

    class RefusedStream:
        def _refused(self):
            raise BackPressureError(num_queued_requests=2, max_queued_requests=2)

        async def _fetch_future_result_async(self):
            self._refused()

        cancel = _refused

    class FullLLM:
        def options(self, stream):
            return self

        generate = SimpleNamespace(remote=lambda request: RefusedStream())

    async def first():
        return await ServeStageClients(None, FullLLM(), None).generate(None).__anext__()

    with pytest.raises(StageBusy, match="llm stage is at capacity"):
        asyncio.run(first())


def test_stage_overload_maps_to_503_with_retry_after():
    from actors.payloads import ErrorEvent
    from serve.http import stage_error

    from ray.serve.exceptions import BackPressureError

    from actors.orchestration import StageBusy, error_event
    from actors.handles import stage_failure

    busy = stage_failure("llm", BackPressureError(num_queued_requests=8, max_queued_requests=8))
    assert isinstance(busy, StageBusy) and busy.stage == "llm"
    full = stage_error(error_event(busy))  # what run_request makes of a StageBusy
    assert full.status == 503 and full.code == "overloaded" and full.headers["Retry-After"] and "capacity" in full.message
    same_text = stage_error(ErrorEvent("llm", str(busy)))  # a failure is not "busy" by its wording
    assert same_text.code == "stage_failed"
    failed = stage_error(ErrorEvent("decoder", "decoder stage failed: RayActorError: died"))
    assert failed.status == 503 and failed.headers["Retry-After"] and "decoder" in failed.message
    assert stage_error(ErrorEvent("input", "text is empty")).status == 400


def _stage_stats(stage: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"vita-{stage}", app_name="vita").stats.remote().result(timeout_s=30)


def test_client_gone_mid_stream_frees_llm_slot_and_decoder_stream(serve_url):
    """A streamed speech request of 512 tokens, dropped after its first bytes: its decoder stream is closed and
    the decoder stops working on it (far fewer forwards than the whole request takes), and its LLM request is
    gone (aborted if it was still generating: fewer engine steps than the whole request)."""
    import time

    import httpx

    body = {"model": "vita-audio", "input": "A long story " * 10, "response_format": "pcm", "max_new_tokens": 512}

    def counters():
        return _stage_stats("llm")["steps"], _stage_stats("decoder")["forwards"]

    llm0, dec0 = counters()
    with httpx.stream("POST", f"{serve_url}/v1/audio/speech", json=body, headers=AUTH, timeout=120) as r:
        b"".join(r.iter_bytes())
    llm1, dec1 = counters()
    full_llm, full_dec = llm1 - llm0, dec1 - dec0
    with httpx.stream("POST", f"{serve_url}/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_bytes())
        generating = _stage_stats("llm")["active"] == 1
    deadline, llm, decoder = time.monotonic() + 10, None, None
    while time.monotonic() < deadline:
        llm, decoder = _stage_stats("llm"), _stage_stats("decoder")
        if llm["active"] == 0 and decoder["open_streams"] == 0:
            break
        time.sleep(0.1)
    assert llm["active"] == 0 and decoder["open_streams"] == 0, (llm, decoder)
    time.sleep(1.0)  # anything still running for the dropped request would count now
    llm2, dec2 = counters()
    assert dec2 - dec1 < full_dec / 2, (dec2 - dec1, full_dec)
    if generating:
        assert llm2 - llm1 < full_llm, (llm2 - llm1, full_llm)
