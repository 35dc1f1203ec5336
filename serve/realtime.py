"""OpenAI's Realtime API (GA event names), push-to-talk or hands-free: one session's state; no HTTP or WebSocket here
(serve.routes_realtime carries the events, serve.realtime_events gives their shapes).

A session holds its config (`session.update`), the input audio buffer (`input_audio_buffer.append / commit /
clear`) and the conversation (committed audio, `conversation.item.create`, the assistant's answers).
`response.create` turns the conversation into one chat request for `actors.orchestration.run_request`: the last
user message is the new turn and the earlier items its history, built as chat completions builds it (user audio
by its codes, assistant answers by their transcripts; serve.chat_format). When the conversation outgrows the caps
(max_audio_seconds, max_text_chars) its oldest items are left out of the prompt, as OpenAI's truncation "auto".

Turn detection: the client's (`turn_detection: null`, push-to-talk: append, commit, response.create), or the
server's (`server_vad`: actors.vad's Silero detector, fed by `append`, run off the event loop by the caller):
speech start / stop come as `input_audio_buffer.speech_started / speech_stopped`, the stop commits the turn
(from `prefix_padding_ms` before the start) and the caller then starts the response (`create_response`) and,
at a start while an answer plays, interrupts it (`interrupt_response`). An answer keeps only what the user heard:
`truncate` (the client's `conversation.item.truncate`, or the caller's estimate from the audio it sent) cuts
its transcript at the text the model had written when the heard audio was made. semantic_vad is refused.
A session's conversation can be saved and restored (`snapshot` / `restore`: a JSON value for serve.state).
Audio: input is pcm16 at the session's input rate (OpenAI's 24 kHz by default; any rate in 8-96 kHz is
accepted, as a browser captures at its device's rate), handed to the pipeline as a wav at that rate
(pipeline.audio resamples it to the encoder's 16 kHz with soxr). Output is pcm16 at 24 kHz, OpenAI's only pcm
rate: one soxr stream per response resamples the decoder's 22.05 kHz chunks, so the joined deltas equal the whole
answer resampled once.
"""
from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field

import numpy as np
import soundfile

from actors.payloads import LAYOUT_AUTO, AudioChunk, Done, TextDelta
from actors.requests import Caps, RequestOptions
from actors.vad import SpeechDetector, SpeechEvent, VadParams
import actors.requests as policy
from serve import chat_format
from serve.api import MODEL_ID, APIError
from serve.audio_formats import PcmStream
from serve.chat_format import Turn
from serve.http import check_text, refusals
from serve.realtime_events import (DECODING_FIELDS, OUTPUT_RATE, AudioOutput, BufferAppend, ClientEvent, ItemCreate, ItemRetrieve, ItemTruncate, ServerVad,
                                   ResponseParams, SessionConfig, SessionUpdate, error_event, new_id, server_event,
                                   validated)
from serve.uploads import decode_base64

MIN_COMMIT_SECONDS = 0.1  # OpenAI refuses to commit less than 100 ms


@dataclass
class Clip:
    """A user's audio: pcm16 bytes at `rate`; `codes` once the encoder made them (for later turns' history)."""

    pcm16: bytes
    rate: int
    codes: list[int] | None = None
    transcript: str | None = None  # input transcription, once made

    def to_json(self) -> dict:
        return {"pcm16": base64.b64encode(self.pcm16).decode(), "rate": self.rate, "codes": self.codes,
                "transcript": self.transcript}

    @classmethod
    def from_json(cls, data: dict) -> "Clip":
        return cls(base64.b64decode(data["pcm16"]), data["rate"], data["codes"], data["transcript"])

    @property
    def seconds(self) -> float:
        return len(self.pcm16) / 2 / self.rate

    def wav(self) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, np.frombuffer(self.pcm16, "<i2"), self.rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue()


