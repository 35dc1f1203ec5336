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
    """Our sampling extensions (absent or temperature 0: greedy, the Pipeline's default)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=100_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    def params(self):
        """pipeline.sampling.SamplingParams, or None for greedy."""
        if not self.temperature:
            return None
        from pipeline.engine.sampling import SamplingParams

        return SamplingParams(greedy=False, temperature=self.temperature, top_p=self.top_p or 1.0,
                              top_k=self.top_k or 0, seed=self.seed)


class SpeechBody(Sampling):
    """POST /v1/audio/speech (OpenAI's fields plus our extensions mode / max_new_tokens / sampling)."""

    model: str
    input: str
    voice: str | VoiceRef = DEFAULT_VOICE
    response_format: Literal["wav", "pcm", "flac", "mp3", "opus"] = "wav"
    stream_format: Literal["audio", "sse"] = "audio"
    speed: float = 1.0
    instructions: str | None = None
    mode: str | None = None
    max_new_tokens: int = Field(256, ge=1)


class TranscriptionForm(BaseModel):
    """The form fields of POST /v1/audio/transcriptions (the file comes separately). Form values are strings,
    so this model converts ("true" -> True, "0.0" -> 0.0)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "verbose_json"] = "json"
    temperature: float = Field(0.0, ge=0, le=2)
    stream: bool = False
    timestamp_granularities: list[Literal["segment"]] = Field(default_factory=list, alias="timestamp_granularities[]")
    include: list[Literal["logprobs"]] = Field(default_factory=list, alias="include[]")
    mode: str | None = None
    max_new_tokens: int = Field(256, ge=1)


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
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    store: bool | None = None
    metadata: dict | None = None
    mode: str | None = None


def validation_message(err) -> tuple[str, str | None]:
    """The first pydantic error as one line naming the field."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"{param or 'body'}: {first.get('msg')}", param
