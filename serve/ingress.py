"""The FastAPI ingress: the only place that knows HTTP. It validates requests into OpenAI's shapes, runs
them through `actors.orchestration.run_request` over the stage DeploymentHandles (`ServeStageClients`) and
maps every refusal to OpenAI's error JSON with a 4xx status (stage failures are 503 with Retry-After).

Routes here: /v1/audio/speech, /v1/audio/transcriptions, /v1/audio/voices, /v1/models, /health; the chat
route is in serve.routes_chat, the /v1/realtime WebSocket and the page at / in serve.routes_realtime. The app
and shared helpers are in serve.http, checks in serve.api / serve.uploads, chat shapes in serve.chat_format.
"""
import json

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from ray import serve

from actors.orchestration import Limits
from actors.requests import Caps, model_caps
from actors.payloads import AudioChunk, AudioPayload, Done, ErrorEvent, TextDelta
from serve import chat_format
from serve.api import MODEL_ID, APIError, SpeechBody, TranscriptionForm
from serve.audio_formats import CONTENT_TYPES, encode, to_int16
from serve.deployments import ServeStageClients
from serve.http import (RETRY_AFTER_S, Run, app, b64, check_text, gather, joined_pcm, refused,
                        request_options, speech_usage, sse, stage_error, streamed, encode_audio, transcription_usage,
                        usage_headers, verbose_transcription)
from serve.routes_chat import ChatRoutes
from serve.routes_realtime import RealtimeRoutes
from serve.uploads import admit_upload
from serve.voices import MAX_VOICE_SECONDS, VoiceStore

# Helpers live in serve.http (imported modules reach the replica whole; names defined below the decorated
# class in this module would be missing there).