@dataclass(eq=False)  # items compare by identity
class Message:
    id: str
    role: str  # user | assistant | system
    texts: list[str] = field(default_factory=list)
    clips: list[Clip] = field(default_factory=list)
    spoken: bool = False  # an assistant answer with audio (its text is the transcript)
    status: str = "completed"
    # an answer's audio: sent (ms), kept (ms, less after a truncate), the whole transcript as made, and where
    # each audio chunk began (ms) with the transcript's length then
    sent_ms: float = 0.0
    audio_ms: float = 0.0
    said: str = ""
    marks: list[tuple[float, int]] = field(default_factory=list)

    def truncate(self, audio_end_ms: float) -> None:
        """Keep what the user heard of an answer: its audio up to `audio_end_ms` and the transcript the model had
        written when that audio was made (the text of a chunk comes before its audio)."""
        chars = max((c for ms, c in self.marks if ms < audio_end_ms), default=0)
        self.texts = [self.said[:chars]] if chars else []
        self.audio_ms, self.status = min(self.sent_ms, audio_end_ms), "incomplete"

    def to_json(self) -> dict:
        return {"id": self.id, "role": self.role, "texts": self.texts, "clips": [c.to_json() for c in self.clips],
                "spoken": self.spoken, "status": self.status, "sent_ms": self.sent_ms, "audio_ms": self.audio_ms,
                "said": self.said, "marks": [list(m) for m in self.marks]}

    @classmethod
    def from_json(cls, data: dict) -> "Message":
        return cls(data["id"], data["role"], list(data["texts"]), [Clip.from_json(c) for c in data["clips"]],
                   data["spoken"], data["status"], data["sent_ms"], data["audio_ms"], data["said"],
                   [tuple(m) for m in data["marks"]])

    def describe(self) -> dict:
        """The item as events show it (audio data left out, as OpenAI does)."""
        if self.role == "assistant":
            key, kind = ("transcript", "output_audio") if self.spoken else ("text", "output_text")
            content = [{"type": kind, key: "".join(self.texts)}]
        else:
            content = [{"type": "input_text", "text": t} for t in self.texts]
            content += [{"type": "input_audio", "transcript": c.transcript} for c in self.clips]
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role, "status": self.status,
                "content": content}

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.clips)


