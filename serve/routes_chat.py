"""POST /v1/chat/completions: OpenAI chat with `input_audio` parts and text in, text or text + audio out,
multi-turn, non-streamed (`message.audio` with id, data, expires_at, transcript) or streamed (SSE chunks;
the transcript and base64 16-bit PCM at 24 kHz in `choices[0].delta.audio`, as OpenAI streams audio).

A mixin of the ingress class (its routes register on serve.http.app; Serve finds inherited route methods).
"""
from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import ValidationError

from actors.payloads import LAYOUT_AUTO, AudioChunk, AudioPayload, Done, ErrorEvent, TextDelta
from serve import chat_format
from serve.api import APIError, AudioOut, ChatBody
from serve.audio_formats import PcmStream, encode
from serve.http import (app, b64, logger, check_text, gather, joined_pcm, refused, request_options, sse,
                        stage_error, streamed, encode_audio)
from serve.uploads import admit_upload

DEFAULT_MAX_TOKENS = 256
AUDIO_FORMATS = {"wav": "wav", "flac": "flac", "pcm16": "pcm", "mp3": "mp3", "opus": "opus"}  # OpenAI's name -> serve.audio_formats


class ChatRoutes:
    """The chat route; expects the ingress' clients, caps, request_caps, voice_store, answers, _json, _model, _run."""

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        data = await self._json(request)
        owner = self._auth(request)  # the key's answers and voices (serve.keys.owner_id)
        try:
            body = ChatBody.model_validate(data)
        except ValidationError as err:
            raise refused(err) from None
        self._model(body.model)
        body.check_supported()
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new_tokens = next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None),
                              DEFAULT_MAX_TOKENS)
        speak = "audio" in body.modalities
        # a spoken answer's layout is the LLM stage's choice ("auto"); a text-only answer asks for text
        options = request_options(body, self.request_caps, max_new_tokens, param, LAYOUT_AUTO if speak else "text")
        audio_out = body.audio or AudioOut()
        if body.stream and speak and audio_out.format != "pcm16":
            raise APIError(400, f"audio.format={audio_out.format!r}: streamed audio is pcm16", param="audio.format")
        conversation = chat_format.parse_messages(body.messages)
        voice = await asyncio.to_thread(self.voice_store.resolve, audio_out.voice, "audio.voice", owner) \
            if body.audio else None
        if voice is not None and conversation.system is not None:
            raise APIError(400, "give either a system message or a custom voice: the voice prompt is the system turn",
                           param="audio.voice")
        history, turn, audio_tokens = await self._chat_inputs(conversation, voice, owner)
        run = self._run("chat", "chat", history=history, voice=voice, system=conversation.system,
                        **options.run_args(), **turn)
        first = await run.first()
        completion_id = chat_format.new_completion_id()
        if body.user:  # OpenAI's end-user id, for the operator's abuse monitoring: the log names it
            logger.info("chat completion %s for user %r", completion_id, body.user)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return streamed(run, self._chat_chunks(run, first, completion_id, speak, audio_tokens, usage, owner),
                            "text/event-stream")
        _, chunks, rate, done = await gather(run, first)
        message = {"role": "assistant", "content": done.text, "refusal": None}
        if speak:
            audio_id, expires_at = await asyncio.to_thread(self.answers.add, done.text, owner)
            data = encode(joined_pcm(chunks), rate, AUDIO_FORMATS[audio_out.format])
            message.update(content=None, audio={"id": audio_id, "data": b64(data), "expires_at": expires_at,
                                                "transcript": done.text})
        usage = chat_format.chat_usage(done, audio_tokens + _encoded(done))
        return chat_format.completion(completion_id, message, done, usage)

    async def _chat_chunks(self, run, first, completion_id: str, speak: bool, audio_tokens: int, include_usage: bool,
                           owner: str):
        audio_id = expires_at = None
        if speak:
            audio_id, expires_at = await asyncio.to_thread(self.answers.add, "", owner)
        yield sse(chat_format.chunk(completion_id, {"role": "assistant", "content": None if speak else "",
                                                    "refusal": None}))
        pcm = PcmStream()  # one soxr stream for the answer: chunks join without clicks
        event = first
        try:
            while True:
                if isinstance(event, TextDelta) and event.text:
                    delta = {"audio": {"id": audio_id, "transcript": event.text}} if speak else {"content": event.text}
                    yield sse(chat_format.chunk(completion_id, delta))
                elif isinstance(event, AudioChunk):
                    data = pcm.chunk(event.pcm, event.sample_rate)  # 24 kHz, as OpenAI's pcm16
                    if data:
                        yield sse(chat_format.chunk(completion_id, {"audio": {"id": audio_id, "data": b64(data)}}))
                elif isinstance(event, Done):
                    if speak:
                        if tail := pcm.end():
                            yield sse(chat_format.chunk(completion_id, {"audio": {"id": audio_id, "data": b64(tail)}}))
                        await asyncio.to_thread(self.answers.finish, audio_id, event.text, expires_at, owner)
                        yield sse(chat_format.chunk(completion_id, {"audio": {"expires_at": expires_at}}))
                    yield sse(chat_format.chunk(completion_id, {}, chat_format.finish_reason(event)))
                    if include_usage:
                        usage = chat_format.chat_usage(event, audio_tokens + _encoded(event))
                        yield sse(chat_format.chunk(completion_id, {}, usage=usage, choices=False))
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, ErrorEvent):
                    yield sse({"error": stage_error(event).body()["error"]})
                    return
                event = await anext(run)
        finally:
            await run.aclose()

    async def _chat_inputs(self, conversation, voice, owner: str):
        """Check every cap, then encode the earlier turns' clips: (history, the new turn's run_request argument,
        audio tokens of the prompt known here)."""
        self._chat_text_cap(conversation)
        transcripts = [await asyncio.to_thread(self.answers.transcript, t.audio_id, f"messages[{i}].audio", owner)
                       if t.audio_id else None for i, t in enumerate(conversation.history)]
        last = conversation.last
        if not last.audios:
            check_text("\n".join(last.texts), self.request_caps, "messages.content")
        cap = self.caps["max_audio_seconds"]
        clips = [await admit_upload(clip, cap, "messages.input_audio")  # off the event loop, each decoded once
                 for turn in (*conversation.history, last) for clip in turn.audios]
        seconds = sum(clip.seconds for clip in clips)
        if seconds > cap:
            raise APIError(413, f"messages hold {seconds:.1f} s of audio, over max_audio_seconds={cap:g}",
                           param="messages", code="max_audio_seconds")
        history, audio_tokens, decoded = [], len(voice or ()), iter(clips)
        for turn, transcript in zip(conversation.history, transcripts):
            codes = [await self._encode(next(decoded)) for _ in turn.audios]
            audio_tokens += sum(len(c) for c in codes)
            history.append(chat_format.history_entry(turn, codes, transcript))
        # the new turn's clip was admitted above; run_request encodes that admitted clip
        new_turn = {"audio": clips[len(clips) - len(last.audios)]} if last.audios else {"text": "\n".join(last.texts)}
        return history, new_turn, audio_tokens

    async def _encode(self, clip: AudioPayload) -> list[int]:
        return await encode_audio(self.clients, clip)

    def _chat_text_cap(self, conversation) -> None:
        texts = [conversation.system or ""] + [t for turn in (*conversation.history, conversation.last)
                                               for t in turn.texts]
        total, cap = sum(len(t) for t in texts), self.caps["max_text_chars"]
        if total > cap:
            raise APIError(400, f"messages hold {total} characters of text, over max_text_chars={cap}",
                           param="messages", code="max_text_chars")


def _encoded(done: Done) -> int:
    """Audio codes the encoder made for this request's new turn (and an uploaded voice clip)."""
    return int(done.usage.get("encoder", {}).get("codes", 0))
