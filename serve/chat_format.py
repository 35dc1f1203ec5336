"""OpenAI chat messages <-> our chat turns, and the chat.completion / chat.completion.chunk shapes.

Parsing only checks and sorts the messages (no stage calls): the ingress encodes the audio parts and builds
the `history` that `actors.orchestration.run_request` takes. The last message must be the user's turn;
when it holds text besides its audio (or several clips), everything but the last clip goes into a user turn
just before it (the model takes one clip as the new turn, as the original's chat script does).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from serve.api import MODEL_ID, APIError
from serve.state import AUDIO, NotFound, open_store
from serve.uploads import decode_base64

AUDIO_PLACEHOLDER = "<|audio|>"  # pipeline.tokens.AUDIO_PLACEHOLDER (imported lazily there: torch-free here)
INPUT_AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")
MAX_MESSAGES = 512  # with max_text_chars this bounds the prompt (each message costs its template tokens)


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    texts: list[str] = field(default_factory=list)
    audios: list[bytes] = field(default_factory=list)  # encoded clips (user turns)
    audio_id: str | None = None  # assistant turns: an earlier answer's audio


@dataclass
class Conversation:
    system: str | None
    history: list[Turn]
    last: Turn  # the new user turn


def check_unicode(value: str, param: str) -> None:
    """JSON may carry lone surrogates ("\\ud800") that no tokenizer takes: refuse them here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"{param} is not valid Unicode text: {err.reason} at character {err.start}",
                       param=param) from None


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"{param} must be a string, got {type(value).__name__}", param=param)
    check_unicode(value, param)
    if AUDIO_PLACEHOLDER in value:
        raise APIError(400, f"{param} contains {AUDIO_PLACEHOLDER}, which marks audio in the prompt; send audio "
                            "as an input_audio part", param=param)
    return value


def _parts(content, role: str, param: str, turn: Turn) -> None:
    if content is None:
        return
    if isinstance(content, str):
        turn.texts.append(_text(content, param))
        return
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param=param)
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            turn.texts.append(_text(part.get("text"), f"{where}.text"))
        elif kind == "input_audio" and role == "user":
            audio = part.get("input_audio")
            if not isinstance(audio, dict):
                raise APIError(400, f"{where}.input_audio must be an object with data and format", param=where)
            fmt = audio.get("format", "wav")
            if fmt not in INPUT_AUDIO_FORMATS:
                raise APIError(400, f"{where}.input_audio.format={fmt!r}; expected one of {INPUT_AUDIO_FORMATS}",
                               param=f"{where}.input_audio.format")
            turn.audios.append(decode_base64(audio.get("data"), f"{where}.input_audio.data"))
        else:
            allowed = "text or input_audio" if role == "user" else "text"
            raise APIError(400, f"{where}: content part type {kind!r} is not supported in a {role} message "
                                f"(expected {allowed})", param=where)


def parse_messages(messages: list) -> Conversation:
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"messages holds {len(messages)} messages, over the limit of {MAX_MESSAGES}",
                       param="messages")
    system, turns = [], []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{param} must be an object with role and content", param=param)
        role = message.get("role")
        unknown = set(message) - {"role", "content", "name", "audio", "refusal"}
        if unknown:
            raise APIError(400, f"{param} has unsupported field(s) {sorted(unknown)}", param=param)
        if role in ("system", "developer"):
            turn = Turn("system")
            _parts(message.get("content"), "system", f"{param}.content", turn)
            system.append("\n".join(turn.texts))
            continue
        if role not in ("user", "assistant"):
            raise APIError(400, f"{param}.role={role!r}; expected system, developer, user or assistant",
                           param=f"{param}.role")
        turn = Turn(role)
        _parts(message.get("content"), role, f"{param}.content", turn)
        audio = message.get("audio")
        if audio is not None:
            if role != "assistant" or not isinstance(audio, dict) or not isinstance(audio.get("id"), str):
                raise APIError(400, f"{param}.audio must be {{'id': ...}} of an earlier assistant answer",
                               param=f"{param}.audio")
            turn.audio_id = audio["id"]
        if not turn.texts and not turn.audios and turn.audio_id is None:
            raise APIError(400, f"{param} has no content", param=f"{param}.content")
        turns.append(turn)
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    last = turns.pop()
    if (last.texts and last.audios) or len(last.audios) > 1:  # everything but the last clip goes just before it
        turns.append(Turn("user", last.texts, last.audios[:-1]))
        last = Turn("user", [], last.audios[-1:])
    return Conversation("\n".join(system) if system else None, turns, last)


