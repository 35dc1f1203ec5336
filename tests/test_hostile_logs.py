"""Quiet under abuse: a battery of bad and hostile requests against the shared Serve app (bad JSON, wrong types,
bad audio bytes, bodies cut off mid-way, clients gone mid-stream, unknown routes and models, oversize bodies,
bad realtime events and a socket dropped mid-answer), then the Serve logs of this Ray session written meanwhile
(the replicas', the proxy's and the controller's, under the session's logs/serve/) hold no traceback, and no
error message a client got holds a Python object repr (`<_io.BytesIO object at 0x…>`)."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from serve_testing import API_KEY, clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OBJECT_REPR = re.compile(r"\bobject at 0x[0-9a-fA-F]+")
JUNK = b"\x00\x01junk" * 50
LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-")


def serve_log_sizes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def written_since(folder: Path, before: dict[Path, int]) -> dict[str, str]:
    """What each Serve log file gained after `before` (a new file: all of it)."""
    out = {}
    for path, size in serve_log_sizes(folder).items():
        start = before.get(path, 0)
        if size > start:
            with path.open("rb") as f:
                f.seek(start)
                out[path.name] = f.read().decode("utf-8", "replace")
    return out


def wait_until_logs_settle(folder: Path, timeout: float = 15.0) -> None:
    """Bounded: until no Serve log grew for a second (replicas write their last lines after the responses)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        sizes = serve_log_sizes(folder)
        if sizes == last:
            return
        last = sizes
        time.sleep(1.0)


def stage_stats(stage: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"vita-{stage}", app_name="vita").stats.remote().result(timeout_s=30)


def wait_idle(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stage_stats("llm")["active"] == 0 and stage_stats("decoder")["open_streams"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"stages still busy after {timeout:g} s")


# -- the battery ------------------------------------------------------------------------------------------


def raw_http(url: str, head: str, body: bytes, read: bool = False) -> bytes:
    """Send `head` and `body` on a raw socket and close it (a client gone mid-body); the reply if `read`."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def cut_bodies(url: str) -> None:
    host = urlparse(url).netloc
    raw_http(url, f"POST /v1/audio/speech HTTP/1.1\nHost: {host}\nAuthorization: Bearer {API_KEY}\n"
                  "Content-Type: application/json\nContent-Length: 5000\n", b'{"model": "vita-audio", "inp')
    boundary = "XyZ"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + clip()[:3000]
    raw_http(url, f"POST /v1/audio/transcriptions HTTP/1.1\nHost: {host}\nAuthorization: Bearer {API_KEY}\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\nContent-Length: 200000\n", part)
    raw_http(url, f"POST /v1/chat/completions HTTP/1.1\nHost: {host}\nAuthorization: Bearer {API_KEY}\n"
                  "Content-Type: application/json\nTransfer-Encoding: chunked\n", b"10\r\n{\"model\": \"vita-a")


def dropped_streams(url: str) -> None:
    import httpx

    speech = {"model": "vita-audio", "input": "A long story " * 8, "max_new_tokens": 256}
    chat = {"model": "vita-audio", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}, "stream": True,
            "max_tokens": 256}
    for path, body in [("/v1/audio/speech", {**speech, "response_format": "pcm"}),
                       ("/v1/audio/speech", {**speech, "response_format": "pcm", "stream_format": "sse"}),
                       ("/v1/chat/completions", chat)]:
        with httpx.stream("POST", url + path, json=body, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # the first bytes, then the client is gone
        wait_idle()
    files = {"file": ("a.wav", clip(seconds=2.0), "audio/wav")}
    with httpx.stream("POST", url + "/v1/audio/transcriptions", headers=AUTH, timeout=60, files=files,
                      data={"model": "vita-audio", "stream": "true", "max_new_tokens": "64"}) as r:
        assert r.status_code == 200
        next(r.iter_bytes())


def refusals(url: str) -> list[dict]:
    """Bad requests over every route: each a 4xx in OpenAI's error shape; their errors."""
    import httpx

    json_ct = {**AUTH, "Content-Type": "application/json"}
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    chat_audio = lambda data, fmt="wav": {"model": "vita-audio", "messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]}
    lying_wav = clip()[:44] + JUNK  # a RIFF header announcing more than follows
    cases = [
        ("POST", "/v1/audio/speech", {"content": b"{not json", "headers": json_ct}),
        ("POST", "/v1/audio/speech", {"content": b"\xff\xfe\x00", "headers": json_ct}),
        ("POST", "/v1/audio/speech", {"json": {"model": "vita-audio", "input": {"a": 1}}}),
        ("POST", "/v1/audio/speech", {"json": {"model": 7, "input": "hi"}}),
        ("POST", "/v1/audio/speech", {"json": ["model", "input"]}),
        ("POST", "/v1/audio/speech", {"json": {"model": "gpt-x", "input": "hi"}}),
        ("POST", "/v1/audio/speech", {"json": {"model": "vita-audio", "input": "a" * 500_000}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "vita-audio", "messages": 5}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "vita-audio", "messages": [{"role": "user"}],
                                                   "temperature": "hot"}}),
        ("POST", "/v1/chat/completions", {"content": b"[" * 50_000, "headers": json_ct}),
        ("POST", "/v1/chat/completions", {"json": chat_audio("%%%not-base64")}),
        ("POST", "/v1/chat/completions", {"json": chat_audio(b64(JUNK))}),
        ("POST", "/v1/chat/completions", {"json": chat_audio(b64(lying_wav))}),
        ("POST", "/v1/chat/completions", {"json": chat_audio(b64(b"OggS" + JUNK), "mp3")}),
        ("POST", "/v1/audio/transcriptions", {"data": {"model": "vita-audio"},
                                              "files": {"file": ("a.wav", JUNK, "audio/wav")}}),
        ("POST", "/v1/audio/transcriptions", {"data": {"model": "vita-audio"},
                                              "files": {"file": ("a.flac", b"fLaC" + JUNK, "audio/flac")}}),
        ("POST", "/v1/audio/transcriptions", {"data": {"model": "vita-audio"},
                                              "files": {"file": ("a.wav", lying_wav, "audio/wav")}}),
        ("POST", "/v1/audio/transcriptions", {"data": {"model": "vita-audio"},
                                              "files": {"file": ("a.wav", clip(seconds=7.0), "audio/wav")}}),
        ("POST", "/v1/audio/transcriptions", {"data": {"model": "vita-audio", "temperature": "warm"},
                                              "files": {"file": ("a.wav", clip(), "audio/wav")}}),
        ("POST", "/v1/audio/transcriptions", {"content": b"--x\r\nbroken", "headers": {
            **AUTH, "Content-Type": "multipart/form-data; boundary=x"}}),
        ("POST", "/v1/audio/voices", {"data": {"name": "junk"}, "files": {"audio_sample": ("v.wav", JUNK, "audio/wav")}}),
        ("GET", "/v1/nope", {}),
        ("DELETE", "/v1/models", {}),
        ("GET", "/v1/models/gpt-x", {}),
        ("GET", "/v1/audio/voices/voice_nope", {}),
    ]
    errors = []
    for method, path, kwargs in cases:
        kwargs.setdefault("headers", AUTH)
        r = httpx.request(method, url + path, timeout=60, **kwargs)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
        errors.append(r.json()["error"])
    return errors