class Session:
    """One WebSocket's state. Each handler checks its event, changes the state and returns the server events
    to send; a refusal raises APIError (the caller sends it as an `error` event and the session goes on)."""

    def __init__(self, caps: dict, voices, request_caps: Caps | None = None):
        self.caps, self.voices = caps, voices
        # the request policy's caps (the ingress passes the model's; alone: the operator's)
        self.request_caps = request_caps or Caps(max_new_tokens=caps["max_tokens"],
                                                 max_text_chars=caps["max_text_chars"])
        self.id = new_id("sess")
        self.config = SessionConfig()
        self.buffer = bytearray()
        self.messages: list[Message] = []
        # server VAD: the detector (made off the event loop by `prepare_vad`), the audio it has not judged yet,
        # the session's audio clock (OpenAI's audio_*_ms: ms of input since the session began), the speech
        self.detector: SpeechDetector | None = None
        self.detector_key: tuple | None = None
        self.unjudged = bytearray()
        self.input_ms = 0.0
        self.vad_origin_ms = 0.0  # the session time of the detector's time 0
        self.speech: tuple[str, int] | None = None  # (item id, audio_start_ms) of the speech in progress

    # -- session ---------------------------------------------------------------------------------------------
    def created(self) -> dict:
        return server_event("session.created", session=self.describe())

    def describe(self) -> dict:
        return {"id": self.id, "object": "realtime.session", **self.config.model_dump(mode="json")}

    def update(self, event: SessionUpdate) -> list[dict]:
        merged = _merge(self.config.model_dump(), event.session)
        detection = _at(merged, "audio", "input", "turn_detection")
        if isinstance(detection, dict) and detection.get("type") != "server_vad":
            raise APIError(400, f"turn_detection type {str(detection.get('type'))[:40]!r} is not supported: use "
                                "server_vad, or null to commit turns yourself",
                           param="session.audio.input.turn_detection.type", code="unsupported_turn_detection")
        config = validated(SessionConfig, merged, "session")
        transcription = config.audio.input.transcription
        if transcription is not None and transcription.model != MODEL_ID:
            raise APIError(400, f"transcription model {transcription.model!r} does not exist; available: "
                                f"{MODEL_ID!r} (its own ASR)", param="session.audio.input.transcription.model",
                           code="model_not_found")
        if config.model != MODEL_ID:
            raise APIError(400, f"model {config.model!r} does not exist; available: {MODEL_ID!r}",
                           param="session.model", code="model_not_found")
        if config.audio.input.format.rate != self.config.audio.input.format.rate and self.buffer:
            raise APIError(400, "the input rate cannot change while the input audio buffer holds audio; commit or "
                                "clear it first", param="session.audio.input.format.rate")
        self._check_output(config.audio.output, config.instructions, config.max_output_tokens, "session")
        self._options(config.model_dump(include=set(DECODING_FIELDS)), config.max_output_tokens, True, "session")
        self.config = config
        if config.audio.input.turn_detection is None:
            self.speech = None
        return [server_event("session.updated", session=self.describe())]

    def _check_output(self, output: AudioOutput, instructions, max_tokens, where: str) -> None:
        if output.format.rate != OUTPUT_RATE:
            raise APIError(400, f"output audio is pcm16 at {OUTPUT_RATE} Hz (rate={output.format.rate} is not "
                                "supported)", param=f"{where}.audio.output.format.rate")
        if output.speed != 1.0:
            raise APIError(400, f"speed={output.speed}: only 1.0 is supported", param=f"{where}.audio.output.speed")
        self.voices.resolve(output.voice, f"{where}.audio.output.voice")
        if instructions:
            self._check_text(instructions, f"{where}.instructions")

    def _options(self, decoding: dict, max_tokens, speak: bool, where: str) -> RequestOptions:
        """The response's decoding options by the one request policy (max_output_tokens "inf": the default,
        as many as the caps allow)."""
        names = {f: f"{where}.{f}" for f in (*DECODING_FIELDS, "layout")}
        names["max_new_tokens"] = f"{where}.max_output_tokens"
        if max_tokens == "inf":  # up to the model's cap: the operator's max_tokens, leaving at least half the
            # model's positions to the conversation (an answer as long as the positions would leave none)
            positions = self.request_caps.positions
            max_tokens = min(n for n in (self.caps["max_tokens"], positions and positions // 2) if n)
        with refusals():
            return policy.request_options(**decoding, max_new_tokens=max_tokens,
                                          layout=LAYOUT_AUTO if speak else "text", caps=self.request_caps,
                                          names=names)

    def _check_text(self, text: str, param: str) -> None:
        check_text(text, self.request_caps, param)

    # -- input audio buffer ----------------------------------------------------------------------------------
    def append(self, event: BufferAppend) -> list[dict]:
        data = self._pcm16(event.audio, "audio")
        size = len(self.buffer) + len(data)
        if size > self._max_bytes():
            raise APIError(400, f"the input audio buffer would hold {size / 2 / self._rate():.1f} s, over "
                                f"max_audio_seconds={self.caps['max_audio_seconds']:g}; commit or clear it",
                           param="audio", code="max_audio_seconds")
        self.buffer += data
        self.input_ms += len(data) / 2 / self._rate() * 1000
        if self.detector is not None:
            self.unjudged += data
        return []

    def commit(self, event: ClientEvent) -> list[dict]:
        clip = Clip(bytes(self.buffer), self._rate())
        if clip.seconds < MIN_COMMIT_SECONDS:
            raise APIError(400, f"buffer too small: {clip.seconds * 1000:.0f} ms of audio; commit at least "
                                f"{MIN_COMMIT_SECONDS * 1000:.0f} ms", code="input_audio_buffer_commit_empty")
        self.buffer.clear()
        message = Message(self.speech[0] if self.speech else new_id("item"), "user", clips=[clip])
        self.speech = None
        previous = self.add(message)
        return [server_event("input_audio_buffer.committed", item_id=message.id, previous_item_id=previous),
                *self._item_events(message, previous)]

    def clear(self, event: ClientEvent) -> list[dict]:
        self.buffer.clear()
        self.speech = None
        return [server_event("input_audio_buffer.cleared")]

    # -- server VAD ------------------------------------------------------------------------------------------
    @property
    def vad(self) -> ServerVad | None:
        return self.config.audio.input.turn_detection

    def vad_stale(self) -> bool:
        """Whether the detector is not the one the config asks for (then call `prepare_vad`)."""
        return self._vad_key() != self.detector_key

    def _vad_key(self) -> tuple | None:
        vad = self.vad
        return None if vad is None else (vad.threshold, vad.silence_duration_ms, self._rate())

    def prepare_vad(self) -> None:
        """The detector the config asks for (blocking: the first loads the model; call it off the event loop)."""
        key, vad = self._vad_key(), self.vad
        model = self.detector.model if self.detector is not None else None
        self.detector = None if vad is None else SpeechDetector(VadParams(vad.threshold, vad.silence_duration_ms),
                                                                 self._rate(), model=model)
        self.detector_key, self.unjudged, self.vad_origin_ms, self.speech = key, bytearray(), self.input_ms, None

    def take_unjudged(self, min_bytes: int = 0) -> bytes | None:
        """The appended audio the detector has not seen (None while under `min_bytes`: tiny appends pile up)."""
        if self.detector is None or len(self.unjudged) < max(min_bytes, 1):
            return None
        data, self.unjudged = bytes(self.unjudged), bytearray()
        return data

    def frame_bytes(self) -> int:
        """Bytes of input audio in one detector frame (32 ms)."""
        return int(self._rate() * 0.032) * 2

    def on_speech(self, signals: list[SpeechEvent]) -> tuple[list[dict], list[tuple[str, object]]]:
        """The detector's starts and stops as server events, and what the caller must do: ("started", ms) (maybe
        interrupt the answer playing), ("committed", Message) (maybe transcribe it, respond to it)."""
        events, actions = [], []
        vad = self.vad
        for signal in signals:
            ms = int(self.vad_origin_ms + signal.ms)
            if signal.kind == "start" and self.speech is None:
                self.speech = (new_id("item"), ms)
                self._keep_from(ms - vad.prefix_padding_ms)
                events.append(server_event("input_audio_buffer.speech_started", audio_start_ms=ms,
                                           item_id=self.speech[0]))
                actions.append(("started", ms))
            elif signal.kind == "stop" and self.speech is not None:
                events += self._end_speech(ms, actions)
        if self.speech is None:  # keep only what a start would keep (the prefix padding), with a frame's slack
            self._keep_from(self.input_ms - vad.prefix_padding_ms - 100)
        elif len(self.buffer) >= 0.95 * self._max_bytes():  # a turn as long as the caps allow: end it here
            events += self._end_speech(int(self.input_ms), actions)
            self.detector.reset()
            self.vad_origin_ms = self.input_ms
        return events, actions

    def _end_speech(self, ms: int, actions: list) -> list[dict]:
        item_id, _ = self.speech
        self.speech = None
        events = [server_event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item_id)]
        clip = Clip(bytes(self.buffer), self._rate())
        self.buffer.clear()
        if clip.seconds < MIN_COMMIT_SECONDS:
            return events
        message = Message(item_id, "user", clips=[clip])
        previous = self.add(message)
        actions.append(("committed", message))
        return events + [server_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous),
                         *self._item_events(message, previous)]

    def _keep_from(self, ms: float) -> None:
        """Drop the buffer's audio before session time `ms`."""
        start_ms = self.input_ms - len(self.buffer) / 2 / self._rate() * 1000
        drop = int((ms - start_ms) * self._rate() / 1000) * 2
        if drop > 0:
            del self.buffer[:drop]

    def _pcm16(self, b64: str, param: str) -> bytes:
        data = decode_base64(b64, param)
        if len(data) % 2:
            raise APIError(400, f"{param} must be 16-bit PCM (an even number of bytes), got {len(data)} bytes",
                           param=param)
        return data

    def _rate(self) -> int:
        return self.config.audio.input.format.rate

    def _max_bytes(self) -> int:
        return int(self.caps["max_audio_seconds"] * self._rate()) * 2

    # -- conversation ----------------------------------------------------------------------------------------
    def create_item(self, event: ItemCreate) -> list[dict]:
        item = event.item
        last_id = self.messages[-1].id if self.messages else None
        if event.previous_item_id not in (None, last_id):
            raise APIError(400, "items are added at the end of the conversation: previous_item_id must be the last "
                                "item's id or null", param="previous_item_id")
        if item.id is not None and any(m.id == item.id for m in self.messages):
            raise APIError(400, f"an item with id {item.id!r} already exists", param="item.id")
        message = Message(item.id or new_id("item"), item.role)
        for i, part in enumerate(item.content):
            param = f"item.content[{i}]"
            allowed = {"user": ("input_text", "input_audio"), "system": ("input_text",),
                       "assistant": ("output_text", "output_audio")}[item.role]
            if part.type not in allowed:
                raise APIError(400, f"{param}.type={part.type!r} is not allowed in a {item.role} message (expected "
                                    f"one of {allowed})", param=f"{param}.type")
            if part.type == "input_audio":
                clip = Clip(self._pcm16(part.audio, f"{param}.audio"), self._rate())
                if not clip.pcm16 or clip.seconds > self.caps["max_audio_seconds"]:
                    raise APIError(400, f"{param}.audio holds {clip.seconds:.1f} s; it must hold audio, at most "
                                        f"max_audio_seconds={self.caps['max_audio_seconds']:g}",
                                   param=f"{param}.audio", code="max_audio_seconds")
                message.clips.append(clip)
                continue
            text = part.text if part.type != "output_audio" else part.transcript
            self._check_text(text, f"{param}.{'transcript' if part.type == 'output_audio' else 'text'}")
            message.texts.append(text)
            message.spoken = message.spoken or part.type == "output_audio"
        previous = self.add(message)
        return self._item_events(message, previous)

    def add(self, message: Message) -> str | None:
        """Append an item; items no prompt can hold any more are dropped (the session's memory stays bounded)."""
        previous = self.messages[-1].id if self.messages else None
        self.messages.append(message)
        kept = self._newest(0)
        self.messages = [m for m in self.messages if m.role == "system" or m in kept]
        return previous

    def _newest(self, chars: int) -> list[Message]:
        """The newest user / assistant items that fit the caps beside `chars` characters of system text."""
        seconds, kept = 0.0, []
        for message in reversed([m for m in self.messages if m.role != "system"]):
            chars, seconds = chars + message.chars, seconds + message.seconds
            over = chars > self.caps["max_text_chars"] or seconds > self.caps["max_audio_seconds"]
            if kept and over or len(kept) == chat_format.MAX_MESSAGES:
                break
            kept.insert(0, message)
        return kept

    def item(self, item_id: str, param: str = "item_id") -> Message:
        for message in self.messages:
            if message.id == item_id:
                return message
        raise APIError(400, f"no item {item_id[:64]!r} in the conversation", param=param, code="item_not_found")

    def retrieve(self, event: ItemRetrieve) -> list[dict]:
        return [server_event("conversation.item.retrieved", item=self.item(event.item_id).describe())]

    def truncate(self, event: ItemTruncate) -> list[dict]:
        """The client's `conversation.item.truncate`: the user heard `audio_end_ms` of an assistant answer."""
        message = self.item(event.item_id)
        if message.role != "assistant" or not message.spoken:
            raise APIError(400, f"item {message.id!r} is a {message.role} message without audio; only an assistant "
                                "answer with audio can be truncated", param="item_id")
        if message.status == "in_progress":
            raise APIError(400, f"item {message.id!r} is still being answered; cancel the response first",
                           param="item_id")
        if event.content_index != 0:
            raise APIError(400, f"content_index={event.content_index}: an answer has one content part (0)",
                           param="content_index")
        if event.audio_end_ms > message.sent_ms + 1:
            raise APIError(400, f"audio_end_ms={event.audio_end_ms} is beyond the item's audio "
                                f"({message.sent_ms:.0f} ms)", param="audio_end_ms")
        message.truncate(event.audio_end_ms)
        return [self.truncated(message, event.audio_end_ms)]

    @staticmethod
    def truncated(message: Message, audio_end_ms: float) -> dict:
        return server_event("conversation.item.truncated", item_id=message.id, content_index=0,
                            audio_end_ms=int(audio_end_ms))

    # -- saved sessions (serve.state) ------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The session as a JSON value: config, conversation (clips with their codes), audio clock. The input
        buffer and a response in progress are not kept."""
        return {"id": self.id, "config": self.config.model_dump(mode="json"), "input_ms": self.input_ms,
                "messages": [m.to_json() for m in self.messages if m.status != "in_progress"]}

    def fingerprint(self) -> tuple:
        """What the snapshot holds, without the audio: it differs whenever the snapshot would (a turn, an answer,
        a transcript, audio codes, a truncation, the config), so a caller saves the snapshot only then."""
        return (self.config.model_dump_json(), tuple(
            (m.id, m.status, m.chars, m.audio_ms, tuple((c.codes is not None, c.transcript) for c in m.clips))
            for m in self.messages if m.status != "in_progress"))

    def restore(self, data: dict) -> None:
        self.id, self.input_ms = data["id"], float(data["input_ms"])
        self.config = SessionConfig.model_validate(data["config"], strict=False)
        self.messages = [Message.from_json(m) for m in data["messages"]]

    @staticmethod
    def _item_events(message: Message, previous: str | None) -> list[dict]:
        item = message.describe()
        return [server_event("conversation.item.added", previous_item_id=previous, item=item),
                server_event("conversation.item.done", previous_item_id=previous, item=item)]

    # -- responses -------------------------------------------------------------------------------------------
    def plan(self, params: ResponseParams) -> "Plan":
        """What `response.create` asks for, checked: the prompt's messages (newest that fit the caps) and options."""
        config = self.config
        modalities = params.output_modalities or config.output_modalities
        output = params.audio.output if params.audio else config.audio.output
        instructions = params.instructions if params.instructions is not None else config.instructions
        max_tokens = config.max_output_tokens if params.max_output_tokens is None else params.max_output_tokens
        self._check_output(output, instructions, max_tokens, "response")
        if not self.messages or self.messages[-1].role != "user":
            raise APIError(400, "nothing to respond to: the conversation must end with a user message (append audio "
                                "and input_audio_buffer.commit, or conversation.item.create)", param="response",
                           code="conversation_empty")
        system_texts = [t for m in self.messages if m.role == "system" for t in m.texts]
        system = "\n".join(([instructions] if instructions else []) + system_texts) or instructions
        voice = self.voices.resolve(output.voice, "response.audio.output.voice")
        if voice is not None and system is not None:
            raise APIError(400, "give either instructions (or system items) or a custom voice: the voice prompt is "
                                "the system turn", param="response.audio.output.voice")
        kept = [m for m in self._newest(len(system or "")) if m.texts or m.clips]  # (an answer cut to nothing)
        if len(system or "") + kept[-1].chars > self.caps["max_text_chars"]:
            raise APIError(400, f"the instructions, system items and last user message hold over max_text_chars="
                                f"{self.caps['max_text_chars']} characters", param="response", code="max_text_chars")
        decoding = {f: getattr(params, f) if getattr(params, f) is not None else getattr(config, f)
                    for f in DECODING_FIELDS}
        options = self._options(decoding, max_tokens, "audio" in modalities, "response")
        return Plan(kept, system, voice, options, "audio" in modalities, params.metadata)


