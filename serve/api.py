"""OpenAI request / response / error models of the speech API (the wire shapes, no HTTP or Ray here)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's standard voice names map to our default voice so unchanged clients work
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse")
DEFAULT_VOICE = "default"
MODEL_ID = "vita-audio"


class APIError(Exception):
    """A request the API refuses: becomes OpenAI's `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SpeechBody(BaseModel):
    """POST /v1/audio/speech (OpenAI's fields plus our extensions mode / max_new_tokens)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: str
    voice: str = DEFAULT_VOICE
    response_format: Literal["wav", "pcm", "flac"] = "wav"
    stream_format: Literal["audio", "sse"] = "audio"
    speed: float = 1.0
    instructions: str | None = None
    mode: str | None = None
    max_new_tokens: int = Field(256, ge=1)


def validation_message(err) -> tuple[str, str | None]:
    """The first pydantic error as one line naming the field."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"{param or 'body'}: {first.get('msg')}", param
