"""Live voice chat: the `/v1/realtime` WebSocket (OpenAI's Realtime API, turn-based; event shapes in
serve.realtime_events, session state in serve.realtime) and the web page at `/` (serve/web/index.html, a client
of that WebSocket).

Auth, when the app has an api_key: `Authorization: Bearer KEY` (the openai SDK sends it), or, from a browser
that cannot set headers, OpenAI's subprotocol `openai-insecure-api-key.KEY` beside `realtime`. A refused
socket gets an `error` event and close code 1008. A bad event gets an `error` event and the session goes on;
every response runs through `run_request` (`self._run`), and a client gone mid-response aborts it.
Each open socket counts as one of the ingress replica's ongoing requests while it lasts.

A mixin of the ingress class (its routes register on serve.http.app; Serve finds inherited route methods).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

from actors.payloads import ErrorEvent
from serve.api import MODEL_ID, APIError
from serve.http import app, logger, stage_error, encode_audio
from serve.realtime import Plan, Response, Session
from serve.realtime_events import ClientEvent, decode, error_event, parse
from serve.uploads import admit_pcm16

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
KEY_PROTOCOL = "openai-insecure-api-key."  # OpenAI's browser auth: the key as a WebSocket subprotocol
POLICY_VIOLATION = 1008


class Link:
    """The socket's sending side: the receive loop and the response task both send, one event at a time."""

    def __init__(self, ws: WebSocket):
        self.ws, self.lock = ws, asyncio.Lock()

    async def send(self, *events: dict) -> None:
        async with self.lock:
            for event in events:
                await self.ws.send_text(json.dumps(event))


class RealtimeRoutes:
    """The page and the socket; expects the ingress' caps, api_key, voice_store, clients and _run."""

    @app.get("/", include_in_schema=False)
    async def web_page(self):
        return HTMLResponse(WEB_PAGE.read_text())

    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket):
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        link = Link(ws)
        refusal = self._ws_refusal(ws, offered)
        if refusal is not None:
            await link.send(error_event(refusal))
            await ws.close(POLICY_VIOLATION, refusal.message[:120])
            return
        session = Session(self.caps, self.voice_store, self.request_caps)
        await link.send(session.created())
        active: tuple[Response, asyncio.Task] | None = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                event_id = None
                try:
                    data, event_id = decode(message.get("text") or message.get("bytes"))
                    event = parse(data)
                    if active is not None and active[1].done():
                        active = None
                    active = await self._handle(link, session, event, active)
                except APIError as err:
                    await link.send(error_event(err, event_id))
                except WebSocketDisconnect:  # the client went away while we answered
                    return
                except Exception as err:  # a bug: report it, keep the session (and the replica) going
                    logger.error("realtime event failed", exc_info=err)
                    await link.send(error_event(APIError(500, f"internal error: {type(err).__name__}",
                                                         type="server_error"), event_id))
        except WebSocketDisconnect:
            return
        finally:
            if active is not None:  # the client left mid-response: abort the run (frees the LLM slot)
                active[1].cancel()
                await asyncio.gather(active[1], return_exceptions=True)

    def _ws_refusal(self, ws: WebSocket, offered: list[str]) -> APIError | None:
        keys = [p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)]
        if self.api_key and ws.headers.get("authorization") != f"Bearer {self.api_key}" and self.api_key not in keys:
            return APIError(401, "missing or wrong API key (Authorization: Bearer KEY, or the subprotocol "
                                 f"{KEY_PROTOCOL}KEY)", code="invalid_api_key", type="authentication_error")
        model = ws.query_params.get("model")
        if model not in (None, MODEL_ID):
            return APIError(404, f"model {model!r} does not exist; available: {MODEL_ID!r}", param="model",
                            code="model_not_found")
        return None

    async def _handle(self, link: Link, session: Session, event: ClientEvent, active):
        """One client event; returns the (response, task) in progress."""
        if event.type == "response.create":
            if active is not None:
                raise APIError(400, f"response {active[0].id} is in progress; cancel it or wait for response.done",
                               code="conversation_already_has_active_response")
            response = Response(session, session.plan(event.response))
            return response, asyncio.create_task(self._respond(link, response))
        if event.type == "response.cancel":
            if active is None or event.response_id not in (None, active[0].id):
                raise APIError(400, "no response in progress to cancel", param="response_id",
                               code="response_cancel_not_active")
            active[1].cancel()
            await asyncio.gather(active[1], return_exceptions=True)
            await link.send(*active[0].cancelled())
            return None
        handlers = {"session.update": session.update, "input_audio_buffer.append": session.append,
                    "input_audio_buffer.commit": session.commit, "input_audio_buffer.clear": session.clear,
                    "conversation.item.create": session.create_item}
        await link.send(*handlers[event.type](event))
        return active

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
        finally:
            if run is not None:
                await run.aclose()

    async def _encode_history(self, plan: Plan) -> None:
        """Audio codes of the earlier turns' clips (once per clip; the prompt refers to them by their codes), from
        the same 16 kHz waveform run_request made of the clip in its own turn."""
        for clip in plan.history_clips():
            clip.codes = await encode_audio(self.clients, await admit_pcm16(clip.pcm16, clip.rate, clip.seconds + 1,
                                                                            "audio"))
