"""OpenAI's Batch API on the endpoint: /v1/files (upload with purpose, list, retrieve, content, delete) and
/v1/batches (create, retrieve, list, cancel), for the endpoints /v1/audio/speech, /v1/audio/transcriptions and
/v1/chat/completions.

- **Create** (`validating`): every line of the input JSONL (`custom_id`, `method`, `url`, `body`) is checked here
  with the online route's own body model and request policy (serve.api, serve.http.request_options, the chat
  parser, the voices and audio answers of the caller). A bad line becomes an error line naming its custom_id;
  only a file that is not JSONL, a line without a custom_id, or a custom_id given twice fails the batch (as
  OpenAI's validation does). A line's `url` is any of the three (a batch may mix them). The accepted lines are written as job specs (jobs.batch.openai_batch) to the
  batch's run folder, and a detached driver actor named by the batch id starts the Ray Data job
  (jobs.batch.driver): `in_progress`.
- **Audio in**: a transcription's `file`, a chat `input_audio` part: a file id (`"file-..."` or
  `{"file_id": ...}`) of the caller's, a URL under one of `Args.batch_url_prefixes` (`{"url": "s3://..."}`: the
  object store the cluster reads), or base64 (`{"data": ...}`, OpenAI's chat shape).
- **Retrieve / list** look at the run folder: `request_counts` from the job's progress, a driver that died
  part-way is started again (the run folder resumes, never duplicates); when the job ended, the endpoint
  finalizes (`finalizing`): it writes the output and error JSONL files, one line per custom_id
  (`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`), each body in the online
  route's shape; spoken answers are files of their own (purpose batch_output) referenced by `file_id`, never
  base64 in the JSONL. Then `completed` (or `cancelled`, `failed`, `expired`).
- **Cancel** (`cancelling`): the job stops at its next block boundary; the lines finished by then are in the
  output file.
- **Records**: every change of a batch record is a compare-and-set in the state store (`_update`: the change is
  recomputed from the record as it stands and written at its version, retried a few times when another replica
  or request came between), and moves the batch only forward (`validating → in_progress → cancelling →
  finalizing → completed | failed | cancelled | expired`; a final status never changes). So a poll that refreshes
  the counts never writes `in_progress` over a concurrent cancel, and of two replicas polling an ended job at
  once one claims `finalizing` and writes the output files, the other waits for its answer. A finalizer that
  went away (its replica lost) is taken over after `FINALIZE_LEASE_S`.
Batches (kind BATCH) and files (kind FILE) belong to the API key that created them: another key gets 404.
The files store, and with it each batch's run folder (`FILES/batches/BATCH_ID`), may be on object storage
(`Args.files = s3://...`, serve.files): every path here is a `jobs.storage` location, so a driver on any node
reads and writes the same folder, and a restarted endpoint finds its batches where they stand.

A mixin of the ingress class (routes register on serve.http.app); expects the ingress' caps, request_caps,
voice_store, answers, api_key, batch settings and its _auth / _body / _json / _model / _chat_text_cap.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError

from actors.payloads import LAYOUT_AUTO, Done
from jobs.batch import driver as drivers
from jobs.batch.openai_batch import (OpenAIBatchConfig, cancel_requested, read_pcm, read_progress, read_results,
                                     read_specs, request_cancel, write_specs)
from jobs.pools import PoolConfig
from jobs.storage import location, write_atomic
from serve import chat_format
import serve.api as api
from serve.api import MODEL_ID, APIError, AudioOut, ChatBody, SpeechBody, TranscriptionForm
from serve.audio_formats import encode
from serve.files import UPLOAD_PURPOSES, FileStore, default_files_dir
from serve.http import (app, check_text, refused, request_options, speech_usage, transcription_usage,
                        verbose_transcription)
from serve.keys import OPEN_OWNER, owner_id
from serve.state import BATCH, NotFound, Stale, default_state, open_store

ENDPOINTS = ("/v1/audio/speech", "/v1/audio/transcriptions", "/v1/chat/completions")
COMPLETION_WINDOW_S = {"24h": 24 * 3600}
MAX_LINES = 50_000  # OpenAI's cap on requests per batch
MAX_FILE_BYTES = 200 * 2**20  # OpenAI's cap on a batch input file
FINAL = ("completed", "failed", "cancelled", "expired")
STAGES = {"validating": 0, "in_progress": 1, "cancelling": 2, "finalizing": 3, **dict.fromkeys(FINAL, 4)}
UPDATE_TRIES = 20  # compare-and-set attempts of one change before the request is answered 503
FINALIZE_LEASE_S = 1800  # a batch `finalizing` this long lost its finalizer (replica gone): another takes over
FINALIZE_WAIT_S = 30.0  # how long a poll waits for another replica's finalize before answering `finalizing`
CHAT_AUDIO_OUT = {"wav": "wav", "flac": "flac", "pcm16": "pcm", "mp3": "mp3", "opus": "opus"}
REFUSED = "refused.jsonl"
VALIDATION_S = 600  # a batch still `validating` after this long lost its replica: failed


def not_found(kind: str, item_id: str) -> APIError:
    return APIError(404, f"No such {kind}: {item_id!r}", code="not_found")


class BatchRoutes:
    """/v1/files and /v1/batches (module docstring)."""

    # -- where things live ----------------------------------------------------------------------------------
    def _batch_state(self):
        state = getattr(self, "state", None)
        if state is None:
            state = getattr(self, "_own_batch_state", None) or open_store(default_state())
            self._own_batch_state = state
        return state

    def _file_store(self) -> FileStore:
        settings = getattr(self, "batch_settings", None) or {}
        return FileStore(self._batch_state(), settings.get("files") or default_files_dir())

    def _owner(self, request: Request) -> str:
        owner = self._auth(request)
        if isinstance(owner, str):
            return owner
        return owner_id(self.api_key) if self.api_key else OPEN_OWNER

    # -- /v1/files -------------------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def create_file(self, request: Request):
        owner = self._owner(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(415, "Content-Type must be multipart/form-data (file and purpose)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_FILE_BYTES + 65536:
            raise APIError(413, f"file over {MAX_FILE_BYTES} bytes", code="max_file_bytes")
        try:
            form = await request.form(max_part_size=MAX_FILE_BYTES)
        except Exception as err:
            raise APIError(400, f"body is not valid multipart/form-data: {err}") from None
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "file is required (an uploaded file)", param="file")
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(400, f"purpose={purpose!r}; expected one of {UPLOAD_PURPOSES}", param="purpose")
        size = upload.size if upload.size is not None else len(await upload.read())
        if size > MAX_FILE_BYTES:
            raise APIError(413, f"file of {size} bytes exceeds {MAX_FILE_BYTES}", param="file",
                           code="max_file_bytes")
        await upload.seek(0)
        filename = Path(upload.filename or "upload").name[:256] or "upload"
        # the spooled upload copied in chunks: one file, or one object on an object store
        return await asyncio.to_thread(self._file_store().create, owner, upload.file, filename, purpose)

    @app.get("/v1/files")
    async def list_files(self, request: Request, purpose: str | None = None, limit: int = 10000,
                         after: str | None = None, order: str = "desc"):
        owner = self._owner(request)
        items = await asyncio.to_thread(self._file_store().list, owner, purpose)
        return _page(items, limit, after, order)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(self, file_id: str, request: Request):
        owner = self._owner(request)
        try:
            return self._file_store().get(owner, file_id)
        except NotFound:
            raise not_found("File", file_id) from None

    @app.get("/v1/files/{file_id}/content")
    async def file_content(self, file_id: str, request: Request):
        owner = self._owner(request)
        try:
            files = self._file_store()
            obj, path = files.get(owner, file_id), files.location(owner, file_id)
        except NotFound:
            raise not_found("File", file_id) from None
        media_type = _media_type(obj["filename"])
        if isinstance(path, Path):
            return FileResponse(path, media_type=media_type, filename=obj["filename"])
        return StreamingResponse(files.chunks(owner, file_id), media_type=media_type, headers={
            "content-length": str(obj["bytes"]), "content-disposition": f'attachment; filename="{obj["filename"]}"'})

    @app.delete("/v1/files/{file_id}")
    async def delete_file(self, file_id: str, request: Request):
        owner = self._owner(request)
        try:
            await asyncio.to_thread(self._file_store().delete, owner, file_id)
        except NotFound:
            raise not_found("File", file_id) from None
        return {"id": file_id, "object": "file", "deleted": True}

    # -- /v1/batches -----------------------------------------------------------------------------------------
    @app.post("/v1/batches")
    async def create_batch(self, request: Request):
        data = await self._json(request)
        owner = self._owner(request)
        unknown = set(data) - {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
        if unknown:
            raise APIError(400, f"unknown field(s) {sorted(unknown)}", param=sorted(unknown)[0])
        endpoint, window = data.get("endpoint"), data.get("completion_window")
        if endpoint not in ENDPOINTS:
            raise APIError(400, f"endpoint={endpoint!r}; this server batches {', '.join(ENDPOINTS)}", param="endpoint")
        if window not in COMPLETION_WINDOW_S:
            raise APIError(400, f"completion_window={window!r}; only '24h' is supported", param="completion_window")
        metadata = _metadata(data.get("metadata"))
        input_id = data.get("input_file_id")
        files = self._file_store()
        try:
            source = files.get(owner, input_id) if isinstance(input_id, str) else None
        except NotFound:
            source = None
        if source is None:
            raise not_found("File", str(input_id))
        if source["purpose"] != "batch":
            raise APIError(400, f"file {input_id!r} has purpose {source['purpose']!r}; upload the input with "
                                "purpose='batch'", param="input_file_id")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        batch = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_id,
                 "completion_window": window, "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": now, "in_progress_at": None, "expires_at": now + COMPLETION_WINDOW_S[window],
                 "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
                 "cancelling_at": None, "cancelled_at": None, "model": MODEL_ID,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata}
        folder = files.root / "batches" / batch_id
        record = {"batch": batch, "folder": str(folder), "job": False}  # job: a driver runs its lines
        state = self._batch_state()
        state.create(BATCH, owner, record, id=batch_id)
        record = await asyncio.to_thread(self._validate_and_start, owner, record, files.location(owner, input_id))
        return record["batch"]

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(self, batch_id: str, request: Request):
        owner = self._owner(request)
        return (await asyncio.to_thread(self._refresh, owner, self._get_batch(owner, batch_id)))["batch"]

    @app.get("/v1/batches")
    async def list_batches(self, request: Request, limit: int = 20, after: str | None = None):
        owner = self._owner(request)

        def listing():  # a batch another request is finalizing is listed as `finalizing` (not waited for)
            return [self._refresh(owner, r.data, wait=False)["batch"] for r in self._batch_state().list(BATCH, owner)]

        return _page(await asyncio.to_thread(listing), limit, after, "desc")

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(self, batch_id: str, request: Request):
        owner = self._owner(request)
        record = self._get_batch(owner, batch_id)

        def stop(record):
            batch = record["batch"]
            if batch["status"] in ("completed", "failed", "expired"):
                raise APIError(409, f"batch {batch_id} is {batch['status']}: it cannot be cancelled",
                               code="batch_not_cancellable")
            if batch["status"] not in ("validating", "in_progress"):
                return None  # cancelling, finalizing or cancelled already: as it stands
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            return record

        def cancel():
            if record["batch"]["status"] in ("validating", "in_progress"):  # the job's marker before the record
                folder = location(record["folder"], "files")
                folder.mkdir(parents=True, exist_ok=True)  # a batch still validating may have no folder yet
                request_cancel(folder)
            return self._refresh(owner, self._update(owner, batch_id, stop)[0])

        return (await asyncio.to_thread(cancel))["batch"]

    def _get_batch(self, owner: str, batch_id: str) -> dict:
        try:
            return self._batch_state().get(BATCH, owner, batch_id).data
        except (NotFound, ValueError):
            raise not_found("Batch", batch_id) from None

    def _update(self, owner: str, batch_id: str, change: Callable[[dict], dict | None]) -> tuple[dict, bool]:
        """One change of a batch record, as a compare-and-set: `change` gets a copy of the record as it stands
        and returns it changed (or None: nothing to write); it is written only at the version it was computed
        from, else recomputed from the fresh record (UPDATE_TRIES times, then 503). A change that would move the
        batch back (`STAGES`; a final status never changes) is not written. The record as it stands after, and
        whether this call wrote it."""
        state = self._batch_state()
        for attempt in range(UPDATE_TRIES):
            try:
                held = state.get(BATCH, owner, batch_id)
            except (NotFound, ValueError):
                raise not_found("Batch", batch_id) from None
            record = change(copy.deepcopy(held.data))
            if record is None or not _forward(held.data["batch"]["status"], record["batch"]["status"]):
                return held.data, False
            try:
                return state.put(BATCH, owner, batch_id, record, if_version=held.version).data, True
            except Stale:  # another writer came between: recompute from theirs
                time.sleep(random.uniform(0, 0.005 * (attempt + 1)))
            except NotFound:
                raise not_found("Batch", batch_id) from None
        raise APIError(503, f"batch {batch_id} is being changed by many requests at once; try again",
                       type="server_error", code="batch_busy")

    # -- validation and start --------------------------------------------------------------------------------
    def _validate_and_start(self, owner: str, record: dict, input_path) -> dict:
        batch_id, folder = record["batch"]["id"], location(record["folder"], "files")
        try:
            specs, refusals = self._check_lines(owner, input_path.read_bytes())
        except APIError as err:  # the file itself is unusable: the batch fails validation
            errors = {"object": "list", "data": [{"code": err.code or "invalid_input_file", "message": err.message,
                                                  "param": err.param, "line": None}]}

            def fail(record):
                record["batch"].update(status="failed", failed_at=int(time.time()), errors=errors)
                return record

            return self._update(owner, batch_id, fail)[0]
        folder.mkdir(parents=True, exist_ok=True)
        write_specs(folder, specs)
        write_atomic(folder / REFUSED, "".join(json.dumps(r) + "\n" for r in refusals))
        if not specs:  # nothing to run: the job has ended already
            write_atomic(folder / drivers.STATE, json.dumps({"state": "completed", "ended_at": time.time()}))
        counts = {"total": len(specs) + len(refusals), "completed": 0, "failed": len(refusals)}

        def start(record):
            batch = record["batch"]
            if batch["status"] not in ("validating", "cancelling"):
                return None  # failed meanwhile (validation_interrupted): nothing starts
            record["job"] = bool(specs)
            batch["request_counts"] = counts
            if batch["status"] == "validating":  # a batch cancelled while validating runs to its first boundary
                batch.update(status="in_progress", in_progress_at=int(time.time()))
            return record

        record, started = self._update(owner, batch_id, start)
        if started and specs:
            self._start_driver(batch_id, folder)
        return record

    def _job_config(self, folder) -> OpenAIBatchConfig:
        settings = getattr(self, "batch_settings", None) or {}
        return OpenAIBatchConfig(folder=str(folder), models=settings.get("models"),
                                 max_new_tokens_cap=self.caps["max_tokens"], max_text_chars=self.caps["max_text_chars"],
                                 max_audio_seconds=self.caps["max_audio_seconds"],
                                 block_size=int(settings.get("block_size") or 16),
                                 pool=PoolConfig(**(settings.get("pool") or {})))

    def _start_driver(self, batch_id: str, folder) -> None:
        drivers.start_driver(batch_id, self._job_config(folder))

    def _check_lines(self, owner: str, data: bytes) -> tuple[list[dict], list[dict]]:
        """(job specs, refusals) for the input file's lines; the file's own problems raise APIError."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "the input file is not UTF-8 text (JSONL)") from None
        specs, refusals, seen = [], [], set()
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
        if not lines:
            raise APIError(400, "the input file holds no requests", code="empty_file")
        if len(lines) > MAX_LINES:
            raise APIError(400, f"the input file holds {len(lines)} requests, over {MAX_LINES}", code="too_many_lines")
        for n, line in lines:
            try:
                item = json.loads(line)
            except ValueError as err:
                raise APIError(400, f"line {n} is not JSON ({err})", code="invalid_json_line") from None
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not custom_id:
                raise APIError(400, f"line {n} has no custom_id (a non-empty string)", param="custom_id",
                               code="missing_custom_id")
            if custom_id in seen:
                raise APIError(400, f"line {n}: custom_id {custom_id!r} appears twice; custom_ids must be unique",
                               param="custom_id", code="duplicate_custom_id")
            seen.add(custom_id)
            try:
                spec = self._check_line(owner, item)
            except APIError as err:
                refusals.append({"line": n, "custom_id": custom_id, "status_code": err.status, "body": err.body()})
                continue
            specs.append({**spec, "custom_id": custom_id, "line": n})
        return specs, refusals

    def _check_line(self, owner: str, item: dict) -> dict:
        unknown = set(item) - {"custom_id", "method", "url", "body"}
        if unknown:
            raise APIError(400, f"unknown field(s) {sorted(unknown)} in the request line", param=sorted(unknown)[0])
        if item.get("method") != "POST":
            raise APIError(400, f"method={item.get('method')!r}; expected 'POST'", param="method")
        url = item.get("url")
        if url not in ENDPOINTS:  # (OpenAI holds a batch to its one endpoint; a speech batch may mix the three)
            raise APIError(400, f"url={url!r}; a line goes to one of {', '.join(ENDPOINTS)}", param="url")
        body = item.get("body")
        if not isinstance(body, dict):
            raise APIError(400, "body must be a JSON object", param="body")
        check = {"/v1/audio/speech": self._speech_spec, "/v1/audio/transcriptions": self._transcription_spec,
                 "/v1/chat/completions": self._chat_spec}[url]
        return check(owner, body)

    def _speech_spec(self, owner: str, data: dict) -> dict:
        """The checks of POST /v1/audio/speech (serve.ingress.speech), as a job spec."""
        try:
            body = SpeechBody.model_validate(data)
        except ValidationError as err:
            raise refused(err) from None
        self._model(body.model)
        if body.stream_format != "audio":
            raise APIError(400, "stream_format='sse' does not apply to a batch", param="stream_format")
        voice = self.voice_store.resolve(body.voice, "voice", owner)
        _check_supported(body)
        options = request_options(body, self.request_caps, body.max_new_tokens)
        check_text(body.input, self.request_caps, "input", options.max_new_tokens)
        return {"task": "tts", "text": body.input, "voice": voice,
                "options": _raw_options(body, body.max_new_tokens, LAYOUT_AUTO),
                "output": {"kind": "speech", "format": body.response_format}}

    def _transcription_spec(self, owner: str, data: dict) -> dict:
        """The checks of POST /v1/audio/transcriptions, its fields as JSON; `file` is an audio reference."""
        data = dict(data)
        audio = self._audio_ref(owner, data.pop("file", None), "file")
        try:
            body = TranscriptionForm.model_validate(data)
        except ValidationError as err:
            raise refused(err) from None
        self._model(body.model)
        _check_supported(body)
        request_options(body, self.request_caps, body.max_new_tokens)
        if body.stream:
            raise APIError(400, "stream=true does not apply to a batch", param="stream")
        return {"task": "asr", "audio": audio, "audio_param": "file",
                "options": _raw_options(body, body.max_new_tokens, LAYOUT_AUTO),
                "output": {"kind": "transcription", "form": data}}

    def _chat_spec(self, owner: str, data: dict) -> dict:
        """The checks of POST /v1/chat/completions (serve.routes_chat), with audio parts as references."""
        refs: list[dict] = []
        data = {**data, "messages": self._audio_parts_as_markers(owner, data.get("messages"), refs)}
        try:
            body = ChatBody.model_validate(data)
        except ValidationError as err:
            raise refused(err) from None
        self._model(body.model)
        if body.stream:
            raise APIError(400, "stream=true does not apply to a batch", param="stream")
        _check_supported(body)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new_tokens = next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None), 256)
        speak = "audio" in body.modalities
        layout = LAYOUT_AUTO if speak else "text"
        request_options(body, self.request_caps, max_new_tokens, param, layout)
        audio_out = body.audio or AudioOut()
        conversation = chat_format.parse_messages(body.messages)
        voice = self.voice_store.resolve(audio_out.voice, "audio.voice", owner) if body.audio else None
        if voice is not None and conversation.system is not None:
            raise APIError(400, "give either a system message or a custom voice: the voice prompt is the system turn",
                           param="audio.voice")
        self._chat_text_cap(conversation)
        last = conversation.last
        if not last.audios:
            check_text("\n".join(last.texts), self.request_caps, "messages.content")
        history = []
        for i, turn in enumerate(conversation.history):
            transcript = self.answers.transcript(turn.audio_id, f"messages[{i}].audio", owner) if turn.audio_id \
                else None
            history.append(chat_format.history_entry(turn, [_ref_of(c, refs) for c in turn.audios], transcript))
        spec = {"task": "chat", "history": history, "system": conversation.system, "voice": voice,
                "options": _raw_options(body, max_new_tokens, layout),
                "output": {"kind": "chat", "speak": speak, "format": audio_out.format, "voice_tokens": len(voice or ())}}
        if last.audios:
            spec.update(audio=_ref_of(last.audios[0], refs), audio_param="messages.input_audio")
        else:
            spec["text"] = "\n".join(last.texts)
        return spec

    def _audio_parts_as_markers(self, owner: str, messages, refs: list[dict]):
        """Chat messages whose input_audio parts are resolved to references (`refs`) and replaced by a marker
        the chat parser takes (base64 of b"\\0ref:K"), so the one parser checks every message."""
        if not isinstance(messages, list):
            return messages
        out = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                out.append(message)
                continue
            parts = []
            for j, part in enumerate(content):
                audio = part.get("input_audio") if isinstance(part, dict) and part.get("type") == "input_audio" else None
                if isinstance(audio, dict):
                    param = f"messages[{i}].content[{j}].input_audio"
                    source = audio.get("data") if "data" in audio else {k: audio[k] for k in ("file_id", "url") if k in audio}
                    refs.append(self._audio_ref(owner, source, param))
                    marker = base64.b64encode(f"\0ref:{len(refs) - 1}".encode()).decode()
                    part = {**part, "input_audio": {"format": audio.get("format", "wav"), "data": marker}}
                parts.append(part)
            out.append({**message, "content": parts})
        return out

    def _audio_ref(self, owner: str, source, param: str) -> dict:
        """An audio input of a line: a file id of the caller's, a URL under the allowed prefixes, or base64."""
        if isinstance(source, str) and source.startswith("file-"):
            source = {"file_id": source}
        if isinstance(source, str) and source:
            if source.startswith("data:") and ";base64," in source:
                source = source.split(";base64,", 1)[1]
            try:
                base64.b64decode(source, validate=True)
            except ValueError as err:
                raise APIError(400, f"{param} is not valid base64, a file id or {{'url': ...}}: {err}",
                               param=param) from None
            return {"b64": source}
        if isinstance(source, dict) and isinstance(source.get("file_id"), str):
            try:
                blob = self._file_store().location(owner, source["file_id"])
            except NotFound:
                raise APIError(400, f"{param}: no such file {source['file_id']!r}", param=param) from None
            # a file of the files store: a local path, or its URL on the object store (trusted: ours)
            return {"path": str(blob)} if isinstance(blob, Path) else {"url": str(blob)}
        if isinstance(source, dict) and isinstance(source.get("url"), str):
            url = source["url"]
            prefixes = (getattr(self, "batch_settings", None) or {}).get("url_prefixes") or ()
            if not any(url.startswith(p) for p in prefixes):
                allowed = ", ".join(prefixes) or "none are configured (Args.batch_url_prefixes)"
                raise APIError(400, f"{param}: url {url!r} is not under an allowed prefix ({allowed})", param=param)
            return {"url": url}
        raise APIError(400, f"{param}: give the audio as a file id, {{'url': ...}} or base64 data", param=param)

    # -- progress and finalizing -----------------------------------------------------------------------------
    def _refresh(self, owner: str, record: dict, wait: bool = True) -> dict:
        """The batch as it stands: counts from the job, a dead driver restarted, an ended job finalized (by one
        request: `wait`: another's finalize is waited for, up to FINALIZE_WAIT_S)."""
        batch, folder = record["batch"], location(record["folder"], "files")
        if batch["status"] in FINAL:
            return record
        if batch["status"] == "validating":
            if time.time() <= batch["created_at"] + VALIDATION_S:
                return record
            # the replica that validated it went away before it started the job (validation is synchronous)
            errors = {"object": "list", "data": [{"code": "validation_interrupted", "message": "the endpoint "
                      "restarted while validating the input; create the batch again", "param": None, "line": None}]}

            def interrupt(record):
                if record["batch"]["status"] != "validating":
                    return None
                record["batch"].update(status="failed", failed_at=int(time.time()), errors=errors)
                return record

            return self._update(owner, batch["id"], interrupt)[0]
        end = drivers.ended(folder)
        if end is None:
            return self._progress(owner, record, folder)
        if end["state"] == "failed":
            if record.get("job", True):
                drivers.stop_driver(batch["id"])  # it has ended: free its actor
            errors = {"object": "list", "data": [{"code": "batch_failed", "message": end.get("error"),
                                                  "param": None, "line": None}]}

            def fail(record):
                record["batch"].update(status="failed", failed_at=int(time.time()), errors=errors)
                return record

            return self._update(owner, batch["id"], fail)[0]
        record = self._settle(owner, record, end)
        if wait:  # another request finalizes it: its answer (the output files), once written
            deadline = time.monotonic() + FINALIZE_WAIT_S
            while record["batch"]["status"] == "finalizing" and time.monotonic() < deadline:
                time.sleep(0.05)
                record = self._get_batch(owner, batch["id"])
        return record

    def _progress(self, owner: str, record: dict, folder) -> dict:
        """A running job's counts (never lower than recorded), a dead driver restarted, an expired batch
        stopped."""
        batch = record["batch"]
        expired = time.time() > batch["expires_at"]
        if expired and not cancel_requested(folder):
            request_cancel(folder)
        if record.get("job", True) and not drivers.driver_alive(batch["id"]):
            self._start_driver(batch["id"], folder)  # resumes at the first block without a result file
        progress = read_progress(folder)
        refused_lines = len(_read_jsonl(folder / REFUSED))

        def count(record):
            batch = record["batch"]
            if batch["status"] not in ("in_progress", "cancelling"):
                return None
            counts = batch["request_counts"]
            fresh = {**counts, "completed": max(counts["completed"], progress["completed"]),
                     "failed": max(counts["failed"], progress["failed"] + refused_lines)}
            expired_at = batch["expired_at"] or (int(time.time()) if expired else None)
            if fresh == counts and expired_at == batch["expired_at"]:
                return None
            batch.update(request_counts=fresh, expired_at=expired_at)
            return record

        return self._update(owner, batch["id"], count)[0]

    def _settle(self, owner: str, record: dict, end: dict) -> dict:
        """An ended job's batch finalized once: this request claims it (`finalizing`, by a token of its own)
        unless another holds the claim, writes the output files and the final status. A claim older than
        FINALIZE_LEASE_S (its replica lost) is taken over; the files' ids are the same on every finalize."""
        batch_id, token = record["batch"]["id"], uuid.uuid4().hex

        def claim(record):
            batch, now = record["batch"], int(time.time())
            lapsed = batch["status"] == "finalizing" and now > (batch["finalizing_at"] or 0) + FINALIZE_LEASE_S
            if batch["status"] not in ("in_progress", "cancelling") and not lapsed:
                return None
            batch.update(status="finalizing", finalizing_at=now)
            record["finalizer"] = token
            return record

        record, claimed = self._update(owner, batch_id, claim)
        if not claimed:
            return record
        if record.get("job", True):
            drivers.stop_driver(batch_id)  # it has ended: free its actor
        fields = self._finalize(owner, record)

        def finish(record):
            batch, now = record["batch"], int(time.time())
            if batch["status"] != "finalizing" or record.get("finalizer") != token:
                return None  # taken over (this request was slower than the lease)
            if batch["expired_at"]:
                batch.update(status="expired")
            elif batch["cancelling_at"] or end["state"] == "cancelled":
                batch.update(status="cancelled", cancelled_at=now)
            else:
                batch.update(status="completed", completed_at=now)
            batch.update(fields)
            return record

        return self._update(owner, batch_id, finish)[0]

    def _finalize(self, owner: str, record: dict) -> dict:
        """The output and error files: one line per custom_id the batch ran (or refused), in input order. The
        batch's fields for them (their file ids, the final counts)."""
        batch, folder = record["batch"], location(record["folder"], "files")
        files = self._file_store()
        specs = {s["custom_id"]: s for s in read_specs(folder)}
        lines = []  # (input line, output?, line)
        for r in _read_jsonl(folder / REFUSED):
            lines.append((r["line"], False, _line(batch["id"], r["custom_id"], r["status_code"], r["body"])))
        for row in read_results(folder):
            spec = specs[row["custom_id"]]
            if row["status"] == "ok":
                body = self._response_body(owner, batch["id"], spec, row, files)
                lines.append((spec["line"], True, _line(batch["id"], row["custom_id"], 200, body)))
            else:
                status, body = _row_error(row)
                lines.append((spec["line"], False, _line(batch["id"], row["custom_id"], status, body)))
        lines.sort(key=lambda x: x[0])
        outputs = [ln for _, ok, ln in lines if ok]
        errors = [ln for _, ok, ln in lines if not ok]
        fields = {"request_counts": {"total": batch["request_counts"]["total"], "completed": len(outputs),
                                     "failed": len(errors)}}
        for kind, chosen, key in (("output", outputs, "output_file_id"), ("error", errors, "error_file_id")):
            if not chosen and kind == "error":
                continue
            data = "".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in chosen).encode()
            obj = files.create(owner, data, f"{batch['id']}_{kind}.jsonl", "batch_output",
                               file_id=_derived_id(batch["id"], kind))
            fields[key] = obj["id"]
        return fields

    def _response_body(self, owner: str, batch_id: str, spec: dict, row: dict, files: FileStore):
        """The online route's response body for a result row (spoken audio as a file of its own)."""
        usage = json.loads(row["usage"] or "{}")
        done = Done(reason=row["reason"] or "stop", text=row["text"] or "", token_ids=list(row["token_ids"] or []),
                    audio_codes=[0] * int(row["audio_codes"] or 0), usage=usage, timings={})
        output = spec["output"]
        if output["kind"] == "transcription":
            form = TranscriptionForm.model_validate(output["form"])
            if form.response_format == "text":
                return done.text
            if form.response_format in ("verbose_json", "srt", "vtt"):
                verbose = verbose_transcription(done.text, done.token_ids, row["audio_seconds"] or 0.0, form, done)
                return verbose if form.response_format == "verbose_json" else \
                    api.subtitles(verbose["segments"], form.response_format)
            return {"text": done.text, "usage": transcription_usage(done)}
        if output["kind"] == "speech":
            fmt = output["format"]
            audio = self._audio_file(owner, batch_id, spec["custom_id"], row, fmt, fmt, files)
            return {"object": "audio.speech", "audio": audio, "usage": speech_usage(done)}
        message = {"role": "assistant", "content": done.text, "refusal": None}
        if output["speak"]:
            audio_id, expires_at = self.answers.add(done.text, owner)
            fmt = output["format"]
            audio = self._audio_file(owner, batch_id, spec["custom_id"], row, CHAT_AUDIO_OUT[fmt], fmt, files)
            message.update(content=None, audio={"id": audio_id, "file_id": audio["file_id"], "format": fmt,
                                                "expires_at": expires_at, "transcript": done.text})
        encoded = int(usage.get("encoder", {}).get("codes", 0))
        completion_id = "chatcmpl-" + hashlib.sha256(f"{batch_id}/{spec['custom_id']}".encode()).hexdigest()[:24]
        return chat_format.completion(completion_id, message, done,
                                      chat_format.chat_usage(done, output["voice_tokens"] + encoded))

    def _audio_file(self, owner, batch_id, custom_id, row, fmt: str, suffix: str, files: FileStore) -> dict:
        import numpy as np

        # the job's float32 PCM, a local file or an object (a driver on another node)
        pcm = read_pcm(row["audio"]) if row["audio"] else np.zeros(0, np.float32)
        data = encode(pcm, int(row["sample_rate"] or 22050), fmt)
        name = f"{custom_id}.{'pcm' if fmt == 'pcm' else suffix}"
        obj = files.create(owner, data, name, "batch_output", file_id=_derived_id(batch_id, f"audio/{custom_id}"))
        return {"file_id": obj["id"], "format": suffix, "bytes": obj["bytes"]}


