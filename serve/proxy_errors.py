"""OpenAI's error shape for the few replies Serve's HTTP proxy writes itself, in plain text: a request beyond
the ingress' queue (503 with Retry-After, the last guard against piling up), an app that is not deployed yet
(503), a proxy failure (500). Every other reply comes from the ingress, which already speaks OpenAI's shape.

Serve loads `proxy_middlewares` in each proxy process when `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names it;
the variable is read when Ray's processes start, so `use_in_local_ray()` sets it before a local Ray starts
(`vita-audio serve`, `bench serve`, the tests) and the cluster image sets it (cluster/Dockerfile).
"""
from __future__ import annotations

import json
import os

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.proxy_errors:proxy_middlewares"


def use_in_local_ray() -> None:
    """Have the proxies of a Ray started after this call rewrite their plain-text errors (unless set already)."""
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)


def proxy_middlewares() -> list:
    """Serve's proxy callback: the Starlette middlewares wrapped around the proxy."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrorBodies)]


class OpenAIErrorBodies:
    """ASGI middleware: a plain-text error response (status >= 400) becomes `{"error": {...}}` JSON with the
    same status and headers (Retry-After kept); JSON, streams and successful replies pass untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self.app(scope, receive, _quiet_when_gone(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held, body = None, b""

        async def rewrite(message):
            nonlocal held, body
            if message["type"] == "http.response.start" and message["status"] >= 400 and _plain_text(message):
                held = message  # wait for the text, then send the JSON in its place
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            data = json.dumps(error_body(held["status"], body.decode("utf-8", "replace"))).encode()
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, rewrite)


def _quiet_when_gone(send):
    """A socket's `send` that drops what its client can no longer get: a client that went away mid-answer is not
    an error (Serve's proxy would log the failed send as an unexpected error, with a traceback); the proxy still
    hears the disconnect on `receive` and passes it to the ingress."""
    gone = False

    async def quiet(message):
        nonlocal gone
        if gone:
            return
        try:
            await send(message)
        except OSError:  # uvicorn's ClientDisconnected
            gone = True

    return quiet


def error_body(status: int, text: str) -> dict:
    """OpenAI's error JSON for a proxy's plain-text reply."""
    overloaded = status == 503
    message, code = text.strip() or f"HTTP {status}", "overloaded" if overloaded else None
    if status == 500:  # the ingress answers its own failures in JSON: a plain 500 is its replica lost mid-request
        message, code = (f"the ingress replica serving this request failed or was lost ({message}); the request "
                         "did not complete: retry it"), "ingress_failed"
    return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                      "param": None, "code": code}}


def _plain_text(start: dict) -> bool:
    content_type = dict((k.lower(), v) for k, v in start.get("headers", [])).get(b"content-type", b"text/plain")
    return content_type.startswith(b"text/plain")
