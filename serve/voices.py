"""Voice prompts: the built-in default voice, OpenAI's voice names (aliases of the default, so unchanged
clients work) and uploaded clips. An upload is encoded once into audio codes, which every later request
passes as the voice prompt (the original's "Your Voice: <audio>" system turn).

The store lives in the ingress replica's memory: with several ingress replicas, upload to each (or run one).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from serve.api import DEFAULT_VOICE, OPENAI_VOICES, APIError, VoiceRef

MAX_VOICES = 256
MAX_VOICE_SECONDS = 30.0  # a voice prompt is a short clip: longer ones only lengthen every prompt


@dataclass
class Voice:
    id: str
    name: str
    codes: list[int]
    seconds: float
    created_at: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        return {"id": self.id, "object": "audio.voice", "name": self.name, "type": "audio_sample",
                "created_at": self.created_at, "seconds": round(self.seconds, 3), "codes": len(self.codes)}


BUILT_IN = {"id": DEFAULT_VOICE, "object": "audio.voice", "name": DEFAULT_VOICE, "type": "built_in", "created_at": 0}


class VoiceStore:
    def __init__(self):
        self.voices: dict[str, Voice] = {}

    def check_new(self, name: str) -> None:
        """Refuse a new voice before its clip is encoded: the store is full or the name is taken."""
        if len(self.voices) >= MAX_VOICES:
            raise APIError(400, f"the voice store is full ({MAX_VOICES} voices); delete one first", param="name")
        if name in (DEFAULT_VOICE, *OPENAI_VOICES) or any(v.name == name for v in self.voices.values()):
            raise APIError(400, f"a voice named {name!r} already exists", param="name")

    def add(self, name: str, codes: list[int], seconds: float) -> Voice:
        self.check_new(name)  # again: another upload may have taken the name while this one was encoded
        voice = Voice(f"voice_{uuid.uuid4().hex[:16]}", name, list(codes), seconds)
        self.voices[voice.id] = voice
        return voice

    def delete(self, voice_id: str) -> None:
        if self.voices.pop(voice_id, None) is None:
            raise APIError(404, f"voice {voice_id!r} does not exist", param="voice_id", code="voice_not_found")

    def listing(self) -> dict:
        data = [BUILT_IN, *(v.describe() for v in self.voices.values())]
        return {"object": "list", "data": data, "voices": [d["name"] for d in data],
                "aliases": {v: DEFAULT_VOICE for v in OPENAI_VOICES}}

    def resolve(self, voice, param: str = "voice") -> list[int] | None:
        """A request's voice -> the voice prompt codes (None: the default voice); unknown voices are a 400."""
        key = voice.id if isinstance(voice, VoiceRef) else voice
        if key == DEFAULT_VOICE or key in OPENAI_VOICES:
            return None
        found = self.voices.get(key) or next((v for v in self.voices.values() if v.name == key), None)
        if found is None:
            raise APIError(400, f"unknown voice {key!r}; see GET /v1/audio/voices", param=param)
        return list(found.codes)
