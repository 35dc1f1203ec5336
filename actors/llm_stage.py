"""LLMStage: chat prompt -> MCTP decoding -> a stream of text deltas and audio chunks, continuously batched.

One engine loop (an asyncio task) owns the `DecodeEngine`. Each turn of the loop it admits new requests,
applies aborts, and runs engine steps over every active request; the events go to per-request bounded
queues that the requests' streaming generators drain. So concurrent requests share decode steps and join
or leave between steps.

Where the steps run (`engine_thread`, default automatic): on a worker thread when steps are slow or wait for
a GPU, so the event loop streams results meanwhile (a GPU wait releases the GIL); inline on the event loop
when steps are short CPU work (a small model on CPU), since such a step holds the GIL anyway and a second
thread only adds GIL hand-offs (measured on the tiny set through Ray: 8 concurrent streams got ~20 % fewer
tokens/s on a thread), while blocking the loop for a few milliseconds delays no item noticeably.

Backpressure: a request whose consumer is `queue_size` items behind is paused (taken out of the batch with
its KV caches) while the others go on; it rejoins once its consumer takes an item. A consumer that takes
nothing for `stall_timeout_s` is aborted (its KV cache is freed).
A consumer that goes away (cancelled generator, explicit `abort`) is aborted at the next step.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pipeline.generate import TokenEvent

from actors.aio import within
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
    full_since: float | None = None  # monotonic time the queue became full (consumer behind)
    token_ids: list[int] = field(default_factory=list)
    audio_sent: bool = False  # an item with an audio chunk went out (the decoder has its first input)
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
                                   max_batch_size=config.max_batch_size, align_steps=config.align_steps)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self.step_s = 0.0  # running average of one engine step's duration (for the automatic engine_thread)
        self.requests: dict[str, _Request] = {}
        self.to_add: list = []  # GenerationRequests admitted at the next step
        self.to_abort: set[str] = set()
        self.wake: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None
        self.loop_error: BaseException | None = None
        self.steps = 0
        self.largest_batch = 0  # most requests that shared one step
        self.busy_s = 0.0  # time spent in engine steps (busy_s / uptime = engine utilisation)
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
        interval, sent = self.config.stream_interval_s, 0
        try:
            while True:
                item = await self._next(state)
                last = time.monotonic()
                # An item waits up to stream_interval_s for more (fewer, larger items: each costs a Ray report
                # beside the decode steps; 8 streams of 256 tokens on the tiny model send ≈8 items each at 50 ms,
                # ≈11 at 20 ms, 20 unmerged; each step +2-4 % of 8-stream tokens/s) unless it is the
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
                self.to_abort.add(request.request_id)
                self.wake.set()

    async def _next(self, state: _Request) -> LLMOutput:
        item = await state.queue.get()
        if state.full_since is not None:  # the consumer caught up: let the engine loop resume the request
            self.wake.set()
        if isinstance(item, BaseException):
            raise item
        return item

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
        return {"steps": self.steps, "largest_batch": self.largest_batch, "active": len(self.requests),
                "busy_s": self.busy_s, "uptime_s": time.time() - self.started_at}

    async def placement(self) -> StagePlacement:
        return describe("llm", self.device, self.dtype)

    async def check_health(self) -> None:
        if self.loop_error is not None:
            raise RuntimeError(f"LLM engine loop failed: {self.loop_error!r}")

    # --- the engine loop -------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self.loop_error is not None:
            raise RuntimeError(f"LLM engine loop failed: {self.loop_error!r}")
        loop = asyncio.get_running_loop()
        if self.loop_task is None or self.loop_task.done() or self.loop_task.get_loop() is not loop:
            # first request, or a new event loop (a plain-class stage driven by successive asyncio.run calls)
            self.wake = asyncio.Event()
            self.loop_task = loop.create_task(self._engine_loop())

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            full = self._full_requests()
            paused = self.engine.paused_ids()
            runnable = self.to_add or self.to_abort or self.engine.has_unfinished() or set(paused) - full
            if not runnable:  # idle, or every request waits for its consumer: sleep until something changes
                self.wake.clear()
                try:
                    await within(self.wake.wait(), 1.0 if paused else None)
                except asyncio.TimeoutError:
                    pass
                continue
            if self.to_add and not self.engine.has_unfinished() and self.config.admission_wait_s > 0:
                await self._wait_for_burst()
            adds, self.to_add = self.to_add, []
            aborts, self.to_abort = self.to_abort, set()
            threaded = self._use_thread()
            try:
                if threaded:
                    events, rejected = await loop.run_in_executor(self.executor, self._step, adds, aborts, full)
                else:
                    events, rejected = self._step(adds, aborts, full)
            except Exception as err:  # the engine is in an unknown state: fail everyone, keep the actor up
                self._fail_all(RequestAborted(f"LLM engine step failed: {err!r}"))
                self.engine.reset()
                continue
            for request_id, err in rejected.items():  # bad request (mode, prompt): fails alone
                state = self.requests.pop(request_id, None)
                if state is not None:
                    state.finished = True
                    state.queue.put_nowait(err)
            self._dispatch(events)
            if not threaded:
                await asyncio.sleep(0)  # the generators take their items before the next inline steps

    async def _wait_for_burst(self) -> None:
        """An idle engine waits until no new request came for `admission_wait_s` (at most 4x that in all), so a
        burst starts in one step, in phase. Ray may deliver the calls of a burst sent within 1 ms over several
        ms; a fixed wait then split it into groups that joined a step or more apart, out of phase."""
        wait = self.config.admission_wait_s
        deadline, seen = time.monotonic() + 4 * wait, 0
        while len(self.to_add) != seen and (left := deadline - time.monotonic()) > 0:
            seen = len(self.to_add)
            await asyncio.sleep(min(wait, left))

    INLINE_STEP_S = 0.004  # automatic engine_thread: steps shorter than this run inline on the event loop
    # longest run of steps between two turns of the event loop: new calls reach `generate()` only in those turns
    # (runs of 40 ms made requests arriving 10 ms apart join ~180 ms late; benchmarks/README.md)
    MAX_RUN_S = 0.01

    def _use_thread(self) -> bool:
        if self.config.engine_thread is not None:
            return self.config.engine_thread
        return self.device.type == "cuda" or self.step_s > self.INLINE_STEP_S

    def _full_requests(self) -> set[str]:
        """Requests whose consumer is `queue_size` items behind (paused); abort those stalled too long."""
        full, now = set(), time.monotonic()
        for request_id, state in list(self.requests.items()):
            if state.finished or state.queue.qsize() < self.config.queue_size:
                state.full_since = None
                continue
            state.full_since = state.full_since or now
            if now - state.full_since > self.config.stall_timeout_s:
                self.requests.pop(request_id, None)
                self.to_abort.add(request_id)
                state.queue.put_nowait(RequestAborted(  # the spare slot: queue_size + 1
                    f"request {request_id!r} aborted: its consumer took nothing for "
                    f"{self.config.stall_timeout_s:g} s (stall_timeout_s)"))
                continue
            full.add(request_id)
        return full

    def _step(self, adds: list, aborts: set[str], full: set[str]) -> tuple[list, dict[str, Exception]]:
        """On the engine thread: pause/resume for backpressure, apply aborts and admissions, then one decode
        step over every active request.

        A paused request (its consumer is behind) leaves the engine's batch with its caches intact and rejoins
        at the front of the queue once its consumer caught up; the others go on meanwhile.
        """
        engine = self.engine
        for request_id in [rid for rid in engine.running_ids() if rid in full]:
            engine.pause(request_id)
        for request_id in [rid for rid in engine.paused_ids() if rid not in full or rid in aborts]:
            engine.resume(request_id)
        for request_id in aborts:
            engine.abort(request_id)
        rejected = {}
        for request in adds:
            if request.request_id not in self.requests:  # cancelled while waiting to be admitted
                continue
            try:
                engine.add_request(request)
            except ValueError as err:
                rejected[request.request_id] = err
        if not engine.has_unfinished():
            return [], rejected
        # Several steps per hand-off: thread switches and consumer wake-ups cost about as much as a step of a
        # small model. Stop early for anything a client waits on (a first token, an audio chunk, an end) or for
        # new work from the event loop, so batching saves time without delaying first text or audio.
        started = time.monotonic()
        events, deadline = [], started + min(self.MAX_RUN_S, self.config.stream_interval_s / 2)
        with torch.inference_mode():
            while engine.has_unfinished():
                batch = engine.next_batch_size()
                t0 = time.monotonic()
                new = engine.step()
                self.step_s += 0.1 * (time.monotonic() - t0 - self.step_s)
                events += new
                self.steps += 1
                self.largest_batch = max(self.largest_batch, batch)
                if self.to_add or self.to_abort or time.monotonic() >= deadline or self._needs_dispatch(new):
                    break
        self.busy_s += time.monotonic() - started
        return events, rejected

    def _needs_dispatch(self, events: list) -> bool:
        """True if a client is waiting for one of these events: an audio chunk, an end, or its first token."""
        for event in events:
            if not isinstance(event, TokenEvent):
                return True
            state = self.requests.get(event.request_id)
            if state is None or not state.token_ids:
                return True
        return False

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

    def _fail_all(self, error: BaseException) -> None:
        for request_id, state in list(self.requests.items()):
            self.requests.pop(request_id, None)
            state.finished = True
            if state.queue.full():
                state.queue.get_nowait()
            state.queue.put_nowait(error)
