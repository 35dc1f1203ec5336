"""The Serve app through the official openai SDK on 127.0.0.1 (a free port), against the in-process pipeline."""
from __future__ import annotations

import io
import socket

import numpy as np
import pytest
import soundfile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

API_KEY = "test-key"
TEXT = "Hello there."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_session, tiny_models):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": str(tiny_models), "api_key": API_KEY, "max_text_chars": 200,
                         "max_tokens": 512, "max_body_bytes": 100_000}),
              name="vita", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def client(serve_url):
    import openai

    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def local_tts(tiny_models):
    from actors.config import PipelineConfig
    from actors.local import LocalPipeline
    from actors.results import collect

    import torch

    # Session fixtures start before the module's one_torch_thread: set the thread count the Serve stages use
    # (torch_threads=1), or float sums reorder and the audio differs in its last bits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = LocalPipeline(PipelineConfig.from_models_dir(tiny_models))
    try:
        yield collect(pipe.tts(TEXT, max_new_tokens=64))
    finally:
        pipe.bridge.stop()
        torch.set_num_threads(previous)


def _int16(pcm) -> np.ndarray:
    """The pipeline's float PCM as 16-bit samples, rounded (what every response format carries)."""
    return np.round(np.clip(pcm, -1, 1) * 32767.0).astype("<i2")


def test_speech_wav_matches_pipeline(client, local_tts):
    assert local_tts.ok and len(local_tts.pcm)
    audio = client.audio.speech.create(model="vita-audio", voice="alloy", input=TEXT, response_format="wav",
                                       extra_body={"max_new_tokens": 64})
    pcm, rate = soundfile.read(io.BytesIO(audio.content), dtype="int16")
    assert rate == local_tts.sample_rate
    np.testing.assert_array_equal(pcm, _int16(local_tts.pcm))


def test_speech_streamed_pcm_matches_pipeline(client, local_tts):
    with client.audio.speech.with_streaming_response.create(
            model="vita-audio", voice="default", input=TEXT, response_format="pcm",
            extra_body={"max_new_tokens": 64}) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        data = b"".join(response.iter_bytes())
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), _int16(local_tts.pcm))


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
    np.testing.assert_array_equal(np.frombuffer(audio, "<i2"), _int16(local_tts.pcm))


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
    ("huge body", None, {"model": "vita-audio", "input": "a" * 200_000}, 413, "max_body_bytes"),
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


def test_healthy_and_correct_after_bad_requests(client, serve_url, local_tts):
    test_bad_speech_requests_are_4xx_in_openai_shape(serve_url, *BAD[0])
    test_speech_wav_matches_pipeline(client, local_tts)
