"""Collecting a stream of pipeline events into one result (text, PCM, usage, timings)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.payloads import AudioChunk, Done, ErrorEvent, PipelineEvent, TextDelta


@dataclass
class SpeechResult:
    """Everything one request produced, gathered from its events."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    audio_codes: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 0
    done: Done | None = None
    error: ErrorEvent | None = None
    event_kinds: list[str] = field(default_factory=list)  # "text" / "audio" in arrival order

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)

    @property
    def ok(self) -> bool:
        return self.done is not None


def collect(events) -> SpeechResult:
    result = SpeechResult()
    for event in events:
        _add(result, event)
    return result


async def collect_async(events) -> SpeechResult:
    result = SpeechResult()
    async for event in events:
        _add(result, event)
    return result


def _add(result: SpeechResult, event: PipelineEvent) -> None:
    if isinstance(event, TextDelta):
        result.text += event.text
        result.event_kinds.append("text")
    elif isinstance(event, AudioChunk):
        result.chunks.append(event.pcm)
        result.sample_rate = event.sample_rate
        result.event_kinds.append("audio")
    elif isinstance(event, Done):
        result.done = event
        result.text = event.text
        result.token_ids = event.token_ids
        result.audio_codes = event.audio_codes
    elif isinstance(event, ErrorEvent):
        result.error = event
