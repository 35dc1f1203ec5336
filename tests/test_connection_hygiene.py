"""Connection hygiene (serve.hygiene, serve.health): what slow, idle, greedy and cross-site clients may hold.

Without Serve: the media-type, Host and Origin rules, and the middleware's body deadline, WebSocket timeouts and
per-client cap driven as raw ASGI. With this module's own Serve app (an ingress of 4 slots, 2 connections per
key, 8 s timeouts) and the /health application beside it, over raw loopback sockets: twice the ingress' capacity
in half-sent bodies and idle sockets, /health answering while they are all held, a new speech request of
another key succeeding, every held connection closed by its timeout (408, or an `error` event and a close code);
Host/Origin and content-type refusals through the proxy.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import socket
import struct
import time

import httpx
import pytest
from fastapi import Request, WebSocket  # at module level: the routes' annotations are resolved in its globals

from serve.api import APIError
from serve.hygiene import (ConnectionGuard, ConnectionLimits, host_refusal, is_json, is_multipart_form,
                           origin_refusal)

# -- the rules, without Serve ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type, json_ok, form_ok", [
    ("application/json", True, False),
    ("Application/JSON; charset=utf-8", True, False),
    ("application/merge-patch+json", True, False),
    ("text/plain;json", False, False),  # the old substring check let this through (no CORS preflight)
    ("text/plain; charset=application/json", False, False),
    ("application/jsonx", False, False),
    ("json", False, False),
    ("", False, False),
    (None, False, False),
    ("multipart/form-data; boundary=xyz", False, True),
    ("multipart/form-data-evil; boundary=xyz", False, False),
    ("application/x-www-form-urlencoded", False, False),
])
def test_media_types_are_parsed(content_type, json_ok, form_ok):
    assert is_json(content_type) is json_ok
    assert is_multipart_form(content_type) is form_ok


@pytest.mark.parametrize("host, allowed, ok", [
    ("127.0.0.1:8000", (), True), ("localhost:8000", (), True), ("LOCALHOST", (), True), ("[::1]:8000", (), True),
    ("app.localhost:8000", (), True), ("10.1.2.3:8000", (), True), ("[fe80::1]:80", (), True),  # IP literals
    ("evil.example:8000", (), False), ("evil.example", (), False), ("localhost.evil.example", (), False),
    ("api.example.com", ("api.example.com",), True), ("API.example.com:443", ("api.example.com",), True),
    ("api.example.com:8000", ("api.example.com:443",), False), ("api.example.com:443", ("api.example.com:443",), True),
    ("anything.example", ("*",), True), (None, (), True),
])
def test_host_allow_list(host, allowed, ok):
    refusal = host_refusal(host, ConnectionLimits(allowed_hosts=allowed))
    assert (refusal is None) is ok
    if refusal is not None:
        assert refusal.status == 421 and refusal.code == "host_not_allowed" and host in refusal.message


@pytest.mark.parametrize("origin, host, allowed, ok", [
    (None, "127.0.0.1:8000", (), True),  # not a browser
    ("http://127.0.0.1:8000", "127.0.0.1:8000", (), True),  # the page at /
    ("http://10.0.0.5:8000", "10.0.0.5:8000", (), True),  # same origin on a LAN address
    ("http://localhost:3000", "127.0.0.1:8000", (), True),  # a loopback page
    ("http://[::1]:5173", "127.0.0.1:8000", (), True),
    ("https://api.example.com", "api.example.com", (), True),  # same origin behind TLS (default ports)
    ("http://evil.example", "127.0.0.1:8000", (), False),
    ("http://10.0.0.6:8000", "10.0.0.5:8000", (), False),
    ("null", "127.0.0.1:8000", (), False),  # sandboxed frames, file:// pages
    ("http://127.0.0.1.evil.example", "127.0.0.1:8000", (), False),
    ("https://app.example.com", "127.0.0.1:8000", ("https://app.example.com/",), True),
    ("http://app.example.com", "127.0.0.1:8000", ("https://app.example.com",), False),
    ("http://evil.example", "127.0.0.1:8000", ("*",), True),
])
def test_origin_allow_list(origin, host, allowed, ok):
    refusal = origin_refusal(origin, host, "http", ConnectionLimits(allowed_origins=allowed))
    assert (refusal is None) is ok
    if refusal is not None:
        assert refusal.status == 403 and refusal.code == "origin_not_allowed"


# -- the middleware as raw ASGI ----------------------------------------------------------------------------

FAST = ConnectionLimits(body_timeout_s=0.3, ws_first_event_timeout_s=0.3, ws_idle_timeout_s=0.5,
                        max_connections_per_client=1)


def _inner_app():
    """A FastAPI app with the ingress' error handler, a body-reading route and a session-like socket."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    inner = FastAPI()

    @inner.exception_handler(APIError)
    async def _error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @inner.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    @inner.websocket("/ws")
    async def ws(socket_: WebSocket):
        await socket_.accept()
        await socket_.send_text(json.dumps({"type": "session.created"}))
        while True:
            message = await socket_.receive()
            if message["type"] == "websocket.disconnect":
                inner.state.ended = message.get("code")
                return
            await socket_.send_text(json.dumps({"type": "ack"}))

    return inner


