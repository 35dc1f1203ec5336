"""OpenAI's Realtime API (GA) on the wire: the client events this server takes, as typed models (the fields this
model can honour; other fields and wrong types are refused, naming the field), and the server event shapes
(every server event has an `event_id`; an error is OpenAI's `{"type": "error", "error": {...}}`). The session
state that handles them is serve.realtime.
"""
from __future__ import annotations

import json
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.audio import DEFAULT_LIMITS
from serve import chat_format
from serve.api import DEFAULT_VOICE, MODEL_ID, APIError, VoiceRef, validation_message

OUTPUT_RATE = 24000  # OpenAI's pcm rate
MAX_PADDING_MS = 10_000


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def server_event(type: str, **fields) -> dict:
    return {"type": type, "event_id": new_id("event"), **fields}


def error_event(err: APIError, event_id: str | None = None) -> dict:
    """OpenAI's realtime error: the HTTP error's fields plus the client event it answers."""
    return server_event("error", error={"type": err.type, "code": err.code, "message": err.message,
                                        "param": err.param, "event_id": event_id})


# ---------------------------------------------------------------------------------------------------------
# Client events


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PCM(Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: int = Field(OUTPUT_RATE, ge=DEFAULT_LIMITS.min_sample_rate, le=DEFAULT_LIMITS.max_sample_rate)  # input: any
    # rate the audio admission accepts (pipeline.audio.DEFAULT_LIMITS; a browser sends its device's rate)


class ServerVad(Strict):
    """OpenAI's server VAD (defaults as OpenAI's), run by actors.vad (Silero). Deviation: `idle_timeout_ms` ends
    the session (an `input_audio_buffer.timeout_triggered` event, then an `error` with code `idle_timeout`)
    instead of prompting the model, so that an abandoned socket does not hold an ingress slot."""

    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=MAX_PADDING_MS)
    silence_duration_ms: int = Field(500, ge=0, le=MAX_PADDING_MS)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = Field(None, ge=5000, le=30000)  # OpenAI's range


class Transcription(Strict):
    """`audio.input.transcription`: the user's turns transcribed by this model's ASR (`language` and `prompt` are
    accepted as OpenAI's and not used: the model's ASR prompt is fixed, as on /v1/audio/transcriptions)."""

    model: str = MODEL_ID
    language: str | None = Field(None, max_length=16)
    prompt: str | None = Field(None, max_length=1024)


class AudioInput(Strict):
    format: PCM = PCM()
    turn_detection: ServerVad | None = None  # null: push-to-talk (the client commits)
    transcription: Transcription | None = None
    noise_reduction: None = None


class AudioOutput(Strict):
    format: PCM = PCM()
    voice: str | VoiceRef = DEFAULT_VOICE
    speed: float = 1.0


class AudioConfig(Strict):
    input: AudioInput = AudioInput()
    output: AudioOutput = AudioOutput()


class Decoding(Strict):
    """Our decoding extensions, as every other front end takes them (values checked by `actors.requests`):
    mode and sampling (temperature absent or 0: greedy)."""

    mode: str | list[int] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


DECODING_FIELDS = tuple(Decoding.model_fields)


class SessionConfig(Decoding):
    """The session (`session.update` merges into it; `session.updated` shows it whole)."""

    type: Literal["realtime"] = "realtime"
    model: str = MODEL_ID
    instructions: str | None = None  # the system turn; null: the model's default persona
    output_modalities: list[Literal["text", "audio"]] = Field(default_factory=lambda: ["audio"], min_length=1)
    audio: AudioConfig = AudioConfig()
    max_output_tokens: int | Literal["inf"] = "inf"
    tools: list[dict] = Field(default_factory=list, max_length=0)
    tool_choice: Literal["auto", "none"] = "auto"
    tracing: None = None
    truncation: Literal["auto"] = "auto"


class ContentPart(Strict):
    type: Literal["input_text", "input_audio", "output_text", "output_audio"]
    text: str | None = None
    audio: str | None = None  # input_audio: base64 pcm16 at the session's input rate
    transcript: str | None = None


class ItemIn(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart] = Field(min_length=1, max_length=chat_format.MAX_MESSAGES)
    id: str | None = Field(None, max_length=64)
    object: Literal["realtime.item"] | None = None
    status: Literal["completed", "incomplete", "in_progress"] | None = None


class ResponseAudio(Strict):
    output: AudioOutput = AudioOutput()


class ResponseParams(Decoding):
    """`response.create`'s `response`: overrides of the session for this response only (a decoding field
    left out or null keeps the session's)."""

    conversation: Literal["auto"] = "auto"
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1)
    instructions: str | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    audio: ResponseAudio | None = None
    metadata: dict[str, str] | None = None


class ClientEvent(Strict):
    type: str
    event_id: str | None = Field(None, max_length=128)


class SessionUpdate(ClientEvent):
    session: dict


class BufferAppend(ClientEvent):
    audio: str


class ItemCreate(ClientEvent):
    item: ItemIn
    previous_item_id: str | None = None


class ResponseCreate(ClientEvent):
    response: ResponseParams = ResponseParams()


class ResponseCancel(ClientEvent):
    response_id: str | None = None


class ItemTruncate(ClientEvent):
    """The client's word on how much of an assistant answer its user heard (OpenAI's conversation.item.truncate)."""

    item_id: str = Field(max_length=64)
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ItemRetrieve(ClientEvent):
    item_id: str = Field(max_length=64)


CLIENT_EVENTS = {"session.update": SessionUpdate, "input_audio_buffer.append": BufferAppend,
                 "input_audio_buffer.commit": ClientEvent, "input_audio_buffer.clear": ClientEvent,
                 "conversation.item.create": ItemCreate, "response.create": ResponseCreate,
                 "response.cancel": ResponseCancel, "conversation.item.truncate": ItemTruncate,
                 "conversation.item.retrieve": ItemRetrieve}


def decode(raw: str | bytes | None) -> tuple[object, str | None]:
    """One WebSocket message -> its JSON value and event_id (echoed in the error of a refusal)."""
    if raw is None:
        raise APIError(400, "send events as JSON text messages", code="invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise APIError(400, f"the message is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
    event_id = data.get("event_id") if isinstance(data, dict) else None
    return data, event_id if isinstance(event_id, str) else None


def parse(data) -> ClientEvent:
    """A decoded message -> its typed client event."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise APIError(400, "an event must be a JSON object with a string `type`", param="type",
                       code="invalid_event")
    model = CLIENT_EVENTS.get(data["type"])
    if model is None:
        raise APIError(400, f"unknown event type {data['type'][:80]!r}; supported: {sorted(CLIENT_EVENTS)}",
                       param="type", code="invalid_event")
    return validated(model, data, None)


def validated(model: type[BaseModel], data: dict, prefix: str | None):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err)
        if prefix:
            message, param = f"{prefix}.{message}", f"{prefix}.{param}" if param else prefix
        raise APIError(400, message, param=param) from None
