"""The ingress' FastAPI app and its HTTP helpers: OpenAI error JSON for every refusal, the observed
`run_request` stream (`Run`) and the usage / SSE shapes shared by the route modules (serve.ingress,
serve.routes_chat). Imported modules reach the replica whole; names defined below the `@serve.ingress`
class in its own module do not, so the helpers live here.
"""

import base64
import contextlib
import json
import logging
import zlib

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from ray.exceptions import TaskCancelledError
from pydantic import ValidationError

from actors.errors import InputError
from actors.orchestration import StageFailure, error_event, run_request
import actors.requests as policy
from actors.payloads import AudioChunk, AudioPayload, Done, ErrorEvent, TextDelta
from serve.api import LANGUAGES, APIError, TranscriptionForm, validation_message
from serve.hygiene import ConnectionGuard
from serve.metrics import StreamClock, observed

app = FastAPI(title="VITA-Audio speech API")
app.add_middleware(ConnectionGuard)  # Host/Origin lists, per-client cap, body and socket timeouts


class ClientGone:
    """ASGI middleware: a `receive` that fails because the client went away (a Serve replica's receive raises
    TaskCancelledError once the proxy dropped the request) reads as `http.disconnect`, so a body cut off or a
    stream dropped ends as a disconnect, not as an unhandled error with a traceback in the replica log."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def receive_or_gone():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_gone, send)


app.add_middleware(ClientGone)
logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = "1"
ENCODER_RATE = 16000


@app.exception_handler(APIError)
async def _api_error(request: Request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(InputError)
async def _input_error(request: Request, err: InputError):
    return _api_error_response(refusal(err))


def _api_error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(ClientDisconnect)
async def _client_gone(request: Request, err: ClientDisconnect):
    """A client that went away in the middle of its body: not a server error (no traceback); nobody reads this."""
    logger.info("%s %s: the client went away before its body ended", request.method, request.url.path)
    return JSONResponse(APIError(400, "the request body ended early (the client went away)").body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _routing(request: Request, err: StarletteHTTPException):
    """FastAPI's own refusals (no such path, wrong method) in OpenAI's error shape, as OpenAI words them."""
    wrong_url = err.status_code in (404, 405)
    message = f"Invalid URL ({request.method} {request.url.path})" if wrong_url else str(err.detail)
    return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code, headers=err.headers)


@app.exception_handler(Exception)
async def _internal(request: Request, err: Exception):
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)  # the replica log keeps the trace
    return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", type="server_error").body(),
                        status_code=500)


def stage_error(event: ErrorEvent) -> APIError:
    """A request's ErrorEvent as an HTTP error: the caller's input is a 400, a full stage (Serve's
    BackPressureError) or a failed one a 503 with Retry-After."""
    if event.stage == "input":
        return APIError(400, event.message)
    retry = {"Retry-After": RETRY_AFTER_S}
    if event.busy:
        return APIError(503, f"{event.message.rstrip('.')}. Retry later.", type="server_error",
                        code="overloaded", headers=retry)
    return APIError(503, f"{event.stage} stage: {event.message}", type="server_error", code="stage_failed",
                    headers=retry)


async def encode_audio(clients, audio: AudioPayload) -> list[int]:
    """A clip's audio codes from the encoder stage outside a run (voice uploads, earlier chat turns); a stage
    failure is an HTTP error as in a run (busy: 503 overloaded)."""
    try:
        return await clients.encode(audio)
    except StageFailure as err:
        raise stage_error(error_event(err)) from None


def refused(err: ValidationError) -> APIError:
    message, param = validation_message(err)
    return APIError(400, message, param=param)


class Run:
    """One `run_request` event stream, observed for metrics. `aclose` closes both generators (an `async for`
    over a generator does not close it), so a client that goes away aborts the LLM request at once."""

    def __init__(self, clients, limits, route: str, task: str, **options):
        self.source = run_request(clients, limits, task, **options)
        self.clock = StreamClock()  # the client's playback, when the response streams (`streamed` marks it)
        self.events = observed(route, self.source, self.clock)

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.events.__anext__()

    async def first(self):
        """The first event; a stage or input error before any output is raised as an APIError (status code)."""
        event = await self.__anext__()
        if isinstance(event, ErrorEvent):
            await self.aclose()
            raise stage_error(event)
        return event

    async def aclose(self) -> None:
        await self.events.aclose()
        await self.source.aclose()


class StreamAborted(Exception):
    """Raised inside a streamed body whose run failed after the status was sent: the server then ends the
    connection without the body's terminating chunk, so the client sees an error instead of a clean, short body."""


