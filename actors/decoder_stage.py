"""DecoderStage: audio codes -> 22.05 kHz PCM, one incremental stream per request, concurrent chunks batched.

Each request's chunks arrive in order (`push`; calls in flight may be reordered, `seq` restores the order); the
stage keeps that request's decoder stream (its flow-matching / vocoder state) until the final chunk, `close`, or
`idle_timeout_s` without a push. A stream starts on chunk 0, which every sender awaits before sending the rest: a
later chunk without its stream fails at once (the stream was lost), and one whose earlier chunk never comes fails
after `chunk_wait_s`.
Chunks of different requests that arrive while a forward runs go together into the next
`decode_batch` call (one forward for all of them).
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.aio import within
from actors.batching import MicroBatcher
from actors.config import DecoderStageConfig
from actors.payloads import CodesChunk, PCMChunk
from actors.placement import StagePlacement, describe


@dataclass
class _Stream:
    stream: object  # pipeline.decoder DecoderStream
    last_used: float
    forwards: int = 0
    next_seq: int = 0  # the chunk this stream takes next (CodesChunk.seq)
    closed: bool = False  # `close` was called: chunks still waiting for their turn give up
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)


class DecoderStage:
    def __init__(self, config: DecoderStageConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        """A plain class that never imports ray: the caller picks `device` and `dtype` (`actors.builder` on Ray)."""
        from pipeline.decoder.speech_decoder import load_decoder

        self.config = config
        if config.resources.torch_threads:
            torch.set_num_threads(config.resources.torch_threads)
        self.device, self.dtype = torch.device(device), dtype
        self.decoder = load_decoder(config.path, device=self.device, dtype=self.dtype)
        self.sample_rate = self.decoder.sample_rate
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        self.batcher = MicroBatcher(self._decode_batch, config.max_batch_size, self.executor, key=lambda item: item[0])
        self.streams: dict[str, _Stream] = {}
        self.closed: dict[str, float] = {}  # request id -> when it was closed (late pushes must not reopen it)
        self.started_at = time.time()
        self.streams_opened = 0

    def _decode_batch(self, items: list[tuple[str, _Stream, list[int], bool]]) -> list[tuple[np.ndarray, float]]:
        start = time.perf_counter()
        with torch.inference_mode():
            if len(items) == 1:  # nothing to share a forward with: the stream's own push (same result)
                _, state, codes, final = items[0]
                pcms = [state.stream.push(codes, final)]
            else:
                pcms = self.decoder.decode_batch([(s.stream, codes, final) for _, s, codes, final in items])
        seconds = time.perf_counter() - start
        return [(pcm, seconds) for pcm in pcms]

    async def push(self, chunk: CodesChunk) -> PCMChunk:
        """PCM for the next chunk of a request's codes (`final` also flushes the tail and frees the stream)."""
        if not isinstance(chunk, CodesChunk):
            raise ValueError(f"chunk must be a CodesChunk, got {type(chunk).__name__}")
        self._drop_idle()
        state = self.streams.get(chunk.request_id)
        if state is None and chunk.request_id in self.closed:
            # Ray does not keep call order: a chunk sent before `close` may arrive after it
            raise ValueError(f"request {chunk.request_id!r} was closed; chunk {chunk.seq} is dropped")
        if state is None and chunk.seq > 0:
            # every sender waits for a stream's first chunk before it sends the next (actors.orchestration), so the
            # stream was here and is gone: the replica holding it was replaced, or the stream failed or idled out
            raise ValueError(f"request {chunk.request_id!r}: chunk {chunk.seq} reached a decoder replica without its "
                             "stream; the stream was lost (the replica holding it was replaced, or it failed)")
        if state is None:
            stream = self.decoder.stream(kind=self.config.stream_kind, n_steps=self.config.n_steps, seed=self.config.seed)
            state = self.streams[chunk.request_id] = _Stream(stream, time.monotonic())
            self.streams_opened += 1
        state.last_used = time.monotonic()
        try:
            async with state.turn:  # chunks may arrive out of order: queue them by seq
                await self._wait_turn(state, chunk)
                if state.closed:
                    raise ValueError(f"request {chunk.request_id!r} was closed; chunk {chunk.seq} is dropped")
                result = self.batcher.enqueue((chunk.request_id, state, list(chunk.codes), chunk.final))
                state.next_seq += 1
                state.turn.notify_all()
            pcm, seconds = await result
        except BaseException:
            self.streams.pop(chunk.request_id, None)  # a failed stream cannot continue
            raise
        state.forwards += 1
        if chunk.final:
            self.streams.pop(chunk.request_id, None)
        return PCMChunk(chunk.request_id, np.asarray(pcm, dtype=np.float32).reshape(-1), self.sample_rate, state.forwards,
                        seconds)

    async def _wait_turn(self, state: _Stream, chunk: CodesChunk) -> None:
        """Wait until the stream's earlier chunks were taken. They arrive within moments: Ray only reorders calls
        in flight, and a sender whose calls can be refused at capacity or queued (Ray Serve) sends a chunk only once
        the one before was accepted (`actors.orchestration.ChunkGate`), so no capacity refusal or queue starts this
        clock. One that never comes means the stream is lost (the replica holding it was replaced, or its chunks
        were routed elsewhere), and the request fails now instead of at the caller's stage timeout."""
        try:
            await within(state.turn.wait_for(lambda: state.closed or state.next_seq == chunk.seq),
                         self.config.chunk_wait_s)
        except TimeoutError:
            raise ValueError(f"request {chunk.request_id!r}: chunk {chunk.seq} waited {self.config.chunk_wait_s:g} s "
                             f"for chunk {state.next_seq} on this decoder replica; its stream was lost (the replica "
                             "holding it was replaced)") from None

    async def decode(self, codes: list[int]) -> np.ndarray:
        """Whole-utterance decode (no streaming state)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._decode_whole, list(codes))

    def _decode_whole(self, codes: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return self.decoder.decode(codes, n_steps=self.config.n_steps, seed=self.config.seed)

    async def close(self, request_id: str) -> bool:
        """Free a request's stream (a consumer that stopped early); True if it existed. Chunks of the request
        that arrive later are refused instead of opening a new stream."""
        self.closed[request_id] = time.monotonic()
        state = self.streams.pop(request_id, None)
        if state is None:
            return False
        async with state.turn:
            state.closed = True
            state.turn.notify_all()
        return True

    async def stats(self) -> dict:
        return {"forwards": self.batcher.batches, "largest_batch": self.batcher.largest_batch,
                "open_streams": len(self.streams), "streams_opened": self.streams_opened, "pid": os.getpid()}

    async def placement(self) -> StagePlacement:
        return describe("decoder", self.device, self.dtype)

    async def check_health(self) -> None:
        if self.executor._shutdown:
            raise RuntimeError("decoder stage executor is shut down")

    def _drop_idle(self) -> None:
        now = time.monotonic()
        for request_id, closed_at in list(self.closed.items()):
            if now - closed_at > self.config.idle_timeout_s:
                del self.closed[request_id]
        for request_id, state in list(self.streams.items()):
            if now - state.last_used > self.config.idle_timeout_s:
                self.streams.pop(request_id, None)
