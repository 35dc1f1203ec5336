"""LLMStage: chat prompt -> MCTP decoding -> a stream of text deltas and audio chunks, continuously batched.

One engine loop (an asyncio task) owns the `DecodeEngine`. Each turn of the loop it admits new requests,
applies aborts, and runs one `engine.step()` over every active request on a worker thread; the events
go to per-request bounded queues that the requests' streaming generators drain. So concurrent requests
share decode steps and join or leave between steps.

Backpressure: before a step the loop waits until every active request's queue has room. A consumer that
takes nothing for `stall_timeout_s` is aborted (its KV cache is freed) so it cannot stall the batch forever.
A consumer that goes away (cancelled generator, explicit `abort`) is aborted at the next step.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from actors.config import LLMStageConfig
from actors.payloads import (
    LLMOutput,
    SpeechRequest,
    TextDetokenizer,
    build_prompt,
    engine_events_to_output,
    merge_outputs,
    to_generation_request,
)
from actors.placement import StagePlacement, describe, stage_device


class RequestAborted(RuntimeError):
    """The engine dropped a request (stalled consumer, engine failure); the message says why."""


@dataclass
class _Request:
    request_id: str
    queue: asyncio.Queue  # LLMOutput items; one spare slot beyond queue_size for a terminal error
    detok: TextDetokenizer
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set when the consumer took an item
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


class LLMStage:
    def __init__(self, config: LLMStageConfig):
        from pipeline.generate import DecodeEngine
        from pipeline.llm import load_llm
        from pipeline.tokens import TokenLayout, load_tokenizer

        self.config = config
        if config.resources.torch_threads:
            torch.set_num_threads(config.resources.torch_threads)
        self.device, self.dtype = stage_device()
        self.tokenizer = load_tokenizer(config.path)
        self.layout = TokenLayout.from_tokenizer(self.tokenizer)
        model = load_llm(config.path, device=self.device, dtype=self.dtype)
        self.engine = DecodeEngine(model, layout=self.layout, device=self.device, dtype=self.dtype,
                                   max_batch_size=config.max_batch_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self.requests: dict[str, _Request] = {}
        self.to_add: list = []  # GenerationRequests admitted at the next step
        self.to_abort: set[str] = set()
        self.wake: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None
        self.loop_error: BaseException | None = None
        self.steps = 0
        self.largest_batch = 0  # most requests that shared one step
        self.started_at = time.time()

    # --- the public (remote) methods ------------------------------------------------------------------
    async def generate(self, request: SpeechRequest):
        """Stream LLMOutput items for one request; the last one carries `end` (reason, usage, all ids)."""
        if not isinstance(request, SpeechRequest):
            raise ValueError(f"request must be a SpeechRequest, got {type(request).__name__}")
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r} is already running")
        self._ensure_loop()
        prompt_ids = build_prompt(request, self.tokenizer, self.layout)
        state = _Request(request.request_id, asyncio.Queue(self.config.queue_size + 1), TextDetokenizer(self.tokenizer))
        self.requests[request.request_id] = state
        self.to_add.append(to_generation_request(request, prompt_ids))
        self.wake.set()
        try:
            while True:
                item = await state.queue.get()
                state.room.set()
                if isinstance(item, BaseException):
                    raise item
                while item.end is None and not state.queue.empty():  # behind: send what piled up as one item
                    more = state.queue.get_nowait()
                    if isinstance(more, BaseException):
                        raise more
                    item = merge_outputs(item, more)
                yield item
                if item.end is not None:
                    return
        finally:  # normal end, consumer gone (cancellation) or error: free the engine's state
            self.requests.pop(request.request_id, None)
            if not state.finished:
                self.to_abort.add(request.request_id)
                self.wake.set()

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV cache; True if it was running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self.to_abort.add(request_id)
        if not state.queue.full():
            state.queue.put_nowait(RequestAborted(f"request {request_id!r} was aborted"))
        self.wake.set()
        return True

    async def stats(self) -> dict:
        return {"steps": self.steps, "largest_batch": self.largest_batch, "active": len(self.requests)}

    async def placement(self) -> StagePlacement:
        return describe("llm", self.device, self.dtype)

    async def check_health(self) -> None:
        if self.loop_error is not None:
            raise RuntimeError(f"LLM engine loop failed: {self.loop_error!r}")

    # --- the engine loop -------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self.loop_error is not None:
            raise RuntimeError(f"LLM engine loop failed: {self.loop_error!r}")
        if self.wake is None:
            self.wake = asyncio.Event()
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._engine_loop())

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.to_add and not self.to_abort and not self.engine.has_unfinished():
                self.wake.clear()
                await self.wake.wait()
                continue
            await self._wait_for_room()
            adds, self.to_add = self.to_add, []
            aborts, self.to_abort = self.to_abort, set()
            try:
                events, rejected = await loop.run_in_executor(self.executor, self._step, adds, aborts)
            except Exception as err:  # the engine is in an unknown state: fail everyone, keep the actor up
                self._fail_all(RequestAborted(f"LLM engine step failed: {err!r}"))
                self.engine = self._reset_engine()
                continue
            for request_id, err in rejected.items():  # bad request (mode, prompt): fails alone
                state = self.requests.pop(request_id, None)
                if state is not None:
                    state.finished = True
                    state.queue.put_nowait(err)
            self._dispatch(events)

    def _step(self, adds: list, aborts: set[str]) -> tuple[list, dict[str, Exception]]:
        """On the engine thread: apply aborts and admissions, then one decode step over all active requests."""
        for request_id in aborts:
            self.engine.abort(request_id)
        rejected = {}
        for request in adds:
            if request.request_id not in self.requests:  # cancelled while waiting to be admitted
                continue
            try:
                self.engine.add_request(request)
            except ValueError as err:
                rejected[request.request_id] = err
        if not self.engine.has_unfinished():
            return [], rejected
        batch = min(len(self.engine.active) + len(self.engine.waiting), self.engine.max_batch_size)
        with torch.inference_mode():
            events = self.engine.step()
        self.steps += 1
        self.largest_batch = max(self.largest_batch, batch)
        return events, rejected

    def _dispatch(self, events: list) -> None:
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
            if output.text or output.audio_chunks or output.end is not None:
                state.queue.put_nowait(output)
                state.room.clear()

    async def _wait_for_room(self) -> None:
        """Backpressure: wait until every active request can take one more item; abort stalled consumers."""
        for state in list(self.requests.values()):
            if state.finished or state.queue.qsize() < self.config.queue_size:
                continue
            state.room.clear()
            try:
                await asyncio.wait_for(state.room.wait(), timeout=self.config.stall_timeout_s)
            except asyncio.TimeoutError:
                if self.requests.pop(state.request_id, None) is not None:
                    self.to_abort.add(state.request_id)
                    state.queue.put_nowait(RequestAborted(
                        f"request {state.request_id!r} aborted: its consumer took nothing for "
                        f"{self.config.stall_timeout_s:g} s (stall_timeout_s)"))

    def _fail_all(self, error: BaseException) -> None:
        for request_id, state in list(self.requests.items()):
            self.requests.pop(request_id, None)
            state.finished = True
            if state.queue.full():
                state.queue.get_nowait()
            state.queue.put_nowait(error)

    def _reset_engine(self):
        from pipeline.generate import DecodeEngine

        engine = self.engine
        return DecodeEngine(engine.model, layout=self.layout, device=self.device, dtype=self.dtype,
                            max_batch_size=self.config.max_batch_size)