async def realtime_abuse(url: str) -> list[dict]:
    """Bad events on one socket, then a socket dropped while its answer streams: the errors the client got."""
    import websockets

    ws_url = url.replace("http://", "ws://") + "/v1/realtime?model=vita-audio"
    protocols = ["realtime", f"openai-insecure-api-key.{API_KEY}"]
    errors = []
    async with websockets.connect(ws_url, subprotocols=protocols, max_size=None) as ws:
        await asyncio.wait_for(ws.recv(), 30)  # session.created
        for raw in ["{not json", json.dumps({"type": "no.such.event"}), json.dumps([1, 2]),
                    json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
                    json.dumps({"type": "session.update", "session": {"audio": {"output": {"format": {"rate": 7}}}}})]:
            await ws.send(raw)
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert event["type"] == "error", event
            errors.append(event["error"])
    async with websockets.connect(ws_url, subprotocols=protocols, max_size=None) as ws:
        await asyncio.wait_for(ws.recv(), 30)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 256}}))
        while json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] != "response.output_audio.delta":
            pass  # the answer streams: drop the socket now
    return errors


def test_the_hostile_battery_leaves_no_traceback_and_no_object_repr(serve_url):
    import httpx
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"  # noqa: SLF001 - no public API
    assert logs.is_dir(), logs
    wait_idle()
    before = serve_log_sizes(logs)

    errors = refusals(serve_url)
    cut_bodies(serve_url)
    dropped_streams(serve_url)
    errors += asyncio.run(realtime_abuse(serve_url))
    wait_idle()
    assert httpx.get(f"{serve_url}/health", timeout=30).json()["status"] == "ok"
    wait_until_logs_settle(logs)

    reprs = [e["message"] for e in errors if OBJECT_REPR.search(e["message"])]
    assert not reprs, reprs
    written = written_since(logs, before)
    assert any(name.startswith("replica_") for name in written), sorted(written)  # the battery reached the logs
    tracebacks = [f"== {name}\n{block}" for name, text in written.items() for block in traceback_blocks(text)]
    assert not tracebacks, "\n\n".join(tracebacks)


def traceback_blocks(log: str) -> list[str]:
    """Each traceback in a log: the line that logged it and the traceback's last lines (where it was raised)."""
    lines, blocks = log.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if LOG_LINE.match(lines[j])), len(lines))
            blocks.append("\n".join(lines[max(0, i - 1):i] + ["  ..."] + lines[max(i, end - 12):end]))
    return blocks