def history_entry(turn: Turn, codes: list[list[int]], transcript: str | None) -> dict:
    """One earlier turn as the dict `pipeline.tokens.chat_messages` takes (`<|audio|>` per clip + its codes)."""
    text = "\n".join(turn.texts)
    if turn.role == "assistant":
        return {"role": "assistant", "content": text or transcript or ""}
    return {"role": "user", "content": text + f"\n{AUDIO_PLACEHOLDER}" * len(codes), "audios": codes}


class AudioAnswers:
    """Transcripts of recent audio answers by id, so a later turn can refer to one (`{"audio": {"id"}}`), with
    OpenAI's `expires_at` (`ttl_s` after the answer). They live in the endpoint's state store (`serve.state`, kind
    `audio`), owned by the API key that got the answer (`owner`; "" without keys): another key's id, like an
    expired one, is unknown. `AudioAnswers()` without a store keeps them in this process only."""

    def __init__(self, size: int = 1024, ttl_s: float = 3600.0, state=None):
        self.size, self.ttl_s = size, ttl_s  # size: kept for callers; the store drops answers by expiry
        self.state = open_store("memory") if state is None else open_store(state) if isinstance(state, str) else state

    def add(self, transcript: str, owner: str = "") -> tuple[str, int]:
        audio_id, expires = f"audio_{uuid.uuid4().hex[:16]}", int(time.time() + self.ttl_s)
        self.state.create(AUDIO, owner, transcript, id=audio_id, expires_at=expires)
        return audio_id, expires

    def finish(self, audio_id: str, transcript: str, expires_at: int, owner: str = "") -> None:
        """A streamed answer's final transcript (its id was handed out by `add` before the text was known)."""
        try:
            self.state.put(AUDIO, owner, audio_id, transcript, expires_at=expires_at)
        except (NotFound, ValueError):  # expired meanwhile (or never ours): nothing to keep
            pass

    def transcript(self, audio_id: str, param: str, owner: str = "") -> str:
        try:
            return self.state.get(AUDIO, owner, audio_id).data
        except (NotFound, ValueError):
            raise APIError(400, f"{param}: audio {audio_id!r} is unknown or expired", param=param) from None


# ---------------------------------------------------------------------------------------------------------
# Response shapes


def chat_usage(done, prompt_audio_tokens: int) -> dict:
    llm = done.usage.get("llm", {})
    prompt = int(llm.get("prompt_tokens", 0))
    completion = len(done.token_ids)
    audio_out = len(done.audio_codes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"audio_tokens": prompt_audio_tokens, "cached_tokens": 0,
                                      "text_tokens": max(prompt - prompt_audio_tokens, 0)},
            "completion_tokens_details": {"audio_tokens": audio_out, "text_tokens": max(completion - audio_out, 0),
                                          "reasoning_tokens": 0}}


def finish_reason(done) -> str:
    return "length" if done.reason == "length" else "stop"


def completion(completion_id: str, message: dict, done, usage: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": MODEL_ID,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(done), "logprobs": None}],
            "usage": usage, "system_fingerprint": None}


def chunk(completion_id: str, delta: dict, finish: str | None = None, usage: dict | None = None,
          choices: bool = True) -> dict:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL_ID,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else [],
            "system_fingerprint": None}
    if usage is not None:
        body["usage"] = usage
    return body


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