@serve.ingress(app)
class Ingress(ChatRoutes, RealtimeRoutes):
    """Holds the stage handles, the caps, the voice store; one method per route."""

    def __init__(self, encoder, llm, decoder, caps: dict, api_key: str | None = None, limits: Limits = Limits(),
                 llm_path: str | None = None):
        """`limits`: the pipeline config's (`serve.app` builds them from its args); `llm_path`: the model's
        folder, whose caps (positions, tokenizer) the request policy checks requests against."""
        self.clients = ServeStageClients(encoder, llm, decoder)
        self.limits = limits
        self.caps = caps
        operator_caps = dict(max_new_tokens=caps["max_tokens"], max_text_chars=caps["max_text_chars"])
        self.request_caps = model_caps(llm_path, **operator_caps) if llm_path else Caps(**operator_caps)
        self.api_key = api_key
        self.voice_store = VoiceStore()
        self.answers = chat_format.AudioAnswers()

    def _run(self, route: str, task: str, **options) -> Run:
        return Run(self.clients, self.limits, route, task, caps=self.request_caps, **options)

    # -- shared checks -----------------------------------------------------------------------------------
    async def _json(self, request: Request) -> dict:
        self._auth(request)
        body = await self._body(request)
        if "json" not in request.headers.get("content-type", ""):
            raise APIError(415, "Content-Type must be application/json")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"body is not valid JSON: {err}") from None
        except RecursionError:
            raise APIError(400, "body is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object")
        return data

    async def _form(self, request: Request, file_field: str) -> tuple[dict, bytes]:
        """A multipart/form-data body: its text fields (lists for `name[]`) and the bytes of `file_field`."""
        self._auth(request)
        await self._body(request)  # the cap first; request.form() then parses the kept body
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(415, "Content-Type must be multipart/form-data (a file upload)")
        try:
            form = await request.form()
        except Exception as err:
            raise APIError(400, f"body is not valid multipart/form-data: {err}") from None
        fields, data = {}, None
        for key in set(form.keys()):
            values = form.getlist(key)
            if key == file_field:
                if len(values) != 1 or isinstance(values[0], str):
                    raise APIError(400, f"{file_field} must be one uploaded file", param=file_field)
                data = await values[0].read()
            elif any(not isinstance(v, str) for v in values):
                raise APIError(400, f"{key} must be a form field, not a file", param=key)
            else:
                fields[key] = values if key.endswith("[]") else values[-1]
        if data is None:
            raise APIError(400, f"{file_field} is required (an audio file)", param=file_field)
        return fields, data

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

    async def _audio(self, data: bytes, param: str, max_seconds: float | None = None) -> AudioPayload:
        """An uploaded clip admitted against the caps (off the event loop): its 16 kHz AudioPayload."""
        cap = min(self.caps["max_audio_seconds"], max_seconds or float("inf"))
        return await admit_upload(data, cap, param)

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        states = await self.clients.check_health()
        ok = all(v == "ok" for v in states.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "stages": states}, status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": RETRY_AFTER_S})

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "vita-audio"}]}

    @app.get("/v1/audio/voices")
    async def voices(self, request: Request):
        self._auth(request)
        return self.voice_store.listing()

    @app.post("/v1/audio/voices")
    async def upload_voice(self, request: Request):
        """A voice prompt from a short clip (OpenAI's voices.create: audio_sample + name [+ consent, type])."""
        fields, data = await self._form(request, "audio_sample")
        unknown = set(fields) - {"name", "consent", "type"}
        if unknown:
            raise APIError(400, f"unknown field(s) {sorted(unknown)}", param=sorted(unknown)[0])
        name = fields.get("name", "")
        if not name.strip() or len(name) > 64:
            raise APIError(400, "name must be a non-empty text of at most 64 characters", param="name")
        if fields.get("type", "audio_sample") != "audio_sample":
            raise APIError(400, f"type={fields['type']!r}: only audio_sample voices are supported", param="type")
        self.voice_store.check_new(name)
        payload = await self._audio(data, "audio_sample", MAX_VOICE_SECONDS)
        payload.name = f"voice {name}"
        codes = await encode_audio(self.clients, payload)
        return self.voice_store.add(name, codes, payload.seconds).describe()

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(self, voice_id: str, request: Request):
        self._auth(request)
        self.voice_store.delete(voice_id)
        return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}

    @app.post("/v1/audio/speech")
    async def speech(self, request: Request):
        data = await self._json(request)
        try:
            body = SpeechBody.model_validate(data)
        except ValidationError as err:
            raise refused(err) from None
        self._model(body.model)
        voice = self.voice_store.resolve(body.voice)
        options = request_options(body, self.request_caps, body.max_new_tokens)
        if body.speed != 1.0:
            raise APIError(400, f"speed={body.speed}: only 1.0 is supported", param="speed")
        check_text(body.input, self.request_caps, "input", options.max_new_tokens)
        run = self._run("speech", "tts", text=body.input, voice=voice, **options.run_args())
        first = await run.first()  # input / first-stage errors still get a status code
        if body.stream_format == "sse":
            return streamed(run, self._sse_speech(run, first, body.response_format), "text/event-stream")
        if body.response_format == "pcm":
            return streamed(run, self._raw_pcm(run, first), CONTENT_TYPES["pcm"])
        _, chunks, rate, done = await gather(run, first)
        return Response(encode(joined_pcm(chunks), rate, body.response_format), media_type=CONTENT_TYPES[body.response_format],
                        headers=usage_headers(done))

    async def _raw_pcm(self, run: Run, first):
        event = first
        try:
            while True:
                if isinstance(event, AudioChunk):
                    yield to_int16(event.pcm)
                if isinstance(event, (Done, ErrorEvent)):
                    return  # an error mid-stream truncates the body (the status is already sent)
                event = await anext(run)
        finally:
            await run.aclose()

    async def _sse_speech(self, run: Run, first, fmt: str):
        event = first
        try:
            while True:
                if isinstance(event, AudioChunk):
                    audio = to_int16(event.pcm) if fmt == "pcm" else encode(event.pcm, event.sample_rate, fmt)
                    yield sse({"type": "speech.audio.delta", "audio": b64(audio)})
                elif isinstance(event, Done):
                    yield sse({"type": "speech.audio.done", "usage": speech_usage(event)})
                    return
                elif isinstance(event, ErrorEvent):
                    yield sse({"type": "error", "error": stage_error(event).body()["error"]})
                    return
                event = await anext(run)
        finally:
            await run.aclose()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request):
        fields, data = await self._form(request, "file")
        try:
            body = TranscriptionForm.model_validate(fields)
        except ValidationError as err:
            raise refused(err) from None
        self._model(body.model)
        options = request_options(body, self.request_caps, body.max_new_tokens)
        if body.include:
            raise APIError(400, "include[]=logprobs is not supported", param="include[]")
        audio = await self._audio(data, "file")  # decoded once: run_request takes the admitted clip
        seconds = audio.seconds
        run = self._run("transcriptions", "asr", audio=audio, **options.run_args())
        first = await run.first()
        if body.stream:
            return streamed(run, self._sse_transcript(run, first), "text/event-stream")
        ids, _, _, done = await gather(run, first)
        if body.response_format == "text":
            return PlainTextResponse(done.text)
        if body.response_format == "verbose_json":
            return verbose_transcription(done.text, ids, seconds, body, done)
        return {"text": done.text, "usage": transcription_usage(done)}

    async def _sse_transcript(self, run: Run, first):
        event = first
        try:
            while True:
                if isinstance(event, TextDelta) and event.text:
                    yield sse({"type": "transcript.text.delta", "delta": event.text})
                elif isinstance(event, Done):
                    yield sse({"type": "transcript.text.done", "text": event.text,
                                "usage": transcription_usage(event)})
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, ErrorEvent):
                    yield sse({"type": "error", "error": stage_error(event).body()["error"]})
                    return
                event = await anext(run)
        finally:
            await run.aclose()
