"""Voice prompts: the built-in default voice, OpenAI's voice names (aliases of the default, so unchanged
clients work) and uploaded clips. An upload is encoded once into audio codes, which every later request
passes as the voice prompt (the original's "Your Voice: <audio>" system turn).

Uploaded voices live in the endpoint's state store (`serve.state`, kind `voice`): the clip codes, name, seconds
and consent text, owned by the API key that uploaded them (`owner`: `serve.keys.owner_id`; "" on an endpoint
without keys). A name is unique per key, atomically (of concurrent uploads of one name exactly one wins, across
replicas sharing the store); another key's voice reads as absent. `VoiceStore()` without a store keeps the voices
in this process only (`serve.state.open_store("memory")`); give it the app's store to share and keep them.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from serve.api import DEFAULT_VOICE, OPENAI_VOICES, APIError, VoiceRef
from serve.state import VOICE, Conflict, Full, NotFound, Record, StateStore, open_store

MAX_VOICES = 256
MAX_VOICE_SECONDS = 30.0  # a voice prompt is a short clip: longer ones only lengthen every prompt


@dataclass
class Voice:
    id: str
    name: str
    codes: list[int]
    seconds: float
    created_at: int = field(default_factory=lambda: int(time.time()))
    consent: str | None = None

    def describe(self) -> dict:
        return {"id": self.id, "object": "audio.voice", "name": self.name, "type": "audio_sample",
                "created_at": self.created_at, "seconds": round(self.seconds, 3), "codes": len(self.codes)}

    def data(self) -> dict:
        """The stored record's data (the name, id and owner are the record's own fields)."""
        return {"codes": list(self.codes), "seconds": self.seconds, "consent": self.consent}

    @classmethod
    def from_record(cls, record: Record) -> "Voice":
        data = record.data
        return cls(record.id, record.name, list(data["codes"]), float(data["seconds"]), int(record.created_at),
                   data.get("consent"))


BUILT_IN = {"id": DEFAULT_VOICE, "object": "audio.voice", "name": DEFAULT_VOICE, "type": "built_in", "created_at": 0}
RESERVED = frozenset((DEFAULT_VOICE, *OPENAI_VOICES))


class VoiceStore:
    """The voices of every key, on a state store (a `StateStore`, its URL, or None: this process only)."""

    def __init__(self, state: StateStore | str | None = None):
        self.state = open_store("memory") if state is None else open_store(state) if isinstance(state, str) else state

    def check_new(self, name: str, owner: str = "") -> None:
        """Refuse a new voice before its clip is encoded: the key's store is full or the name is taken. (`add`
        checks again, atomically: another upload may take the name while this one is encoded.)"""
        if name in RESERVED:
            raise self._taken(name)
        try:
            self.state.find(VOICE, owner, name)
        except NotFound:
            pass
        else:
            raise self._taken(name)
        if len(self.state.list(VOICE, owner)) >= MAX_VOICES:
            raise self._full()

    def add(self, name: str, codes: list[int], seconds: float, owner: str = "", consent: str | None = None) -> Voice:
        if name in RESERVED:
            raise self._taken(name)
        voice = Voice(f"voice_{uuid.uuid4().hex[:16]}", name, list(codes), seconds, consent=consent)
        try:
            record = self.state.create(VOICE, owner, voice.data(), id=voice.id, name=name, max_items=MAX_VOICES)
        except Conflict:
            raise self._taken(name) from None
        except Full:
            raise self._full() from None
        return Voice.from_record(record)

    def get(self, voice_id: str, owner: str = "") -> Voice:
        try:
            return Voice.from_record(self.state.get(VOICE, owner, voice_id))
        except (NotFound, ValueError):
            raise APIError(404, f"voice {voice_id!r} does not exist", param="voice_id",
                           code="voice_not_found") from None

    def delete(self, voice_id: str, owner: str = "") -> None:
        try:
            self.state.delete(VOICE, owner, voice_id)
        except (NotFound, ValueError):  # ValueError: not even an id's shape
            raise APIError(404, f"voice {voice_id!r} does not exist", param="voice_id",
                           code="voice_not_found") from None

    def listing(self, owner: str = "") -> dict:
        data = [BUILT_IN, *(Voice.from_record(r).describe() for r in self.state.list(VOICE, owner))]
        return {"object": "list", "data": data, "voices": [d["name"] for d in data],
                "aliases": {v: DEFAULT_VOICE for v in OPENAI_VOICES}}

    def resolve(self, voice, param: str = "voice", owner: str = "") -> list[int] | None:
        """A request's voice -> the voice prompt codes (None: the default voice); unknown voices (and another
        key's) are a 400."""
        key = voice.id if isinstance(voice, VoiceRef) else voice
        if key == DEFAULT_VOICE or key in OPENAI_VOICES:
            return None
        for lookup in (self.state.get, self.state.find):  # by id, then by name
            try:
                return list(lookup(VOICE, owner, key).data["codes"])
            except (NotFound, ValueError):
                continue
        raise APIError(400, f"unknown voice {key!r}; see GET /v1/audio/voices", param=param)

    def owned(self, owner: str) -> "OwnedVoices":
        """One key's view: `resolve(voice, param)` for that owner (what a realtime session holds)."""
        return OwnedVoices(self, owner)

    @staticmethod
    def _taken(name: str) -> APIError:
        return APIError(400, f"a voice named {name!r} already exists", param="name")

    @staticmethod
    def _full() -> APIError:
        return APIError(400, f"the voice store is full ({MAX_VOICES} voices); delete one first", param="name")


@dataclass(frozen=True)
class OwnedVoices:
    store: VoiceStore
    owner: str

    def resolve(self, voice, param: str = "voice") -> list[int] | None:
        return self.store.resolve(voice, param, self.owner)
