"""The two stream protocols of one request, written once for every front end that runs the stages:

    LLMFold      the LLM stage's stream of `LLMOutput` items gathered as it goes: text, audio chunks, the end
    DecoderFeed  one request's side of the audio decoder's chunk protocol: chunks numbered in order (`seq`; the
                 decoder stage queues them by it), one final empty chunk that flushes the stream's tail and
                 frees it, and `close` when the request ends any other way

`actors.orchestration.run_request` streams with them (events as the items arrive); the batch job's stage pools
(`jobs.batch.callables`), whose LLM and decoder are separate Ray Data pools, fold and decode with the same two.
No ray, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable

import numpy as np

from actors.payloads import CodesChunk, LLMEnd, LLMOutput, PCMChunk


@dataclass
class LLMFold:
    """What one request's LLM stream said so far."""

    text: str = ""
    text_ids: list[int] = field(default_factory=list)
    audio_chunks: list[list[int]] = field(default_factory=list)  # each closed at an end-of-audio
    end: LLMEnd | None = None  # the last item's: reason, usage, every generated id

    def add(self, item: LLMOutput) -> None:
        self.text += item.text
        self.text_ids.extend(item.text_ids)
        self.audio_chunks.extend(list(codes) for codes in item.audio_chunks)
        if item.end is not None:
            self.end = item.end

    @property
    def audio_codes(self) -> list[int]:
        return [code for chunk in self.audio_chunks for code in chunk]


async def fold_llm(stream: AsyncIterator[LLMOutput]) -> LLMFold:
    """The whole stream, folded (raises what the stream raised; a stream without an end marker is an error)."""
    fold = LLMFold()
    async for item in stream:
        fold.add(item)
    if fold.end is None:
        raise RuntimeError("the LLM stream ended without an end marker")
    return fold


class DecoderFeed:
    """One request's chunks to the audio decoder through a `StageClients` (or anything with its `push` and
    `close`). Chunks go out numbered from 0; `flush` sends the final empty chunk after the last one (nothing if
    no chunk was sent); `close` frees the decoder's stream of a request that ends otherwise."""

    def __init__(self, clients, request_id: str):
        self.clients, self.request_id = clients, request_id
        self.sent = 0  # chunks numbered so far (the next chunk's seq)
        self.flushed = False

    def chunk(self, codes) -> CodesChunk:
        """The request's next chunk (numbered; send it with `clients.push`, resending the same one is safe)."""
        chunk = CodesChunk(self.request_id, list(codes), seq=self.sent)
        self.sent += 1
        return chunk

    def push(self, codes) -> Awaitable[PCMChunk]:
        return self.clients.push(self.chunk(codes))

    def flush(self) -> Awaitable[PCMChunk]:
        """The final chunk: the decoder flushes the stream's tail and frees it."""
        self.flushed = True
        return self.clients.push(CodesChunk(self.request_id, [], final=True, seq=self.sent))

    def close(self) -> None:
        if not self.flushed:
            self.clients.close(self.request_id)

    async def decode(self, chunks: list[list[int]]) -> list[PCMChunk]:
        """Every chunk of a finished LLM stream in order, then the flush (a batch job's call); on a failure the
        decoder's stream is closed and the error raised."""
        try:
            pcm = [await self.push(codes) for codes in chunks]
            pcm.append(await self.flush())
            return pcm
        except BaseException:
            self.flushed = False
            self.close()
            raise


def concatenate(chunks: list[PCMChunk]) -> np.ndarray:
    """The PCM of a request's decoded chunks as one float32 waveform."""
    parts = [np.asarray(c.pcm, dtype=np.float32).reshape(-1) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