class AbortableStream(StreamingResponse):
    """Starlette's streamed response, except that a `StreamAborted` from the body ends it without the terminating
    chunk (the server closes the connection: the client's read fails), logged in one line instead of a traceback."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                if not isinstance(chunk, (bytes, memoryview)):
                    chunk = chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except StreamAborted as err:
            logger.warning("streamed body aborted: %s", err)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def streamed(run: Run, body, media_type: str) -> StreamingResponse:
    """A streamed response whose run is closed however it ends: `body`'s own finally closes it, and the
    background task does when the client went away before the body was ever iterated."""
    run.clock.streaming = True  # serve.metrics: chunk intervals, playback underrun, continuity
    return AbortableStream(body, media_type=media_type, background=BackgroundTask(run.aclose))


async def gather(run: Run, first):
    """Every event up to Done: (text ids, PCM chunks, rate, Done); an ErrorEvent is raised."""
    ids, chunks, rate, event = [], [], 24000, first
    try:
        while True:
            if isinstance(event, TextDelta):
                ids.extend(event.token_ids)
            elif isinstance(event, AudioChunk):
                chunks.append(event.pcm)
                rate = event.sample_rate
            elif isinstance(event, Done):
                return ids, chunks, rate, event
            elif isinstance(event, ErrorEvent):
                raise stage_error(event)
            event = await anext(run)
    finally:
        await run.aclose()


def joined_pcm(chunks) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def speech_usage(done: Done) -> dict:
    llm = done.usage.get("llm", {})
    out = len(done.token_ids) or llm.get("completion_tokens", 0)
    prompt = llm.get("prompt_tokens", 0)
    return {"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out,
            "output_tokens_details": {"audio_tokens": len(done.audio_codes),
                                      "text_tokens": max(out - len(done.audio_codes), 0)}}


def usage_headers(done: Done) -> dict:
    usage = speech_usage(done)
    return {"x-usage-input-tokens": str(usage["input_tokens"]), "x-usage-output-tokens": str(usage["output_tokens"]),
            "x-usage-audio-tokens": str(usage["output_tokens_details"]["audio_tokens"])}


def transcription_usage(done: Done) -> dict:
    prompt = int(done.usage.get("llm", {}).get("prompt_tokens", 0))
    audio = int(done.usage.get("encoder", {}).get("codes", 0))
    out = len(done.token_ids)
    return {"type": "tokens", "input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out,
            "input_token_details": {"audio_tokens": audio, "text_tokens": max(prompt - audio, 0)}}


def verbose_transcription(text: str, ids: list[int], seconds: float, body: TranscriptionForm, done: Done) -> dict:
    """OpenAI's verbose_json (one segment: the model gives no timestamps) plus `token_ids`, every generated id."""
    raw = text.encode()
    ratio = len(raw) / len(zlib.compress(raw)) if raw else 0.0
    segment = {"id": 0, "seek": 0, "start": 0.0, "end": round(seconds, 3), "text": text, "tokens": ids,
               "temperature": body.temperature, "avg_logprob": 0.0, "compression_ratio": round(ratio, 4),
               "no_speech_prob": 0.0}
    return {"task": "transcribe", "language": LANGUAGES.get((body.language or "").lower(), "unknown"), "duration": round(seconds, 3),
            "text": text, "segments": [segment], "usage": {"type": "duration", "seconds": round(seconds, 3)},
            "token_ids": list(done.token_ids)}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def refusal(err: InputError) -> APIError:
    """The request policy's refusal (actors.requests) as OpenAI's 400, naming the field; the caps' codes kept."""
    message = str(err)
    code = next((cap for cap in ("max_tokens", "max_text_chars") if f"{cap}=" in message), None)
    return APIError(400, message, param=err.field, code=code)


@contextlib.contextmanager
def refusals():
    """InputErrors of the request policy raised inside as APIErrors (for code that sends them as events)."""
    try:
        yield
    except InputError as err:
        raise refusal(err) from None


def request_options(body, caps: "policy.Caps", max_new_tokens: int, tokens_param: str = "max_new_tokens",
                    layout=policy.LAYOUTS[0]) -> "policy.RequestOptions":
    """A route's decoding options (mode, max tokens, sampling, layout) by the one request policy."""
    with refusals():
        return policy.request_options(mode=body.mode, max_new_tokens=max_new_tokens, **body.sampling_fields(),
                                      layout=layout, caps=caps, names={"max_new_tokens": tokens_param})


def check_text(text: str, caps: "policy.Caps", param: str, max_new_tokens: int | None = None) -> None:
    """A user's text by the request policy (non-empty, valid Unicode, no audio placeholder, the caps)."""
    with refusals():
        policy.check_text(text, param, caps, max_new_tokens)