# ---------------------------------------------------------------------------------------------------------
# helpers (module level: imported modules reach the replica whole)


def _check_supported(body) -> None:
    """The route's refusals of what the model cannot honour (the body model's own check, where it has one)."""
    check = getattr(body, "check_supported", None)
    if check is not None:
        check()


def _raw_options(body, max_new_tokens: int, layout) -> dict:
    """The line's options as the request policy takes them (checked already; the job checks them again)."""
    return {"mode": body.mode, "max_new_tokens": max_new_tokens, "layout": layout, **body.sampling_fields()}


def _ref_of(clip: bytes, refs: list[dict]) -> dict:
    text = clip.decode("latin-1") if clip.startswith(b"\0ref:") else ""
    return refs[int(text[5:])] if text else {"b64": base64.b64encode(clip).decode()}


def _line(batch_id: str, custom_id: str, status: int, body) -> dict:
    digest = hashlib.sha256(f"{batch_id}/{custom_id}".encode()).hexdigest()
    error = None
    if status >= 400:
        inner = body.get("error", {}) if isinstance(body, dict) else {}
        error = {"code": inner.get("code") or inner.get("type"), "message": inner.get("message")}
    return {"id": f"batch_req_{digest[:24]}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{digest[24:48]}", "body": body}, "error": error}


