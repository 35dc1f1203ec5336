"""Live voice chat: the `/v1/realtime` WebSocket (OpenAI's Realtime API; event shapes in serve.realtime_events,
session state in serve.realtime) and the web page at `/` (serve/web/index.html, a client of that WebSocket).

Auth, when the app has keys: `Authorization: Bearer KEY` (the openai SDK sends it), or, from a browser that
cannot set headers, OpenAI's subprotocol `openai-insecure-api-key.KEY` beside `realtime`. A refused socket gets
an `error` event and close code 1008. A bad event gets an `error` event and the session goes on; every
response runs through `run_request` (`self._run`), and a client gone mid-response aborts it.

Hands-free: with `server_vad` each append feeds the session's Silero detector (off the event loop); a speech
stop commits the turn and starts the answer, a speech start while an answer plays cancels it (`turn_detected`)
and truncates it to what the user heard by the server's estimate (audio sent, up to the wall time since it
began), which the client may correct with `conversation.item.truncate`. With `audio.input.transcription` each
committed turn is transcribed by the model's ASR beside the answer (never before it).

Sessions survive the network: `session.created` carries a `resume_token`; the session of a socket that drops
(closed without a close frame, or with a code other than 1000 / 1001, which end the session) waits in the
state store (serve.state, owned by the caller's key: `Saved`) for `realtime_resume_grace_s`, and a socket
opened with `?resume=TOKEN` by the same key, on any ingress replica, continues it: the conversation, the
config, and the events the dropped socket missed (a response in progress is cancelled at the drop, its end is
among them). While a socket holds it, the session is kept in the store as it goes (the conversation when it
changes, and a lease renewed every HEARTBEAT_S), so that it survives its ingress replica too: a replica lost
without a word (killed, its node gone) stops renewing the lease, and LEASE_S later the session is resumable
elsewhere for the grace period; the response it was making ends there as `failed` (code `ingress_lost`). Its
saved conversation expires with the lease too (LEASE_S + the grace period after the last renewal), so a session
nobody resumes leaves the store soon after its grace period. A resume takes the session by a compare-and-set in
the store: of two sockets resuming one session at once exactly one continues it, the other is refused
(`session_in_use`, close 1013).
A session ends, with an `error` event naming why, at `realtime_max_session_s`, after
`turn_detection.idle_timeout_ms` without speech (`idle_timeout`), and a key holds at most
`realtime_sessions_per_key` sessions (open or resumable) at once.

A mixin of the ingress class (its routes register on serve.http.app; Serve finds inherited route methods).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

import actors.requests as policy
from actors.payloads import Done, ErrorEvent, TextDelta
from serve.api import MODEL_ID, APIError
from serve.http import app, logger, stage_error, encode_audio
from serve.realtime import Message, Plan, Response, Session
from serve.realtime_events import ClientEvent, ResponseParams, decode, error_event, new_id, parse, server_event
from serve.state import REALTIME, Full, NotFound, Stale, StateError, open_store
from serve.uploads import admit_pcm16

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
KEY_PROTOCOL = "openai-insecure-api-key."  # OpenAI's browser auth: the key as a WebSocket subprotocol
POLICY_VIOLATION, NORMAL_CLOSE, TRY_AGAIN_LATER = 1008, 1000, 1013
CLIENT_CLOSE = (1000, 1001)  # the client closed (done, or the page went away): the session ends with the socket
MAX_MISSED = 64  # events kept for a resume (a dropped socket misses at most the end of one response)
TRANSCRIPTION_TOKENS = 256
WATCH_S = 0.2
HEARTBEAT_S = 2.0  # a held session's lease is renewed this often
LEASE_S = 10.0  # a lease not renewed for this long: its replica is lost, the session is free to resume
CONVERSATION = "realtime_conversation"  # the state store's kind of a session's snapshot (beside its REALTIME record)
INGRESS_LOST = APIError(500, "the ingress replica that was making this response was lost; the session resumed on "
                             "another one, without this answer", type="server_error", code="ingress_lost")


@dataclass(frozen=True)
class SessionLimits:
    """From the app's caps (serve.app: realtime_resume_grace_s, realtime_max_session_s, realtime_sessions_per_key)."""

    resume_grace_s: float = 30.0
    max_session_s: float = 3600.0
    sessions_per_key: int = 16

    @classmethod
    def of(cls, caps: dict) -> "SessionLimits":
        return cls(caps.get("realtime_resume_grace_s", cls.resume_grace_s),
                   caps.get("realtime_max_session_s", cls.max_session_s),
                   caps.get("realtime_sessions_per_key", cls.sessions_per_key))


