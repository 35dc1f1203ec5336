"""The FastAPI ingress: the only place that knows HTTP. It validates requests into OpenAI's shapes, runs
them through `actors.orchestration.run_request` over the stage DeploymentHandles (`ServeStageClients`) and
maps every refusal to OpenAI's error JSON with a 4xx status (stage failures are 503 with Retry-After).

Routes here: /v1/audio/speech, /v1/audio/transcriptions, /v1/audio/voices, /v1/models[/{id}], /health; the chat
route is in serve.routes_chat, the /v1/realtime WebSocket and the page at / in serve.routes_realtime. The app
and shared helpers are in serve.http, checks in serve.api / serve.uploads, chat shapes in serve.chat_format.
"""
import asyncio
import json

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from ray import serve

from actors.orchestration import Limits
from actors.requests import Caps, model_caps
from actors.payloads import AudioChunk, AudioPayload, Done, ErrorEvent, TextDelta
from serve import chat_format
from serve.api import MODEL_ID, APIError, SpeechBody, TranscriptionForm, subtitles
from serve.audio_formats import CONTENT_TYPES, PcmStream, encode
from serve.deployments import ServeStageClients
from serve.health import health_response
from serve.hygiene import is_json, is_multipart_form
from serve.http import (StreamAborted, RETRY_AFTER_S, Run, app, b64, check_text, gather, joined_pcm, refused,
                        request_options, speech_usage, sse, stage_error, streamed, encode_audio, transcription_usage,
                        usage_headers, verbose_transcription)
from serve.routes_batch import BatchRoutes
from serve.routes_chat import ChatRoutes
from serve.routes_realtime import RealtimeRoutes
from serve.uploads import admit_upload
from serve.keys import KeySet
from serve.state import open_store
from serve.voices import MAX_VOICE_SECONDS, VoiceStore

# Helpers live in serve.http (imported modules reach the replica whole; names defined below the decorated
# class in this module would be missing there).