def _forward(old: str, new: str) -> bool:
    """Whether a batch may go from status `old` to `new`: only onwards, and never from a final status."""
    return old == new or (old not in FINAL and STAGES[new] > STAGES[old])


def _row_error(row: dict) -> tuple[int, dict]:
    """A failed row as the online route would answer it: the caller's input 400 (413 over a cap), a stage 503."""
    if row["error_stage"] == "input":
        status = 413 if row["error_code"] in ("max_audio_seconds", "max_decoded_bytes") else 400
        return status, APIError(status, row["error"], param=row["error_param"], code=row["error_code"]).body()
    return 503, APIError(503, f"{row['error_stage']} stage: {row['error']}", type="server_error",
                         code=row["error_code"] or "stage_failed").body()


def _derived_id(batch_id: str, what: str) -> str:
    """A batch output's file id, the same on every finalize (a finalize that runs twice writes the same files)."""
    return "file-" + hashlib.sha256(f"{batch_id}/{what}".encode()).hexdigest()[:24]


def _read_jsonl(path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def _metadata(value) -> dict | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > 16
            or any(not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512
                   for k, v in value.items())):
        raise APIError(400, "metadata: at most 16 string keys (<= 64 characters) with string values (<= 512)",
                       param="metadata")
    return value


def _page(items: list[dict], limit: int, after: str | None, order: str) -> dict:
    """OpenAI's cursor page: newest first (desc) or oldest first, after the item `after`."""
    if limit < 1:
        raise APIError(400, f"limit={limit}: must be >= 1", param="limit")
    items = sorted(items, key=lambda o: o["created_at"], reverse=order != "asc")
    if after is not None:
        ids = [o["id"] for o in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _media_type(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    return {".jsonl": "application/jsonl", ".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg",
            ".opus": "audio/ogg", ".pcm": "audio/pcm"}.get(suffix, "application/octet-stream")