@dataclass
class Plan:
    """A checked response.create: the messages of its prompt (the last is the new user turn) and its options."""

    messages: list[Message]
    system: str | None
    voice: list[int] | None
    options: RequestOptions  # mode, max tokens, sampling, layout (actors.requests)
    speak: bool
    metadata: dict | None

    @property
    def max_new_tokens(self) -> int:
        return self.options.max_new_tokens

    def history_clips(self) -> list[Clip]:
        """Clips of earlier turns still without codes (the caller encodes them)."""
        return [c for m in self.messages[:-1] for c in m.clips if c.codes is None]

    def new_clip(self) -> "Clip | None":
        """The turn's own clip (the caller admits it: `serve.uploads.admit_pcm16`, off the event loop)."""
        return self.messages[-1].clips[-1] if self.messages[-1].clips else None

    def request(self, audio=None) -> dict:
        """`run_request` keyword arguments of the chat task (the earlier clips' codes must be set); `audio`: the
        turn's clip as admitted by the caller (else it goes as a wav, decoded by the request path)."""
        *earlier, last = self.messages
        turns = [(Turn(m.role, m.texts), [c.codes for c in m.clips]) for m in earlier]
        if (last.texts and last.clips) or len(last.clips) > 1:  # as chat completions: all but the last clip go first
            turns.append((Turn("user", last.texts), [c.codes for c in last.clips[:-1]]))
        history = [chat_format.history_entry(turn, codes, None) for turn, codes in turns]
        new_turn = ({"audio": audio if audio is not None else last.clips[-1].wav()} if last.clips
                    else {"text": "\n".join(last.texts)})
        return dict(history=history, voice=self.voice, system=self.system, **self.options.run_args(), **new_turn)

    def prompt_audio_tokens(self) -> int:
        return len(self.voice or ()) + sum(len(c.codes or ()) for m in self.messages[:-1] for c in m.clips)


