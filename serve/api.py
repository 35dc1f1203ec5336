"""OpenAI request / response / error models of the speech API (the wire shapes, no HTTP or Ray here)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's standard voice names map to our default voice so unchanged clients work
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
DEFAULT_VOICE = "default"
MODEL_ID = "vita-audio"
# the languages the model was trained to transcribe (spec: LibriSpeech / MLS English, Common Voice en and zh-CN,
# WenetSpeech); transcription `language` takes their ISO-639-1 codes, verbose_json names them as OpenAI does
LANGUAGES = {"en": "english", "zh": "chinese"}


class APIError(Exception):
    """A request the API refuses: becomes OpenAI's `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, why: str) -> APIError:
    """An OpenAI field this model cannot honour: refused (400 naming it), never silently ignored."""
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


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

    def check_supported(self) -> None:
        """Refuse what the model cannot honour (its TTS prompt is fixed: no style instructions, one speed)."""
        if self.instructions and self.instructions.strip():
            raise unsupported("instructions", "this model cannot follow speaking instructions (tone, accent, pace); "
                                              "leave it out, or pick a voice")
        if self.speed != 1.0:
            raise unsupported("speed", f"speed={self.speed}: only 1.0 is supported")


class TranscriptionForm(BaseModel):
    """The form fields of POST /v1/audio/transcriptions (the file comes separately). Form values are strings,
    so this model converts ("true" -> True, "0.0" -> 0.0)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
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

    def check_supported(self) -> None:
        """Refuse what the model cannot honour: a context prompt (its ASR prompt is fixed), a language it was not
        trained on, log probabilities, timestamps outside verbose_json and a stream of a timed format."""
        if self.prompt and self.prompt.strip():
            raise unsupported("prompt", "this model's transcription prompt is fixed; a context prompt is not "
                                        "supported (leave it out)")
        if self.language is not None and self.language.lower() not in LANGUAGES:
            raise unsupported("language", f"language={self.language!r}: this model transcribes "
                                          f"{', '.join(f'{v} ({k})' for k, v in LANGUAGES.items())}")
        if self.include:
            raise unsupported("include[]", "include[]=logprobs is not supported")
        if self.timestamp_granularities and self.response_format != "verbose_json":
            raise unsupported("timestamp_granularities[]", "timestamps come with response_format=verbose_json only")
        if self.stream and self.response_format not in ("json", "text"):
            raise unsupported("response_format", f"a streamed transcription is json or text, not "
                                                 f"{self.response_format}")


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
    user: str | None = Field(None, max_length=256)  # the end user's id: in the replica's log line of the request
    store: bool | None = None
    metadata: dict | None = None

    def check_supported(self) -> None:
        """Refuse what this server cannot honour: it keeps no completions (store), so none of their metadata."""
        if self.store:
            raise unsupported("store", "this server does not store completions (leave it out or false)")
        if self.metadata:
            raise unsupported("metadata", "metadata is kept with stored completions, which this server does not "
                                          "store")


def validation_message(err) -> tuple[str, str | None]:
    """The first pydantic error as one line naming the field."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"{param or 'body'}: {first.get('msg')}", param


def subtitles(segments: list[dict], fmt: Literal["srt", "vtt"]) -> str:
    """Timed segments ({start, end, text} in seconds) as SubRip or WebVTT text, one cue per segment with text."""
    def stamp(seconds: float) -> str:
        ms = max(0, round(seconds * 1000))
        h, ms = divmod(ms, 3_600_000)
        m, ms = divmod(ms, 60_000)
        s, ms = divmod(ms, 1000)
        return f"{h:02d}:{m:02d}:{s:02d}{',' if fmt == 'srt' else '.'}{ms:03d}"

    cues = []
    for segment in segments:
        # a blank line ends a cue and "-->" marks a timing line: neither may appear in a cue's text
        lines = [line.strip().replace("-->", "->") for line in segment["text"].splitlines()]
        text = "\n".join(line for line in lines if line)
        if text:
            timing = f"{stamp(segment['start'])} --> {stamp(segment['end'])}"
            cues.append(f"{len(cues) + 1}\n{timing}\n{text}\n" if fmt == "srt" else f"{timing}\n{text}\n")
    body = "\n".join(cues)
    return body if fmt == "srt" else "WEBVTT\n\n" + body
