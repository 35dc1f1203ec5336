"""The FastAPI ingress: the only place that knows HTTP. It validates requests into OpenAI's shapes, runs
them through `actors.orchestration.run_request` over the stage DeploymentHandles (`ServeStageClients`) and
maps every refusal to OpenAI's error JSON with a 4xx status (stage failures are 5xx/503).
"""

import base64
import json
import logging

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from actors.orchestration import Limits, run_request
from actors.payloads import AudioChunk, Done, ErrorEvent
from serve.api import DEFAULT_VOICE, MODEL_ID, OPENAI_VOICES, APIError, SpeechBody, validation_message
from serve.audio_formats import CONTENT_TYPES, encode, to_int16
from serve.deployments import ServeStageClients

app = FastAPI(title="VITA-Audio speech API")
logger = logging.getLogger("ray.serve")


@app.exception_handler(APIError)
async def _api_error(request: Request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status)


@app.exception_handler(Exception)
async def _internal(request: Request, err: Exception):
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)  # the replica log keeps the trace
    return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", type="server_error").body(),
                        status_code=500)


def _stage_error(event: ErrorEvent) -> "APIError":
    if event.stage == "input":
        return APIError(400, event.message)
    return APIError(503, f"{event.stage} stage: {event.message}", type="server_error", code="stage_failed")


async def _gather(first, events):
    chunks, rate, event = [], 24000, first
    while True:
        if isinstance(event, AudioChunk):
            chunks.append(event.pcm)
            rate = event.sample_rate
        elif isinstance(event, Done):
            return chunks, rate, event
        elif isinstance(event, ErrorEvent):
            raise _stage_error(event)
        event = await anext(events)


def _usage(done: Done) -> dict:
    llm = done.usage.get("llm", {})
    out = len(done.token_ids) or llm.get("completion_tokens", 0)
    prompt = llm.get("prompt_tokens", 0)
    return {"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out,
            "output_tokens_details": {"audio_tokens": len(done.audio_codes),
                                      "text_tokens": max(out - len(done.audio_codes), 0)}}


def _usage_headers(done: Done) -> dict:
    usage = _usage(done)
    return {"x-usage-input-tokens": str(usage["input_tokens"]), "x-usage-output-tokens": str(usage["output_tokens"]),
            "x-usage-audio-tokens": str(usage["output_tokens_details"]["audio_tokens"])}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


# Module helpers stand above the class: serve.ingress wraps it when it is defined, so names defined below
# it are missing in the replica.
@serve.ingress(app)
class Ingress:
    """Holds the stage handles and the caps; one method per route."""

    def __init__(self, encoder, llm, decoder, caps: dict, api_key: str | None = None):
        self.clients = ServeStageClients(encoder, llm, decoder)
        self.limits = Limits()
        self.caps = caps
        self.api_key = api_key

    # -- shared checks -----------------------------------------------------------------------------------
    async def _json(self, request: Request) -> dict:
        self._auth(request)
        body = await self._body(request)
        if "json" not in request.headers.get("content-type", ""):
            raise APIError(415, "Content-Type must be application/json")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"body is not valid JSON: {err}")
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object")
        return data

    def _auth(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           type="authentication_error")

    async def _body(self, request: Request) -> bytes:
        cap = self.caps["max_body_bytes"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise APIError(413, f"body of {declared} bytes exceeds max_body_bytes={cap}", code="max_body_bytes")
        body = await request.body()
        if len(body) > cap:
            raise APIError(413, f"body of {len(body)} bytes exceeds max_body_bytes={cap}", code="max_body_bytes")
        return body

    def _model(self, model) -> None:
        if model != MODEL_ID:
            raise APIError(404, f"model {model!r} does not exist; available: {MODEL_ID!r}", param="model",
                           code="model_not_found")

    def _voice(self, voice: str) -> None:
        if voice != DEFAULT_VOICE and voice not in OPENAI_VOICES:
            raise APIError(400, f"unknown voice {voice!r}; see GET /v1/audio/voices", param="voice")

    def _tokens(self, n: int) -> None:
        if n > self.caps["max_tokens"]:
            raise APIError(400, f"max_new_tokens={n} exceeds max_tokens={self.caps['max_tokens']}",
                           param="max_new_tokens", code="max_tokens")

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        states = await self.clients.check_health()
        ok = all(v == "ok" for v in states.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "stages": states}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "vita-audio"}]}

    @app.get("/v1/audio/voices")
    async def voices(self, request: Request):
        self._auth(request)
        return {"voices": [DEFAULT_VOICE], "aliases": {v: DEFAULT_VOICE for v in OPENAI_VOICES}}

    @app.post("/v1/audio/speech")
    async def speech(self, request: Request):
        data = await self._json(request)
        try:
            body = SpeechBody.model_validate(data)
        except ValidationError as err:
            message, param = validation_message(err)
            raise APIError(400, message, param=param)
        self._model(body.model)
        self._voice(body.voice)
        self._tokens(body.max_new_tokens)
        if body.speed != 1.0:
            raise APIError(400, f"speed={body.speed}: only 1.0 is supported", param="speed")
        if not body.input.strip():
            raise APIError(400, "input must be a non-empty text", param="input")
        if len(body.input) > self.caps["max_text_chars"]:
            raise APIError(400, f"input of {len(body.input)} characters exceeds "
                                f"max_text_chars={self.caps['max_text_chars']}", param="input", code="max_text_chars")
        events = run_request(self.clients, self.limits, "tts", text=body.input, mode=body.mode,
                             max_new_tokens=body.max_new_tokens)
        first = await anext(events)  # input / first-stage errors still get a status code
        if isinstance(first, ErrorEvent):
            raise _stage_error(first)
        if body.stream_format == "sse":
            return StreamingResponse(self._sse_speech(first, events, body.response_format),
                                     media_type="text/event-stream")
        if body.response_format == "pcm":
            return StreamingResponse(self._raw_pcm(first, events), media_type=CONTENT_TYPES["pcm"])
        chunks, rate, done = await _gather(first, events)
        return Response(encode(np.concatenate(chunks) if chunks else np.zeros(0, np.float32), rate,
                               body.response_format), media_type=CONTENT_TYPES[body.response_format],
                        headers=_usage_headers(done))

    async def _raw_pcm(self, first, events):
        event = first
        while True:
            if isinstance(event, AudioChunk):
                yield to_int16(event.pcm)
            if isinstance(event, (Done, ErrorEvent)):
                return  # an error mid-stream truncates the body (the status is already sent)
            event = await anext(events)

    async def _sse_speech(self, first, events, fmt: str):
        event = first
        while True:
            if isinstance(event, AudioChunk):
                audio = to_int16(event.pcm) if fmt == "pcm" else encode(event.pcm, event.sample_rate, fmt)
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode()})
            elif isinstance(event, Done):
                yield _sse({"type": "speech.audio.done", "usage": _usage(event)})
                return
            elif isinstance(event, ErrorEvent):
                yield _sse({"type": "error", "error": _stage_error(event).body()["error"]})
                return
            event = await anext(events)