class Response:
    """One response's output: `run_request` events in, server events out; its answer joins the conversation."""

    def __init__(self, session: Session, plan: Plan):
        self.session, self.plan = session, plan
        self.id, self.item = new_id("resp"), Message(new_id("item"), "assistant", spoken=plan.speak,
                                                       status="in_progress")
        self.pcm = PcmStream()  # 24 kHz through one soxr stream (serve.audio_formats)
        self.transcript = ""
        self.finished = False
        self.first_audio_at: float | None = None  # time.monotonic() of the first audio delta

    def played_ms(self, now: float | None = None) -> float:
        """The server's estimate of what the user heard: the audio sent, up to the wall time since it began."""
        if self.first_audio_at is None:
            return 0.0
        return min(self.item.sent_ms, ((now or time.monotonic()) - self.first_audio_at) * 1000)

    def playing(self, now: float | None = None) -> bool:
        """Still being made, or (by the estimate) still being heard."""
        return not self.finished or self.played_ms(now) < self.item.sent_ms

    def _describe(self, status: str, **more) -> dict:
        return {"id": self.id, "object": "realtime.response", "status": status, "conversation_id": self.session.id,
                "output_modalities": ["audio" if self.plan.speak else "text"], "metadata": self.plan.metadata,
                "max_output_tokens": self.plan.max_new_tokens, **more}

    def _part(self, type: str, **fields) -> dict:
        return server_event(type, response_id=self.id, item_id=self.item.id, output_index=0, content_index=0,
                            **fields)

    def _content(self) -> dict:
        return ({"type": "audio", "transcript": self.transcript} if self.plan.speak
                else {"type": "text", "text": self.transcript})

    def started(self) -> list[dict]:
        previous = self.session.add(self.item)
        item = self.item.describe()
        return [server_event("response.created", response=self._describe("in_progress", output=[])),
                server_event("response.output_item.added", response_id=self.id, output_index=0, item=item),
                server_event("conversation.item.added", previous_item_id=previous, item=item),
                self._part("response.content_part.added", part=self._content())]

    def on_event(self, event) -> list[dict]:
        """A TextDelta, AudioChunk or Done of the run as server events."""
        if isinstance(event, TextDelta) and event.text:
            self.transcript += event.text
            kind = "response.output_audio_transcript.delta" if self.plan.speak else "response.output_text.delta"
            return [self._part(kind, delta=event.text)]
        if isinstance(event, AudioChunk) and self.plan.speak:
            return self._audio(event.pcm, event.sample_rate)
        if isinstance(event, Done):
            status = "incomplete" if event.reason == "length" else "completed"
            details = {"type": status, "reason": "max_output_tokens"} if status == "incomplete" else None
            return self._audio(np.zeros(0, np.float32), 0, last=True) + self._finished(status, details, event)
        return []

    def _audio(self, pcm: np.ndarray, rate: int, last: bool = False) -> list[dict]:
        data = self.pcm.end() if last else self.pcm.chunk(pcm, rate)
        if not data:
            return []
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
        self.item.marks.append((self.item.sent_ms, len(self.transcript)))
        self.item.sent_ms += len(data) / 2 / OUTPUT_RATE * 1000
        self.item.audio_ms = self.item.sent_ms
        return [self._part("response.output_audio.delta", delta=base64.b64encode(data).decode())]

    def cancelled(self, reason: str = "client_cancelled") -> list[dict]:
        """OpenAI's reasons: client_cancelled (response.cancel), turn_detected (the user spoke over it)."""
        return self._finished("cancelled", {"type": "cancelled", "reason": reason}, None)

    def lost(self, err: APIError) -> list[dict]:
        """The events that end this response if the process making it is lost (rendered ahead, changing nothing):
        the error, the answer's item gone from the conversation (a snapshot never holds an answer in progress),
        and `response.done` failed."""
        error = {"type": err.type, "code": err.code, "message": err.message}
        return [error_event(err), server_event("conversation.item.deleted", item_id=self.item.id),
                server_event("response.done", response=self._describe("failed", output=[], usage=None, status_details={
                    "type": "failed", "error": error}))]

    def failed(self, err: APIError) -> list[dict]:
        error = {"type": err.type, "code": err.code, "message": err.message}
        return [error_event(err)] + self._finished("failed", {"type": "failed", "error": error}, None)

    def _finished(self, status: str, details: dict | None, done: Done | None) -> list[dict]:
        if self.finished:  # a cancel that came as the answer ended
            return []
        self.finished = True
        self.item.texts = [self.transcript] if self.transcript else []
        self.item.said = self.transcript
        self.item.status = "completed" if status == "completed" else "incomplete"
        if not self.item.texts and self.item in self.session.messages:  # nothing said: no turn in later prompts
            self.session.messages.remove(self.item)
        item = self.item.describe()
        if self.plan.speak:
            events = [self._part("response.output_audio.done"),
                      self._part("response.output_audio_transcript.done", transcript=self.transcript)]
        else:
            events = [self._part("response.output_text.done", text=self.transcript)]
        events += [self._part("response.content_part.done", part=self._content()),
                   server_event("response.output_item.done", response_id=self.id, output_index=0, item=item),
                   server_event("conversation.item.done", item=item),
                   server_event("response.done", response=self._describe(status, status_details=details, output=[item],
                                                                         usage=self._usage(done)))]
        return events

    def _usage(self, done: Done | None) -> dict | None:
        if done is None:
            return None
        prompt = int(done.usage.get("llm", {}).get("prompt_tokens", 0))
        audio_in = self.plan.prompt_audio_tokens() + int(done.usage.get("encoder", {}).get("codes", 0))
        out, audio_out = len(done.token_ids), len(done.audio_codes)
        return {"total_tokens": prompt + out, "input_tokens": prompt, "output_tokens": out,
                "input_token_details": {"audio_tokens": audio_in, "text_tokens": max(prompt - audio_in, 0),
                                        "cached_tokens": 0},
                "output_token_details": {"audio_tokens": audio_out, "text_tokens": max(out - audio_out, 0)}}


def _at(data, *keys):
    """data[k1][k2]... where each level is a dict, else None."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _merge(base: dict, update) -> dict:
    """`update`'s fields over `base`, nested objects merged (OpenAI: only the fields present are updated)."""
    if not isinstance(update, dict):
        return update
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(base.get(key), dict) else value
    return merged
