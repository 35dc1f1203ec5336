"""Connection hygiene of the ingress: what a slow, idle, greedy or cross-site client may hold, as one ASGI
middleware (`ConnectionGuard`, installed on serve.http.app) in front of every route.

Every request and every open WebSocket holds one of the ingress replica's `max_ongoing_requests` slots (Serve's
proxy counts them before the request reaches the replica), so a client that sends nothing must not keep one:

- a request body must arrive whole within `body_timeout_s` of the request reaching the replica, else the route
  answers 408 in OpenAI's error shape (and the connection closes), freeing the slot;
- a WebSocket must send its first event within `ws_first_event_timeout_s` of the handshake, and a socket on which
  nothing moves either way for `ws_idle_timeout_s` is closed; both get an `error` event naming the timeout, then
  close code 1008 (no first event) or 1000 (idle);
- one client holds at most `max_connections_per_client` requests and sockets at once on a replica (a client: the
  API key's owner; on an open endpoint, or with no valid key, the client's address); beyond it: 429 at once;
- `Host` must be a loopback name, an IP literal or one of `allowed_hosts` (DNS rebinding: a page of a foreign
  name that resolves to this server sends that name), else 421; a browser's `Origin` must be this server
  (same origin), a loopback page, or one of `allowed_origins`, else 403 — for HTTP and the /v1/realtime socket.

What Serve's proxy (uvicorn, in the proxy actor) bounds itself: idle keep-alive connections between requests
(`http_options.keep_alive_timeout_s`, 90 s by default) and the header size (h11's 16 KiB). It has no header-read
timeout: a client that never finishes its headers holds a proxy socket (never an ingress slot) until it goes;
put a load balancer with a header timeout in front where that matters (on Kubernetes the Ingress/Gateway does).
Serve's `request_timeout_s` is an end-to-end limit that would cut long speech streams; it is left unset.

Liveness vs readiness: `/health` of the ingress shares its slots; `serve.health` serves the same check as its own
application (route prefix /health, its own replica) so a full ingress never starves the readiness probe.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from serve.api import APIError
from serve.realtime_events import error_event

logger = logging.getLogger("ray.serve")
KEY_PROTOCOL = "openai-insecure-api-key."  # the browser's key, as a WebSocket subprotocol (serve.routes_realtime)
LOOPBACK_NAMES = frozenset({"localhost"})
NORMAL_CLOSURE, POLICY_VIOLATION = 1000, 1008


@dataclass(frozen=True)
class ConnectionLimits:
    """The ingress' connection limits (serve.app.Args sets them; these defaults are the app's)."""

    body_timeout_s: float = 60.0
    ws_first_event_timeout_s: float = 30.0
    ws_idle_timeout_s: float = 600.0
    max_connections_per_client: int = 64
    allowed_hosts: tuple[str, ...] = ()  # beyond loopback names and IP literals; "*": any Host
    allowed_origins: tuple[str, ...] = ()  # beyond same-origin and loopback pages; "*": any Origin


# -- media types -------------------------------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header (`type/subtype`, lower case, parameters dropped)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """application/json or a structured `application/...+json` type; `text/plain;json` is not (a browser sends
    text/plain across origins without a CORS preflight)."""
    kind = media_type(content_type)
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def is_multipart_form(content_type: str | None) -> bool:
    return media_type(content_type) == "multipart/form-data"


# -- Host and Origin ---------------------------------------------------------------------------------------


def split_host(value: str) -> tuple[str, str | None]:
    """`host[:port]` (IPv6 in brackets) as (lower-case host without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, port
    return value, None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _loopback(host: str) -> bool:
    ip = _ip(host)
    return host in LOOPBACK_NAMES or host.endswith(".localhost") or (ip is not None and ip.is_loopback)


def host_refusal(host_header: str | None, limits: ConnectionLimits) -> APIError | None:
    """A Host that is neither loopback, an IP literal nor listed: 421 (a DNS-rebinding page sends its own name;
    an IP literal cannot be a foreign page's origin)."""
    if not host_header or "*" in limits.allowed_hosts:
        return None
    host, port = split_host(host_header)
    listed = {entry.strip().lower() for entry in limits.allowed_hosts}
    if _loopback(host) or _ip(host) is not None or host in listed or (port and f"{host}:{port}" in listed):
        return None
    return APIError(421, f"Host {host_header!r} is not served here; add it to allowed_hosts to serve it",
                    param="Host", code="host_not_allowed")


def origin_refusal(origin: str | None, host_header: str | None, scheme: str, limits: ConnectionLimits) -> APIError | None:
    """A browser's Origin that is neither this server (same origin), a loopback page nor listed: 403."""
    if origin is None or "*" in limits.allowed_origins:
        return None
    normalized = origin.strip().lower().rstrip("/")
    if normalized in {entry.strip().lower().rstrip("/") for entry in limits.allowed_origins}:
        return None
    parts = urlsplit(normalized)
    if parts.scheme in ("http", "https") and parts.hostname:
        default = "443" if parts.scheme == "https" else "80"
        origin_host = (parts.hostname, str(parts.port) if parts.port else default)
        if _loopback(parts.hostname):
            return None
        if host_header:
            host, port = split_host(host_header)
            ours = {"http": "80", "https": "443", "ws": "80", "wss": "443"}.get(scheme, "80")
            if origin_host == (host, port or ours) or (port is None and origin_host[0] == host):
                return None
    return APIError(403, f"Origin {origin!r} may not call this server; add it to allowed_origins to allow it",
                    param="Origin", code="origin_not_allowed")


# -- who the client is -------------------------------------------------------------------------------------


def presented_key(headers: Headers, subprotocols: list[str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.startswith("Bearer "):
        return auth[len("Bearer "):].strip() or None
    keys = [p[len(KEY_PROTOCOL):] for p in subprotocols if p.startswith(KEY_PROTOCOL)]
    return keys[0] if keys else None


def client_id(scope: dict, servable=None) -> str:
    """Whom a connection counts against: the owner of a valid API key on a keyed endpoint, else the client's
    address (an open endpoint: any caller could make up keys)."""
    key = presented_key(Headers(scope=scope), list(scope.get("subprotocols") or []))
    if key and servable is not None:
        keys = getattr(servable, "keys", None)
        if keys is not None and not keys.open:
            owner = keys.owner(key)
            if owner:
                return f"key:{owner}"
        elif getattr(servable, "api_key", None) and key == servable.api_key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


# -- the middleware ----------------------------------------------------------------------------------------


def _servable():
    """The ingress object of this Serve replica (None outside one)."""
    try:
        from ray import serve

        return serve.get_replica_context().servable_object
    except Exception:
        return None


def limits_of(servable) -> ConnectionLimits:
    caps = getattr(servable, "caps", None)
    limits = caps.get("connections") if isinstance(caps, dict) else None
    return limits if isinstance(limits, ConnectionLimits) else ConnectionLimits()


class ConnectionGuard:
    """ASGI middleware: Host/Origin allow-lists, the per-client cap, body and WebSocket timeouts (module doc).
    `limits`: fixed limits (unit tests); by default those of the replica's ingress (`caps["connections"]`)."""

    def __init__(self, app, limits: ConnectionLimits | None = None):
        self.app, self.fixed = app, limits
        self.open: dict[str, int] = {}  # client -> requests and sockets in progress (one event loop: no lock)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        servable = None if self.fixed else _servable()
        limits = self.fixed or limits_of(servable)
        headers = Headers(scope=scope)
        refusal = host_refusal(headers.get("host"), limits) or origin_refusal(
            headers.get("origin"), headers.get("host"), scope.get("scheme", "http"), limits)
        client = client_id(scope, servable)
        if refusal is None and self.open.get(client, 0) >= limits.max_connections_per_client:
            refusal = APIError(429, f"too many open connections from this client (max_connections_per_client="
                                    f"{limits.max_connections_per_client}); close some first",
                               code="too_many_connections", type="rate_limit_error", headers={"Retry-After": "1"})
        if refusal is not None:
            return await (_refuse_http(send, refusal) if scope["type"] == "http"
                          else _refuse_socket(receive, send, refusal))
        self.open[client] = self.open.get(client, 0) + 1
        try:
            if scope["type"] == "http":
                await self.app(scope, BodyDeadline(receive, limits.body_timeout_s), send)
            else:
                watch = SocketWatch(receive, send, limits)
                await self.app(scope, watch.receive, watch.send)
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]


async def _refuse_http(send, err: APIError) -> None:
    from fastapi.responses import JSONResponse

    # the body (if any) is never read: the connection cannot carry another request
    response = JSONResponse(err.body(), status_code=err.status, headers={**err.headers, "Connection": "close"})
    await response({"type": "http"}, None, send)


async def _refuse_socket(receive, send, err: APIError) -> None:
    """A refused handshake: Host/Origin refusals never get a socket (close before accept: the client sees an
    HTTP 403); a client over its cap gets the socket just long enough for the `error` event and close 1008."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if err.status in (403, 421):
        await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": err.message[:120]})
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": _json(error_event(err))})
    await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": err.message[:120]})


def _json(event: dict) -> str:
    import json

    return json.dumps(event)


class BodyDeadline:
    """An ASGI `receive` whose request body must be whole by a deadline; past it the reading route gets a 408
    APIError (OpenAI's shape; `Connection: close`: the rest of the body is never read)."""

    def __init__(self, receive, timeout_s: float):
        self.receive, self.timeout_s = receive, timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.whole = False

    async def __call__(self):
        if self.whole:
            return await self.receive()
        left = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self.receive(), max(left, 0.0))
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within body_timeout_s={self.timeout_s:g}",
                           code="body_timeout", headers={"Connection": "close"}) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.whole = True
        return message


class SocketWatch:
    """A WebSocket's `receive`/`send` with the first-event and idle timeouts. Once accepted, the client must send
    an event within `ws_first_event_timeout_s`; after that, any event either way restarts the idle clock. On
    expiry the client gets an `error` event naming the timeout and the close, and the app's receive returns a
    disconnect (so it ends the session and aborts a response in progress); its later sends are dropped."""

    def __init__(self, receive, send, limits: ConnectionLimits):
        self.raw_receive, self.raw_send, self.limits = receive, send, limits
        self.loop = asyncio.get_running_loop()
        self.deadline: float | None = None  # None until accepted
        self.first = True
        self.closed = False
        self.pending: asyncio.Future | None = None

    def _touch(self) -> None:
        self.deadline = self.loop.time() + self.limits.ws_idle_timeout_s

    async def send(self, message: dict) -> None:
        if self.closed:
            return
        if message["type"] == "websocket.accept":
            self.deadline = self.loop.time() + self.limits.ws_first_event_timeout_s
        elif message["type"] == "websocket.send" and not self.first:
            self._touch()
        elif message["type"] == "websocket.close":
            self.closed = True
        await self.raw_send(message)

    async def receive(self) -> dict:
        if self.pending is None:
            self.pending = asyncio.ensure_future(self.raw_receive())
        while True:
            try:
                if self.deadline is None:
                    await asyncio.wait({self.pending})
                else:
                    await asyncio.wait({self.pending}, timeout=max(self.deadline - self.loop.time(), 0.0))
            except asyncio.CancelledError:  # the app's task is cancelled: no receive is left behind
                self.pending.cancel()
                self.pending = None
                raise
            if self.pending.done():
                message, self.pending = self.pending.result(), None
                if message["type"] == "websocket.receive" and self.deadline is not None:
                    self.first = False
                    self._touch()
                return message
            if self.deadline is not None and self.loop.time() >= self.deadline:  # not moved by a send meanwhile
                return await self._expire()

    async def _expire(self) -> dict:
        self.pending.cancel()
        self.pending = None
        if self.first:
            name, seconds, code = "ws_first_event_timeout_s", self.limits.ws_first_event_timeout_s, POLICY_VIOLATION
            text = "no client event"
        else:
            name, seconds, code = "ws_idle_timeout_s", self.limits.ws_idle_timeout_s, NORMAL_CLOSURE
            text = "nothing sent either way"
        err = APIError(408, f"{text} within {name}={seconds:g}; closing the socket", code=name.removesuffix("_s"))
        if not self.closed:
            self.closed = True
            try:
                await self.raw_send({"type": "websocket.send", "text": _json(error_event(err))})
                await self.raw_send({"type": "websocket.close", "code": code, "reason": err.message[:120]})
            except Exception as exc:  # the client went at the same moment
                logger.info("closing an expired socket: %s", type(exc).__name__)
        return {"type": "websocket.disconnect", "code": code}