def _scope(kind: str, path: str, client: str = "127.0.0.1", headers: dict | None = None) -> dict:
    raw = [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8000", **(headers or {})}.items()]
    return {"type": kind, "path": path, "raw_path": path.encode(), "query_string": b"", "headers": raw,
            "client": (client, 40000), "server": ("127.0.0.1", 8000), "scheme": "http" if kind == "http" else "ws",
            "method": "POST", "root_path": "", "http_version": "1.1", "asgi": {"version": "3.0"}, "subprotocols": []}


async def _call(guard, scope, incoming: list[dict], hold: asyncio.Event | None = None) -> list[dict]:
    """Run one ASGI call: `incoming` messages, then (if `hold`) nothing until it is set; returns what was sent."""
    sent, queue = [], list(incoming)

    async def receive():
        if queue:
            return queue.pop(0)
        if hold is not None:
            await hold.wait()
        return {"type": "http.disconnect"} if scope["type"] == "http" else {"type": "websocket.disconnect", "code": 1000}

    async def send(message):
        sent.append(message)

    await guard(scope, receive, send)
    return sent


def _status_and_body(sent: list[dict]) -> tuple[int, dict]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_half_sent_body_is_answered_408_and_a_whole_one_passes():
    guard = ConnectionGuard(_inner_app(), FAST)

    async def run():
        hold = asyncio.Event()
        half = await _call(guard, _scope("http", "/echo"), [{"type": "http.request", "body": b"{", "more_body": True}],
                           hold)
        whole = await _call(guard, _scope("http", "/echo"), [{"type": "http.request", "body": b"{}", "more_body": False}])
        return half, whole, guard.open

    half, whole, still_open = asyncio.run(run())
    status, body = _status_and_body(half)
    assert status == 408 and body["error"]["code"] == "body_timeout" and "body_timeout_s=0.3" in body["error"]["message"]
    assert _status_and_body(whole) == (200, {"bytes": 2})
    assert still_open == {}  # both slots given back


def test_socket_without_a_first_event_and_an_idle_socket_are_closed():
    inner = _inner_app()
    guard = ConnectionGuard(inner, FAST)

    async def run():
        silent = await _call(guard, _scope("websocket", "/ws"), [{"type": "websocket.connect"}], asyncio.Event())
        ended_silent = inner.state.ended
        talker = await _call(guard, _scope("websocket", "/ws"), [{"type": "websocket.connect"},
                                                                 {"type": "websocket.receive", "text": "{}"}],
                             asyncio.Event())
        return silent, ended_silent, talker, inner.state.ended

    silent, ended_silent, talker, ended_talker = asyncio.run(run())
    for sent, name, code in ((silent, "ws_first_event_timeout", 1008), (talker, "ws_idle_timeout", 1000)):
        kinds = [m["type"] for m in sent]
        assert kinds[0] == "websocket.accept" and kinds[-1] == "websocket.close" and sent[-1]["code"] == code
        error = json.loads(sent[-2]["text"])
        assert error["type"] == "error" and error["error"]["code"] == name and f"{name}_s=" in error["error"]["message"]
    assert [json.loads(m["text"])["type"] for m in talker if m["type"] == "websocket.send"] == [
        "session.created", "ack", "error"]
    assert ended_silent == 1008 and ended_talker == 1000  # the app saw a disconnect: its session ended


def test_per_client_cap_refuses_at_once_and_other_clients_pass():
    guard = ConnectionGuard(_inner_app(), FAST)

    async def run():
        hold = asyncio.Event()
        held = asyncio.create_task(_call(guard, _scope("http", "/echo", "10.0.0.1"),
                                         [{"type": "http.request", "body": b"{", "more_body": True}], hold))
        await asyncio.sleep(0.05)
        over_http = await _call(guard, _scope("http", "/echo", "10.0.0.1"), [])
        over_ws = await _call(guard, _scope("websocket", "/ws", "10.0.0.1"), [{"type": "websocket.connect"}])
        other = await _call(guard, _scope("http", "/echo", "10.0.0.2"),
                            [{"type": "http.request", "body": b"{}", "more_body": False}])
        return over_http, over_ws, other, await held  # the held one ends by its body timeout

    over_http, over_ws, other, held = asyncio.run(run())
    status, body = _status_and_body(over_http)
    assert status == 429 and body["error"]["code"] == "too_many_connections"
    assert "max_connections_per_client=1" in body["error"]["message"]
    assert [m["type"] for m in over_ws] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(over_ws[1]["text"])["error"]["code"] == "too_many_connections" and over_ws[2]["code"] == 1008
    assert _status_and_body(other)[0] == 200 and _status_and_body(held)[0] == 408


def test_cross_origin_socket_and_foreign_host_are_refused_before_accept():
    guard = ConnectionGuard(_inner_app(), ConnectionLimits())

    async def run():
        cross = await _call(guard, _scope("websocket", "/ws", headers={"origin": "http://evil.example"}),
                            [{"type": "websocket.connect"}])
        same = await _call(guard, _scope("websocket", "/ws", headers={"origin": "http://127.0.0.1:8000"}),
                           [{"type": "websocket.connect"}])
        rebound = await _call(guard, _scope("http", "/echo", headers={"host": "evil.example:8000"}), [])
        return cross, same, rebound

    cross, same, rebound = asyncio.run(run())
    assert [m["type"] for m in cross] == ["websocket.close"] and cross[0]["code"] == 1008  # never accepted
    assert same[0]["type"] == "websocket.accept"
    status, body = _status_and_body(rebound)
    assert status == 421 and body["error"]["code"] == "host_not_allowed"


# -- through Serve: this module's own app ------------------------------------------------------------------

CAPACITY = 4
TIMEOUT_S = 8.0
KEYS = ["key-a", "key-b", "key-c", "key-d"]


@pytest.fixture(scope="module")
def served(ray_session, tiny_models, tmp_path_factory):
    """The app with a small ingress (4 slots, 16 waiting), 2 connections per key, 8 s timeouts, and /health
    beside it; yields its port."""
    from ray import serve

    from serve.health import APP_NAME, ROUTE_PREFIX, build_health
    from serve_testing import serve_app

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("\n".join(KEYS) + "\n")
    args = dict(max_concurrent_requests=CAPACITY, max_waiting_requests=16, max_connections_per_client=2,
                body_timeout_s=TIMEOUT_S, ws_first_event_timeout_s=TIMEOUT_S, ws_idle_timeout_s=TIMEOUT_S,
                api_keys_file=str(keys_file))
    with serve_app(tiny_models, **args) as url:
        serve.run(build_health({"app": "vita"}), name=APP_NAME, route_prefix=ROUTE_PREFIX)
        yield int(url.rsplit(":", 1)[1])


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setblocking(True)
    return sock


def _held_body(port: int, key: str) -> socket.socket:
    """A speech request whose body stops after its first bytes."""
    sock = _connect(port)
    sock.sendall((f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ").encode())
    return sock


def _held_socket(port: int, key: str) -> socket.socket:
    """A /v1/realtime WebSocket handshake (its answer is read later)."""
    sock = _connect(port)
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Protocol: realtime\r\nAuthorization: Bearer {key}\r\n\r\n").encode())
    return sock


def _send_text(sock: socket.socket, text: str) -> None:
    """One masked client text frame."""
    data, mask = text.encode(), os.urandom(4)
    header = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else bytes([0x81, 0xFE]) + struct.pack(">H", len(data))
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def _read_all(sock: socket.socket, limit_s: float = 60.0, until=None) -> bytes:
    """Everything until the server closes, or until `until(data)` holds (bounded: a hang fails the test instead
    of stalling it)."""
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if until is not None and until(data):
                break
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return data


def _read_ws(sock: socket.socket) -> tuple[int, list[dict], int | None]:
    """A raw WebSocket exchange up to the server's close frame (the client never answers it)."""
    return _ws_answer(_read_all(sock, until=lambda data: _ws_answer(data, partial=True)[2] is not None))


def _http_answer(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, "the server closed without an answer"
    return int(head.split()[1]), json.loads(body) if body.strip() else {}


def _ws_answer(data: bytes, partial: bool = False) -> tuple[int, list[dict], int | None]:
    """(handshake status, server text events, close code) of a raw WebSocket exchange (`partial`: data so far)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if partial and not sep:
        return 0, [], None
    status, events, code = int(head.split()[1]), [], None
    if status != 101:
        return status, events, status
    while len(rest) >= 2:
        opcode, size, at = rest[0] & 0x0F, rest[1] & 0x7F, 2
        if size == 126:
            size, at = struct.unpack(">H", rest[2:4])[0], 4
        elif size == 127:
            size, at = struct.unpack(">Q", rest[2:10])[0], 10
        if len(rest) < at + size:
            break
        payload, rest = rest[at:at + size], rest[at + size:]
        if opcode == 1:
            events.append(json.loads(payload))
        elif opcode == 8:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
    return status, events, code


def _answered(sockets: list[socket.socket], count: int, limit_s: float = 60.0) -> list[socket.socket]:
    """Wait (bounded) until `count` of `sockets` have something to read; those sockets."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select(sockets, [], [], 0.2)
        if len(readable) >= count:
            return readable
    return select.select(sockets, [], [], 0)[0]


def _speech(port: int, key: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/audio/speech", headers={"authorization": f"Bearer {key}"},
                      json={"model": "vita-audio", "voice": "alloy", "input": "Hi.", "response_format": "wav",
                            "max_new_tokens": 16}, timeout=120)


def test_twice_the_capacity_from_one_key_keeps_two_and_refuses_the_rest_at_once(served):
    port = served
    held = [_held_body(port, KEYS[0]) for _ in range(2 * CAPACITY)]
    refused = _answered(held, 2 * CAPACITY - 2)
    assert len(refused) == 2 * CAPACITY - 2  # the cap is 2: all but two answered without waiting for a timeout
    for sock in refused:
        status, body = _http_answer(_read_all(sock))
        assert status == 429 and body["error"]["code"] == "too_many_connections"
    kept = [s for s in held if s not in refused]
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
    speech = _speech(port, KEYS[1])  # another key: a free slot at once
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert speech.status_code == 200 and speech.content[:4] == b"RIFF" and len(speech.content) > 44
    assert select.select(kept, [], [], 0)[0] == []  # both still held while /health and the speech answered
    for sock in kept:  # then freed by the body timeout, the connection closed after the 408
        status, body = _http_answer(_read_all(sock))
        assert status == 408 and body["error"]["code"] == "body_timeout"


def test_health_answers_with_the_ingress_full_and_every_held_connection_is_closed(served):
    port = served
    silent = _held_socket(port, KEYS[0])
    talker = _held_socket(port, KEYS[0])
    for sock in (silent, talker):  # both in their slots (session.created came) before the rest arrive
        assert _answered([sock], 1) == [sock]
    _send_text(talker, json.dumps({"type": "input_audio_buffer.clear"}))
    bodies = [_held_body(port, KEYS[1]) for _ in range(2)]  # the ingress' 4 slots are full from here on
    queued = [_held_body(port, KEYS[2]) for _ in range(2)] + [_held_socket(port, KEYS[3]) for _ in range(2)]
    start = time.monotonic()
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
    took = time.monotonic() - start
    assert health.status_code == 200 and set(health.json()["stages"]) == {"encoder", "llm", "decoder", "ingress"}
    assert select.select(bodies, [], [], 0)[0] == [], f"/health waited for a slot ({took:.2f} s)"
    print(f"/health with {2 * CAPACITY} connections held: {took:.3f} s")

    status, events, code = _read_ws(silent)
    assert status == 101 and events[0]["type"] == "session.created" and code == 1008
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "ws_first_event_timeout"
    status, events, code = _read_ws(talker)
    assert status == 101 and code == 1000 and events[-1]["error"]["code"] == "ws_idle_timeout"
    for sock in bodies + queued[:2]:
        status, body = _http_answer(_read_all(sock))
        assert status == 408 and body["error"]["code"] == "body_timeout"
    for sock in queued[2:]:  # the queued sockets got their slot once the first ones were closed, then timed out
        status, events, code = _read_ws(sock)
        assert status == 101 and code == 1008 and events[-1]["error"]["code"] == "ws_first_event_timeout"
    after = _speech(port, KEYS[3])
    assert after.status_code == 200


@pytest.mark.parametrize("headers, status, code", [
    ({"host": "evil.example:8000"}, 421, "host_not_allowed"),  # DNS rebinding
    ({"origin": "http://evil.example"}, 403, "origin_not_allowed"),
    ({"origin": "null"}, 403, "origin_not_allowed"),
    ({"origin": "http://localhost:5173"}, 200, None),
    ({"host": "localhost:8000", "origin": "http://localhost:8000"}, 200, None),
])
def test_host_and_origin_over_http(served, headers, status, code):
    r = httpx.get(f"http://127.0.0.1:{served}/v1/models", headers={"authorization": f"Bearer {KEYS[0]}", **headers},
                  timeout=30)
    assert r.status_code == status
    if code:
        assert r.json()["error"]["code"] == code


def test_cross_origin_socket_is_refused_and_same_origin_accepted(served):
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    url = f"ws://127.0.0.1:{served}/v1/realtime"
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, additional_headers={**auth, "Origin": "http://evil.example"}, open_timeout=30)
    assert refused.value.response.status_code == 403
    with ws_client.connect(url, additional_headers={**auth, "Origin": f"http://127.0.0.1:{served}"},
                           subprotocols=["realtime"], open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"


@pytest.mark.parametrize("content_type, status", [
    ("text/plain;json", 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
    ("application/json; charset=utf-8", 200),
])
def test_content_type_is_the_media_type(served, content_type, status):
    body = json.dumps({"model": "vita-audio", "voice": "alloy", "input": "Hi.", "max_new_tokens": 8})
    r = httpx.post(f"http://127.0.0.1:{served}/v1/audio/speech", content=body, timeout=120,
                   headers={"authorization": f"Bearer {KEYS[0]}", "content-type": content_type})
    assert r.status_code == status
    if status == 415:
        assert r.json()["error"]["code"] == "unsupported_media_type"


def test_upload_needs_multipart(served):
    r = httpx.post(f"http://127.0.0.1:{served}/v1/audio/transcriptions", content=b"--x\r\n", timeout=30,
                   headers={"authorization": f"Bearer {KEYS[0]}", "content-type": "text/plain; multipart/form-data"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
