"""LLMStage: chat prompt -> MCTP decoding -> a stream of text deltas and audio chunks, continuously batched.

The engine loop (`actors.engine_loop.EngineLoop`, an asyncio task) owns the `DecodeEngine`: it admits new
requests, applies aborts and backpressure, and runs engine steps over every active request; this stage turns
the events into per-request bounded queues that the requests' streaming generators drain (coalescing them
into fewer items). So concurrent requests share decode steps and join or leave between steps.

Backpressure: a request whose consumer is `queue_size` items behind is paused (taken out of the batch with
its KV caches) while the others go on; it rejoins once its consumer takes an item. A consumer that takes
nothing for `stall_timeout_s` is aborted (its KV cache is freed).
A consumer that goes away (cancelled generator, explicit `abort`) is aborted at the next step.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from actors.aio import within
from actors.config import LLMStageConfig
from actors.engine_loop import EngineLoop
from actors.payloads import (
    LLMOutput,
    SpeechRequest,
    TextDetokenizer,
    build_prompt,
    engine_events_to_output,
    merge_outputs,
    random_weights,
    to_generation_request,
)
from actors.placement import StagePlacement, describe


class RequestAborted(RuntimeError):
    """The engine dropped a request (stalled consumer, engine failure); the message says why."""


class EngineStepFailed(RequestAborted):
    """An engine step failed (out of memory, ...) and every request in it was dropped: the request may not be
    the cause, and run alone it may succeed (the batch job retries such rows one at a time)."""


@dataclass
class _Request:
    request_id: str
    queue: asyncio.Queue  # LLMOutput items; one spare slot beyond queue_size for a terminal error
    detok: TextDetokenizer
    full_since: float | None = None  # monotonic time the queue became full (consumer behind)
    token_ids: list[int] = field(default_factory=list)
    audio_sent: bool = False  # an item with an audio chunk went out (the decoder has its first input)
    finished: bool = False


class LLMStage:
    ABORT_WAIT_S = 1.0  # longest `abort` waits for the engine to free the request's caches

    def __init__(self, config: LLMStageConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """A plain class that never imports ray: the caller picks `device` and `dtype` (`actors.builder` on Ray)."""
        from pipeline.capacity import engine_batch_size
        from pipeline.engine.decode_engine import DecodeEngine
        from pipeline.llm import load_llm
        from pipeline.tokens.vocab import TokenLayout, load_tokenizer

        self.config = config
        if config.resources.torch_threads:
            torch.set_num_threads(config.resources.torch_threads)
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer = load_tokenizer(config.path)
        self.random_weights = random_weights(config.path)  # resolves each request's layout "auto"
        self.layout = TokenLayout.from_tokenizer(self.tokenizer)
        model = load_llm(config.path, device=self.device, dtype=self.dtype)
        self.engine = DecodeEngine(model, layout=self.layout, device=self.device, dtype=self.dtype,
                                   max_batch_size=engine_batch_size(model, config.max_batch_size, self.device,
                                                                    self.dtype), align_steps=config.align_steps)
        self.requests: dict[str, _Request] = {}
        self.loop = EngineLoop(self.engine, config, self.device, hooks=self)
        self.started_at = time.time()

    steps = property(lambda self: self.loop.steps)
    largest_batch = property(lambda self: self.loop.largest_batch)  # most requests that shared one step
    busy_s = property(lambda self: self.loop.busy_s)  # time in engine steps (busy_s / uptime = utilisation)

    # --- the public (remote) methods ------------------------------------------------------------------
    async def generate(self, request: SpeechRequest):
        """Stream LLMOutput items for one request; the last one carries `end` (reason, usage, all ids)."""
        if not isinstance(request, SpeechRequest):
            raise ValueError(f"request must be a SpeechRequest, got {type(request).__name__}")
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r} is already running")
        self.loop.ensure_running()
        prompt_ids = build_prompt(request, self.tokenizer, self.layout)
        state = _Request(request.request_id, asyncio.Queue(self.config.queue_size + 1), TextDetokenizer(self.tokenizer))
        self.requests[request.request_id] = state
        self.loop.submit(to_generation_request(request, prompt_ids, self.random_weights))
        interval, sent = self.config.stream_interval_s, 0
        try:
            while True:
                item = await self._next(state)
                last = time.monotonic()
                # An item waits up to stream_interval_s for more (fewer, larger items: each costs a Ray report
                # beside the decode steps; benchmarks/pipeline.md) unless it is the
                # stream's first item, carries its first audio chunk or ends it (the client's first text, the
                # decoder's first input). Later audio chunks can wait: the decoder is busy with the earlier ones.
                first_audio = bool(item.audio_chunks) and not state.audio_sent
                while (sent and not first_audio and item.end is None
                       and (wait := last + interval - time.monotonic()) > 0):
                    try:
                        item = merge_outputs(item, await within(self._next(state), wait))
                    except asyncio.TimeoutError:
                        break
                    first_audio = bool(item.audio_chunks) and not state.audio_sent
                while item.end is None and not state.queue.empty():  # behind: send what piled up as one item
                    item = merge_outputs(item, await self._next(state))
                state.audio_sent = state.audio_sent or bool(item.audio_chunks)
                yield item
                sent += 1
                if item.end is not None:
                    return
        finally:  # normal end, consumer gone (cancellation) or error: free the engine's state
            self.requests.pop(request.request_id, None)
            if not state.finished:
                self.loop.abort(request.request_id)

    async def _next(self, state: _Request) -> LLMOutput:
        item = await state.queue.get()
        if state.full_since is not None:  # the consumer caught up: let the engine loop resume the request
            self.loop.notify()
        if isinstance(item, BaseException):
            raise item
        return item

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV cache; True if it was running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        if not state.queue.full():
            state.queue.put_nowait(RequestAborted(f"request {request_id!r} was aborted"))
        done = self.loop.abort(request_id)
        if self.loop.task is not None and not self.loop.task.done():
            try:  # returns once the engine freed the request's caches (within one run of steps)
                await within(done.wait(), self.ABORT_WAIT_S)
            except TimeoutError:
                pass
        return True

    async def stats(self) -> dict:
        return {"steps": self.steps, "largest_batch": self.largest_batch, "active": len(self.requests),
                "busy_s": self.busy_s, "uptime_s": time.time() - self.started_at}

    async def placement(self) -> StagePlacement:
        return describe("llm", self.device, self.dtype)

    async def check_health(self) -> None:
        if self.loop.error is not None:
            raise RuntimeError(f"LLM engine loop failed: {self.loop.error!r}")

    # --- the hooks of the engine loop (actors.engine_loop.StageHooks) ----------------------------------
    def full_requests(self) -> set[str]:
        """Requests whose consumer is `queue_size` items behind (paused); abort those stalled too long."""
        full, now = set(), time.monotonic()
        for request_id, state in list(self.requests.items()):
            if state.finished or state.queue.qsize() < self.config.queue_size:
                state.full_since = None
                continue
            state.full_since = state.full_since or now
            if now - state.full_since > self.config.stall_timeout_s:
                self.requests.pop(request_id, None)
                self.loop.abort(request_id)
                state.queue.put_nowait(RequestAborted(  # the spare slot: queue_size + 1
                    f"request {request_id!r} aborted: its consumer took nothing for "
                    f"{self.config.stall_timeout_s:g} s (stall_timeout_s)"))
                continue
            full.add(request_id)
        return full

    def is_live(self, request_id: str) -> bool:
        return request_id in self.requests

    def awaits_first_token(self, request_id: str) -> bool:
        state = self.requests.get(request_id)
        return state is None or not state.token_ids

    def dispatch(self, events: list) -> None:
        by_request: dict[str, list] = {}
        for event in events:
            by_request.setdefault(event.request_id, []).append(event)
        for request_id, request_events in by_request.items():
            state = self.requests.get(request_id)
            if state is None:  # aborted meanwhile; the engine drops it at the next step
                continue
            output: LLMOutput = engine_events_to_output(request_id, request_events, self.layout, state.detok,
                                                        state.token_ids)
            if output.end is not None:
                state.finished = True
            if output.text or output.text_ids or output.audio_chunks or output.end is not None:  # ids whose text is not printable yet too
                state.queue.put_nowait(output)

    def reject(self, request_id: str, error: Exception) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            state.finished = True
            state.queue.put_nowait(error)

    def fail_all(self, error: Exception) -> None:
        error = EngineStepFailed(f"LLM engine step failed: {error!r}")
        for request_id, state in list(self.requests.items()):
            self.requests.pop(request_id, None)
            state.finished = True
            if state.queue.full():
                state.queue.get_nowait()
            state.queue.put_nowait(error)