class Link:
    """The socket's sending side: the receive loop and the tasks all send, one event at a time. Events that
    could not be sent (the socket is gone) are kept, the newest MAX_MISSED, for a resume."""

    def __init__(self, ws: WebSocket):
        self.ws, self.lock = ws, asyncio.Lock()
        self.gone, self.missed = False, []

    async def send(self, *events: dict) -> None:
        async with self.lock:
            for event in events:
                if not self.gone:
                    try:
                        await self.ws.send_text(json.dumps(event))
                        continue
                    except Exception:  # closed under us (starlette, uvicorn and websockets raise differently)
                        self.gone = True
                self.missed = (self.missed + [event])[-MAX_MISSED:]
            if self.gone:
                raise WebSocketDisconnect(1006)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _replica() -> str | None:
    """The Serve replica this runs in (its actor's name), kept in the session's record: which one holds it."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # not in a Serve replica (an in-process app)
        return None


class TakenOver(StateError):
    """The session was resumed on another socket (this one's lease had lapsed)."""


class Saved:
    """One session in the state store, owned by its key: a small REALTIME record (the resume secret's digest,
    started_at, whether a socket holds it: by which lease, on which replica, seen when; the events to replay)
    that counts towards the key's session cap, and its conversation (`Session.snapshot`, kind CONVERSATION),
    written only when it changed. Both expire together (`expires_at`), renewed with the lease. Every write of a
    held session is a compare-and-set (the store's `if_version`): of two sockets resuming it at once exactly one
    takes it, and a socket it was taken from writes nothing more. Blocking calls (the caller runs them off its
    event loop)."""

    def __init__(self, store, owner: str, sid: str, limits: SessionLimits):
        self.store, self.owner, self.sid, self.limits = store, owner, sid, limits
        self.conversation_version: int | None = None  # the conversation as this socket last wrote it

    def expires_at(self, record: dict, now: float) -> float:
        """A held session (its record and conversation) outlives its last renewal by the lease and the grace
        period: a lost replica's session stays resumable that long, then goes; never past the session's maximum
        length."""
        last = record["seen_at"] + LEASE_S if record["attached"] else now
        end = record["started_at"] + self.limits.max_session_s
        return max(min(end, last + self.limits.resume_grace_s), now + 1.0)

    def create(self, record: dict, snapshot: dict) -> None:
        expires = self.expires_at(record, time.time())
        self.store.create(REALTIME, self.owner, record, id=self.sid, expires_at=expires,
                          max_items=self.limits.sessions_per_key)
        self.conversation_version = self.store.put(CONVERSATION, self.owner, self.sid, snapshot,
                                                   expires_at=expires).version

    def keep(self, record: dict, snapshot: dict | None) -> None:
        """Renew the lease and the conversation's expiry with it (saving the conversation, when given), unless
        another socket took the session (`TakenOver`). The conversation is written before the record, so a
        socket that finds the record released (a drop) finds the conversation complete."""
        held = self.store.get(REALTIME, self.owner, self.sid)
        if held.data.get("lease") != record["lease"]:
            raise TakenOver(self.sid)
        expires = self.expires_at(record, time.time())
        try:
            if snapshot is not None:
                self.conversation_version = self.store.put(CONVERSATION, self.owner, self.sid, snapshot,
                                                           expires_at=expires,
                                                           if_version=self.conversation_version).version
            else:
                self.conversation_version = self.store.touch(CONVERSATION, self.owner, self.sid, expires_at=expires,
                                                             if_version=self.conversation_version)
            self.store.put(REALTIME, self.owner, self.sid, record, expires_at=expires, if_version=held.version)
        except Stale:  # taken between the read and the writes
            raise TakenOver(self.sid) from None

    def delete(self) -> None:
        for kind in (REALTIME, CONVERSATION):
            try:
                self.store.delete(kind, self.owner, self.sid)
            except NotFound:
                pass

    def take(self, secret: str, lease: str) -> tuple[dict, dict, list[dict]]:
        """Resume: the record (now held by `lease`), the conversation, the events to replay. APIError when
        the token does not name a live session of this key, or a socket still holds it."""
        gone = APIError(400, f"no session to resume: the resume token is unknown, of another key, or its grace "
                             f"period ({self.limits.resume_grace_s:g} s) has passed", param="resume",
                        code="session_not_found")
        in_use = APIError(409, "the session is open on another socket", param="resume", code="session_in_use")
        try:
            held = self.store.get(REALTIME, self.owner, self.sid)
        except (NotFound, ValueError):
            raise gone from None
        saved, now = held.data, time.time()
        if not hmac.compare_digest(saved.get("secret", ""), _digest(secret)):
            raise gone
        if saved.get("attached") and now - saved.get("seen_at", 0.0) < LEASE_S:
            raise in_use
        if self.limits.resume_grace_s <= 0:
            raise gone
        # dropped: what its socket missed; held by a lost replica: the end of the response it was making
        replay = saved.get("lost") if saved.get("attached") else saved.get("missed")
        record = {"secret": saved["secret"], "started_at": saved["started_at"], "attached": True, "lease": lease,
                  "seen_at": now, "holder": _replica()}
        expires = self.expires_at(record, now)
        try:  # taken only if still as read: of two resumes at once, one wins, the other is in use
            self.store.put(REALTIME, self.owner, self.sid, record, expires_at=expires, if_version=held.version)
        except Stale:
            raise in_use from None
        except NotFound:
            raise gone from None
        try:  # the touch fences off the socket it was taken from (its next write of the conversation is Stale)
            self.conversation_version = self.store.touch(CONVERSATION, self.owner, self.sid, expires_at=expires)
            snapshot = self.store.get(CONVERSATION, self.owner, self.sid).data
        except NotFound:
            raise gone from None
        return record, snapshot, list(replay or [])


class Live:
    """One socket's conversation over time: the session, the response in progress and the last one (whose
    audio may still be playing), input transcriptions, and the watch that keeps the session in the store and
    ends it (length, idle)."""

    def __init__(self, routes: "RealtimeRoutes", ws: WebSocket, link: Link, session: Session, saved: Saved,
                 record: dict):
        self.routes, self.ws, self.link, self.session, self.saved = routes, ws, link, session, saved
        self.record = record  # the store's record of this session: secret digest, started_at, lease, seen_at, ...
        self.limits = saved.limits
        self.kept: tuple | None = None  # what the store holds: (conversation fingerprint, response in progress)
        self.keeping: asyncio.Future | None = None
        self.taken = False  # resumed on another socket: this one leaves the store alone
        self.wake = asyncio.Event()  # keep the session now (a response began), not at the next tick
        self.active: tuple[Response, asyncio.Task] | None = None
        self.last: Response | None = None
        self.tasks: set[asyncio.Task] = set()
        self.idle_since = time.monotonic()
        self.ended = False  # by the server, or closed by the client (not resumable: only a dropped socket is)

    # -- the socket ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        reader, watch = asyncio.create_task(self._receive()), asyncio.create_task(self._watch())
        try:
            await asyncio.wait([reader, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, watch):
                task.cancel()
            await asyncio.gather(reader, watch, return_exceptions=True)
            await self._leave()

    async def _receive(self) -> None:
        ws = self.ws
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.ended = message.get("code") in CLIENT_CLOSE  # a close, not a drop
                    self.link.gone = True  # what is sent from now on is kept for a resume (behind Serve's proxy
                    return                 # a send to a gone socket need not fail)
                event_id = None
                try:
                    data, event_id = decode(message.get("text") or message.get("bytes"))
                    event = parse(data)
                    if self.active is not None and self.active[1].done():
                        self.active = None
                    await self.handle(event)
                except APIError as err:
                    await self.link.send(error_event(err, event_id))
                except WebSocketDisconnect:
                    return
                except Exception as err:  # a bug: report it, keep the session (and the replica) going
                    logger.error("realtime event failed", exc_info=err)
                    await self.link.send(error_event(APIError(500, f"internal error: {type(err).__name__}",
                                                              type="server_error"), event_id))
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: receive after the socket closed
            return

    async def _watch(self) -> None:
        """Keep the session in the store; end it at its maximum length, or after idle_timeout_ms without speech
        or answer."""
        started = self.record["started_at"]
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), WATCH_S)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                await self._keep()
            except TakenOver:
                self.taken = True
                return await self._end(APIError(409, "the session was resumed on another socket",
                                                code="session_in_use"))
            except Exception as err:  # the store is unreachable for now: the socket goes on, the next tick retries
                logger.warning("realtime session not kept: %s", err)
            now = time.monotonic()
            if time.time() - started >= self.limits.max_session_s:
                return await self._end(APIError(400, f"the session reached its maximum length of "
                                                     f"{self.limits.max_session_s:g} s", code="session_expired",
                                                type="invalid_request_error"))
            vad = self.session.vad
            if self.session.speech is not None or self._answering(now) or vad is None:
                self.idle_since = now
                continue
            if vad.idle_timeout_ms is not None and now - self.idle_since >= vad.idle_timeout_ms / 1000:
                end_ms = int(self.session.input_ms)
                start_ms = max(0, int(end_ms - (now - self.idle_since) * 1000))
                await self.link.send(server_event("input_audio_buffer.timeout_triggered", audio_start_ms=start_ms,
                                                  audio_end_ms=end_ms, item_id=new_id("item")))
                return await self._end(APIError(400, f"no speech for idle_timeout_ms={vad.idle_timeout_ms}: the "
                                                     "session is closed", code="idle_timeout"))

    async def _keep(self) -> None:
        """The lease renewed every HEARTBEAT_S, the conversation saved when it changed, and the end of the
        response in progress rendered ahead (replayed by the replica that resumes the session if this one is
        lost)."""
        response = self.active[0] if self.active is not None and not self.active[1].done() else None
        state, now = (self.session.fingerprint(), response and response.id), time.time()
        if state == self.kept and now - self.record["seen_at"] < HEARTBEAT_S:
            return
        snapshot = self.session.snapshot() if self.kept is None or state[0] != self.kept[0] else None
        self.record = {**self.record, "seen_at": now, "lost": response.lost(INGRESS_LOST) if response else []}
        self.kept = state
        self.keeping = asyncio.ensure_future(asyncio.to_thread(self.saved.keep, self.record, snapshot))
        await asyncio.shield(self.keeping)  # a cancelled watch leaves the write to finish (`_leave` awaits it)

    def _answering(self, now: float) -> bool:
        return (self.active is not None and not self.active[1].done()) or (
            self.last is not None and self.last.playing(now))

    async def _end(self, why: APIError) -> None:
        self.ended = True
        try:
            await self.link.send(error_event(why))
            await self.ws.close(NORMAL_CLOSE, why.message[:120])
        except Exception:  # gone already
            pass

    async def _leave(self) -> None:
        """The socket is gone or ended: stop the work, keep the session for a resume (unless ended)."""
        for task in list(self.tasks):
            task.cancel()
        await self._stop_active("client_cancelled")
        if self.keeping is not None:
            await asyncio.gather(self.keeping, return_exceptions=True)
        if self.taken:
            return
        try:
            if self.ended or self.limits.resume_grace_s <= 0:
                await asyncio.to_thread(self.saved.delete)
            else:
                record = {**self.record, "attached": False, "missed": self.link.missed, "lost": []}
                await asyncio.to_thread(self.saved.keep, record, self.session.snapshot())
        except StateError:
            pass  # already gone (expired), or resumed elsewhere
        except Exception as err:
            logger.error("realtime session could not be saved", exc_info=err)

    async def _stop_active(self, reason: str) -> None:
        """Cancel the response in progress and send its closing events."""
        try:
            await self.link.send(*await self._halt(reason))
        except WebSocketDisconnect:
            pass  # kept in link.missed

    async def _halt(self, reason: str) -> list[dict]:
        """Cancel the response in progress: its task has ended when this returns (nothing more of it is sent;
        its LLM slot and decoder stream are freed); its closing events, for the caller to send."""
        if self.active is None:
            return []
        response, task = self.active
        self.active = None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return response.cancelled(reason)

    # -- events ----------------------------------------------------------------------------------------------
    async def handle(self, event: ClientEvent) -> None:
        session, kind = self.session, event.type
        if kind == "response.create":
            self._respond(session.plan(event.response))
        elif kind == "response.cancel":
            if self.active is None or event.response_id not in (None, self.active[0].id):
                raise APIError(400, "no response in progress to cancel", param="response_id",
                               code="response_cancel_not_active")
            await self._stop_active("client_cancelled")
        elif kind == "input_audio_buffer.append":
            await self.link.send(*session.append(event))
            await self._detect()
        elif kind == "session.update":
            events = session.update(event)
            if session.vad_stale():
                await asyncio.to_thread(session.prepare_vad)
            await self.link.send(*events)
        elif kind == "input_audio_buffer.commit":
            await self.link.send(*session.commit(event))
            self._transcribe(session.messages[-1])
        else:
            handlers = {"input_audio_buffer.clear": session.clear, "conversation.item.create": session.create_item,
                        "conversation.item.truncate": session.truncate,
                        "conversation.item.retrieve": session.retrieve}
            await self.link.send(*handlers[kind](event))

    def _respond(self, plan: Plan) -> None:
        if self.active is not None:
            raise APIError(400, f"response {self.active[0].id} is in progress; cancel it or wait for response.done",
                           code="conversation_already_has_active_response")
        response = Response(self.session, plan)
        self.active = response, asyncio.create_task(self.routes._respond(self.link, response))
        self.last = response
        self.wake.set()  # the store learns of it at once (its end is replayed if this replica is lost), and of
        self.active[1].add_done_callback(lambda _: self.wake.set())  # its end (then not to be replayed)

    async def _detect(self) -> None:
        """Server VAD over the audio appended since the last look (at least a frame's worth), off the loop."""
        session = self.session
        data = session.take_unjudged(session.frame_bytes())
        if data is None:
            return
        signals = await asyncio.to_thread(session.detector.feed, data)
        events, actions = session.on_speech(signals)
        vad = session.vad
        if vad.interrupt_response and any(kind == "started" for kind, _ in actions):
            # the answer is stopped before the speech start is sent: no audio of it follows that event
            after = 1 + next(i for i, e in enumerate(events) if e["type"] == "input_audio_buffer.speech_started")
            events[after:after] = await self._interrupt()
        await self.link.send(*events)
        for kind, value in actions:
            self.idle_since = time.monotonic()
            if kind == "committed":
                if vad.create_response:
                    if self.active is not None and self.active[1].done():
                        self.active = None
                    try:
                        self._respond(session.plan(ResponseParams()))
                    except APIError as err:
                        await self.link.send(error_event(err))
                self._transcribe(value, after=self.active)

    async def _interrupt(self) -> list[dict]:
        """The user spoke over the answer: stop it if still being made, keep what was heard of it; the events
        that say so."""
        response = self.last
        now = time.monotonic()
        if response is None or not response.playing(now):
            return []
        heard = response.played_ms(now)
        running = self.active is not None and self.active[0] is response and not self.active[1].done()
        events = await self._halt("turn_detected") if running else []
        item = response.item
        if item in self.session.messages and item.status != "in_progress" and heard < item.sent_ms:
            item.truncate(heard)
            events.append(self.session.truncated(item, heard))
        self.last = None
        return events

    def _transcribe(self, message: Message, after: tuple | None = None) -> None:
        """The turn's input transcription, beside the answer (`audio.input.transcription`). With `after` (the
        turn's answer, response and task) it starts once the answer's first audio is out: the user waits for
        that audio, not for the transcript, and an ASR request started with it would share its first forwards."""
        if self.session.config.audio.input.transcription is None or not message.clips:
            return
        task = asyncio.create_task(self._transcription(message, after))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _transcription(self, message: Message, after: tuple | None = None) -> None:
        clip, run = message.clips[-1], None
        part = {"item_id": message.id, "content_index": 0}
        if after is not None:
            response, answer = after

            def begun() -> bool:  # its first audio (a spoken answer) or its first text is out
                return response.first_audio_at is not None if response.plan.speak else bool(response.transcript)

            while not begun() and not answer.done():  # bounded by the answer's own end
                await asyncio.sleep(0.02)
        try:
            try:
                audio = await admit_pcm16(clip.pcm16, clip.rate, clip.seconds + 1, "audio")
                with_caps = self.routes.request_caps
                with_tokens = min(TRANSCRIPTION_TOKENS, with_caps.max_new_tokens or TRANSCRIPTION_TOKENS)
                options = policy.request_options(max_new_tokens=with_tokens, caps=with_caps)
                run = self.routes._run("realtime", "asr", audio=audio, **options.run_args())
                async for event in run:
                    if isinstance(event, ErrorEvent):
                        raise stage_error(event)
                    if isinstance(event, TextDelta) and event.text:
                        await self.link.send(server_event("conversation.item.input_audio_transcription.delta",
                                                          **part, delta=event.text))
                    elif isinstance(event, Done):
                        clip.transcript = event.text
                        await self.link.send(server_event(
                            "conversation.item.input_audio_transcription.completed", **part,
                            transcript=event.text, usage={"type": "duration", "seconds": round(clip.seconds, 3)}))
                        return
            except APIError as err:
                await self.link.send(server_event("conversation.item.input_audio_transcription.failed", **part,
                                                  error={"type": err.type, "code": err.code,
                                                         "message": err.message, "param": err.param}))
        except WebSocketDisconnect:
            pass
        except Exception as err:
            logger.error("realtime transcription failed", exc_info=err)
        finally:
            if run is not None:
                await run.aclose()


