"""OpenAI request / response / error models of the speech API (the wire shapes, no HTTP or Ray here)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's standard voice names map to our default voice so unchanged clients work
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
DEFAULT_VOICE = "default"
MODEL_ID = "vita-audio"


class APIError(Exception):
    """A request the API refuses: becomes OpenAI's `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class VoiceRef(BaseModel):
    """A custom voice by id (`{"id": "voice_..."}`), as OpenAI's speech and chat audio accept."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str


class Sampling(BaseModel):
    """The decoding options every route takes (types here; values are checked by the one request policy,
    `actors.requests`, with the messages of every other front end). Absent or temperature 0: greedy."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    mode: str | list[int] | None = None

    def sampling_fields(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed}


class SpeechBody(Sampling):
    """POST /v1/audio/speech (OpenAI's fields plus our extensions mode / max_new_tokens / sampling)."""

    model: str
    input: str
    voice: str | VoiceRef = DEFAULT_VOICE
    response_format: Literal["wav", "pcm", "flac", "mp3", "opus"] = "wav"
    stream_format: Literal["audio", "sse"] = "audio"
    speed: float = 1.0
    instructions: str | None = None
    max_new_tokens: int = 256


class TranscriptionForm(BaseModel):
    """The form fields of POST /v1/audio/transcriptions (the file comes separately). Form values are strings,
    so this model converts ("true" -> True, "0.0" -> 0.0)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "verbose_json"] = "json"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    timestamp_granularities: list[Literal["segment"]] = Field(default_factory=list, alias="timestamp_granularities[]")
    include: list[Literal["logprobs"]] = Field(default_factory=list, alias="include[]")
    mode: str | None = None
    max_new_tokens: int = 256

    def sampling_fields(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed}


class AudioOut(BaseModel):
    """Chat `audio`: the voice and format of the spoken answer."""

    model_config = ConfigDict(extra="forbid", strict=True)

    voice: str | VoiceRef = DEFAULT_VOICE
    format: Literal["wav", "pcm16", "flac", "mp3", "opus"] = "wav"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ChatBody(Sampling):
    """POST /v1/chat/completions (the fields of OpenAI's chat API this model can honour)."""

    model: str
    messages: list[dict] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] = Field(default_factory=lambda: ["text"], min_length=1)
    audio: AudioOut | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    store: bool | None = None
    metadata: dict | None = None


def validation_message(err) -> tuple[str, str | None]:
    """The first pydantic error as one line naming the field."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"{param or 'body'}: {first.get('msg')}", param