@serve.ingress(app)
class Ingress(ChatRoutes, RealtimeRoutes, BatchRoutes):
    """Holds the stage handles, the caps, the voice store; one method per route."""

    def __init__(self, encoder, llm, decoder, caps: dict, api_key: str | None = None, limits: Limits = Limits(),
                 llm_path: str | None = None, *, api_keys_file: str | None = None, state: str | None = None,
                 batch: dict | None = None):
        """`limits`: the pipeline config's (`serve.app` builds them from its args); `llm_path`: the model's
        folder, whose caps (positions, tokenizer) the request policy checks requests against; `api_key` +
        `api_keys_file` (+ the env: serve.keys) the accepted keys; `state`: the state store's URL (serve.state;
        None: this process only). Every replica opens the same store: no replica keeps what another needs."""
        self.clients = ServeStageClients(encoder, llm, decoder)
        self.limits = limits
        self.caps = caps
        operator_caps = dict(max_new_tokens=caps["max_tokens"], max_text_chars=caps["max_text_chars"])
        self.request_caps = model_caps(llm_path, **operator_caps) if llm_path else Caps(**operator_caps)
        self.api_key = api_key
        self.keys = KeySet(api_key, keys_file=api_keys_file)
        self.state = open_store(state or "memory")
        self.voice_store = VoiceStore(self.state)
        self.answers = chat_format.AudioAnswers(state=self.state)
        self.batch_settings = batch or {}  # the batch API's files folder, models, job settings (serve.routes_batch)

    def _run(self, route: str, task: str, **options) -> Run:
        return Run(self.clients, self.limits, route, task, caps=self.request_caps, **options)

    # -- shared checks -----------------------------------------------------------------------------------
    async def _json(self, request: Request) -> dict:
        self._auth(request)
        if not is_json(request.headers.get("content-type")):  # the media type, parsed: text/plain;json is not JSON
            raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
        body = await self._body(request)
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
        if not is_multipart_form(request.headers.get("content-type")):
            raise APIError(415, "Content-Type must be multipart/form-data (a file upload)", code="unsupported_media_type")
        await self._body(request)  # the cap first; request.form() then parses the kept body
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

    def _auth(self, request: Request) -> str:
        """The caller's owner id (serve.keys.owner_id; "" on an endpoint without keys), else 401."""
        return self.keys.check(request.headers.get("authorization"))

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
        """The stages' health, in this replica's request slots; serve.health answers it outside them (readiness)."""
        return health_response(await self.clients.check_health())

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "vita-audio"}]}

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request):
        """OpenAI's models.retrieve; an unknown id is a 404 model_not_found."""
        self._auth(request)
        self._model(model)
        return {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "vita-audio"}

    @app.get("/v1/audio/voices")
    async def voices(self, request: Request):
        owner = self._auth(request)
        return await asyncio.to_thread(self.voice_store.listing, owner)

    @app.post("/v1/audio/voices")
    async def upload_voice(self, request: Request):
        """A voice prompt from a short clip (OpenAI's voices.create: audio_sample + name [+ consent, type])."""
        fields, data = await self._form(request, "audio_sample")
        owner = self._auth(request)
        unknown = set(fields) - {"name", "consent", "type"}
        if unknown:
            raise APIError(400, f"unknown field(s) {sorted(unknown)}", param=sorted(unknown)[0])
        name = fields.get("name", "")
        if not name.strip() or len(name) > 64:
            raise APIError(400, "name must be a non-empty text of at most 64 characters", param="name")
        if fields.get("type", "audio_sample") != "audio_sample":
            raise APIError(400, f"type={fields['type']!r}: only audio_sample voices are supported", param="type")
        await asyncio.to_thread(self.voice_store.check_new, name, owner)
        payload = await self._audio(data, "audio_sample", MAX_VOICE_SECONDS)
        payload.name = f"voice {name}"
        codes = await encode_audio(self.clients, payload)
        voice = await asyncio.to_thread(self.voice_store.add, name, codes, payload.seconds, owner, fields.get("consent"))
        return voice.describe()

    @app.get("/v1/audio/voices/{voice_id}")
    async def get_voice(self, voice_id: str, request: Request):
        owner = self._auth(request)
        return (await asyncio.to_thread(self.voice_store.get, voice_id, owner)).describe()

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(self, voice_id: str, request: Request):
        owner = self._auth(request)
        await asyncio.to_thread(self.voice_store.delete, voice_id, owner)
        return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}

    @app.post("/v1/audio/speech")
    async def speech(self, request: Request):
        data = await self._json(request)
        try:
            body = SpeechBody.model_validate(data)
        except ValidationError as err:
            raise refused(err) from None
        self._model(body.model)
        voice = await asyncio.to_thread(self.voice_store.resolve, body.voice, "voice", self._auth(request))
        body.check_supported()
        options = request_options(body, self.request_caps, body.max_new_tokens)
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
        event, pcm = first, PcmStream()  # 24 kHz through one soxr stream (serve.audio_formats)
        try:
            while True:
                if isinstance(event, AudioChunk) and (data := pcm.chunk(event.pcm, event.sample_rate)):
                    yield data
                if isinstance(event, Done) and (data := pcm.end()):
                    yield data
                if isinstance(event, ErrorEvent):  # the status is sent: abort the body (no terminating chunk)
                    raise StreamAborted(stage_error(event).message)  # so the client sees an error, not a short EOF
                if isinstance(event, Done):
                    return
                event = await anext(run)
        finally:
            await run.aclose()

    async def _sse_speech(self, run: Run, first, fmt: str):
        event, pcm = first, PcmStream()
        try:
            while True:
                if isinstance(event, AudioChunk):
                    audio = pcm.chunk(event.pcm, event.sample_rate) if fmt == "pcm" else encode(event.pcm,
                                                                                               event.sample_rate, fmt)
                    if audio:
                        yield sse({"type": "speech.audio.delta", "audio": b64(audio)})
                elif isinstance(event, Done):
                    if fmt == "pcm" and (tail := pcm.end()):
                        yield sse({"type": "speech.audio.delta", "audio": b64(tail)})
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
        body.check_supported()
        options = request_options(body, self.request_caps, body.max_new_tokens)
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
        if body.response_format in ("srt", "vtt"):  # the verbose_json segments' timing as subtitles
            segments = verbose_transcription(done.text, ids, seconds, body, done)["segments"]
            return PlainTextResponse(subtitles(segments, body.response_format))
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