class RealtimeRoutes:
    """The page and the socket; expects the ingress' caps, keys, state, voice_store, clients and _run."""

    @app.get("/", include_in_schema=False)
    async def web_page(self):
        return HTMLResponse(WEB_PAGE.read_text())

    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket):
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        link = Link(ws)
        refusal = self._ws_refusal(ws, offered)
        owner = self._ws_owner(ws, offered) if refusal is None else None
        session = Session(self.caps, self.voice_store.owned(owner), self.request_caps) if owner is not None else None
        if session is not None:
            try:
                saved, record, token, missed = await self._attach(ws, session, owner)
            except APIError as err:
                refusal = err
        if refusal is not None:
            await link.send(error_event(refusal))
            # a session still open on the dropped socket (its replica has not seen the drop yet): the SDK retries
            await ws.close(TRY_AGAIN_LATER if refusal.code == "session_in_use" else POLICY_VIOLATION,
                           refusal.message[:120])
            return
        live = Live(self, ws, link, session, saved, record)
        try:
            await link.send({**session.created(), "resume_token": token}, *missed)
            if session.vad is not None:
                await asyncio.to_thread(session.prepare_vad)
        except WebSocketDisconnect:
            pass
        await live.run()

    def _sessions(self):
        """The state store sessions live in (the ingress' `state`; alone: one in this process)."""
        store = getattr(self, "state", None)
        if store is None:
            store = self.__dict__.setdefault("_own_state", open_store("memory"))
        return store

    async def _attach(self, ws: WebSocket, session: Session, owner: str) -> tuple[Saved, dict, str, list[dict]]:
        """A new session (within the per-key cap), or the saved session a `?resume=TOKEN` names: its place in
        the store, its record, its resume token and the events to replay."""
        limits, lease, now = SessionLimits.of(self.caps), secrets.token_hex(8), time.time()
        token = ws.query_params.get("resume")
        if token is None:
            secret = secrets.token_urlsafe(24)
            saved = Saved(self._sessions(), owner, session.id, limits)
            record = {"secret": _digest(secret), "started_at": now, "attached": True, "lease": lease, "seen_at": now,
                      "holder": _replica()}
            try:
                await asyncio.to_thread(saved.create, record, session.snapshot())
            except Full:
                raise APIError(429, f"this key already holds {limits.sessions_per_key} realtime sessions (open, "
                                    "or resumable within the grace period); close one first",
                               code="session_limit", type="rate_limit_exceeded") from None
            return saved, record, f"{session.id}.{secret}", []
        sid, _, secret = token.partition(".")
        saved = Saved(self._sessions(), owner, sid, limits)
        record, snapshot, replay = await asyncio.to_thread(saved.take, secret, lease)
        session.restore(snapshot)
        return saved, record, token, replay

    def _ws_owner(self, ws: WebSocket, offered: list[str]) -> str:
        """The caller's owner id (serve.keys) from the header or the key subprotocol, else APIError 401."""
        return self.keys.check(ws.headers.get("authorization"),
                               [p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)])

    def _ws_refusal(self, ws: WebSocket, offered: list[str]) -> APIError | None:
        try:
            self._ws_owner(ws, offered)
        except APIError:
            return APIError(401, "missing or wrong API key (Authorization: Bearer KEY, or the subprotocol "
                                 f"{KEY_PROTOCOL}KEY)", code="invalid_api_key", type="authentication_error")
        model = ws.query_params.get("model")
        if model not in (None, MODEL_ID):
            return APIError(404, f"model {model!r} does not exist; available: {MODEL_ID!r}", param="model",
                            code="model_not_found")
        return None

    async def _respond(self, link: Link, response: Response) -> None:
        """Run one response through `run_request` and send its events; cancelling the task aborts the run."""
        run = None
        try:
            await link.send(*response.started())
            try:
                await self._encode_history(response.plan)
                clip = response.plan.new_clip()  # admitted once, off the event loop (the same limits as uploads)
                audio = None if clip is None else await admit_pcm16(clip.pcm16, clip.rate, clip.seconds + 1, "audio")
                run = self._run("realtime", "chat", **response.plan.request(audio))
                async for event in run:
                    await link.send(*(response.failed(stage_error(event)) if isinstance(event, ErrorEvent)
                                      else response.on_event(event)))
            except APIError as err:
                await link.send(*response.failed(err))
        except WebSocketDisconnect:
            pass  # the client went away: the receive loop ends the session
        except Exception as err:
            logger.error("realtime response failed", exc_info=err)
            try:  # the client still learns that the response failed (an `error` event), never a silent stop
                await link.send(*response.failed(APIError(500, f"internal error: {type(err).__name__}",
                                                          type="server_error")))
            except Exception:
                pass  # the socket itself is gone
        finally:
            if run is not None:
                await run.aclose()

    async def _encode_history(self, plan: Plan) -> None:
        """Audio codes of the earlier turns' clips (once per clip; the prompt refers to them by their codes), from
        the same 16 kHz waveform run_request made of the clip in its own turn."""
        for clip in plan.history_clips():
            clip.codes = await encode_audio(self.clients, await admit_pcm16(clip.pcm16, clip.rate, clip.seconds + 1,
                                                                            "audio"))
