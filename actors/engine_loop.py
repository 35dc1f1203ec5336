"""EngineLoop: the asyncio task that owns a `DecodeEngine` and steps it for a stage's requests.

Each turn it admits new requests (an idle engine first waits for the rest of a burst), applies aborts and
backpressure (pause / resume), and runs a run of engine steps; the events go back to the stage
(`StageHooks.dispatch`), which turns them into per-request stream items.

Where the steps run (`engine_thread`, default automatic): on a worker thread when steps are slow or wait for
a GPU, so the event loop streams results meanwhile (a GPU wait releases the GIL); inline on the event loop
when steps are short CPU work (a small model on CPU), since such a step holds the GIL anyway and a second
thread only adds GIL hand-offs (benchmarks/pipeline.md), while blocking the loop for a few milliseconds
delays no item noticeably.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from pipeline.engine.requests import GenerationRequest, TokenEvent

from actors.aio import within
from actors.config import LLMStageConfig


class StageHooks(Protocol):
    """What the loop asks of the stage that owns it (called on the event loop, `awaits_first_token` also
    from the engine thread)."""

    def full_requests(self) -> set[str]:
        """Requests whose consumer is behind: paused until it catches up."""

    def is_live(self, request_id: str) -> bool:
        """False once the request's consumer went away (it is then not admitted)."""

    def awaits_first_token(self, request_id: str) -> bool:
        """True while a request has no token yet (its first one ends a run of steps)."""

    def dispatch(self, events: list) -> None:
        """Hand one run's engine events to the requests."""

    def reject(self, request_id: str, error: Exception) -> None:
        """A request the engine refused (bad mode, prompt): it fails alone."""

    def fail_all(self, error: Exception) -> None:
        """The engine failed a step (`error`): every request fails; the loop then resets the engine."""


class EngineLoop:
    INLINE_STEP_S = 0.004  # automatic engine_thread: steps shorter than this run inline on the event loop
    # longest run of steps between two turns of the event loop: new calls reach `generate()` only in those turns
    # (longer runs make requests arriving a few ms apart join many steps late; benchmarks/README.md)
    MAX_RUN_S = 0.01

    def __init__(self, engine, config: LLMStageConfig, device: torch.device, hooks: StageHooks):
        self.engine, self.config, self.device, self.hooks = engine, config, device, hooks
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self.step_s = 0.0  # running average of one engine step's duration (for the automatic engine_thread)
        self.to_add: list[GenerationRequest] = []  # admitted at the next step
        self.to_abort: set[str] = set()
        self.aborted: dict[str, asyncio.Event] = {}  # set once the engine dropped the request (caches freed)
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.error: BaseException | None = None
        self.steps = 0
        self.largest_batch = 0  # most requests that shared one step
        self.busy_s = 0.0  # time spent in engine steps (busy_s / uptime = engine utilisation)

    # --- what the stage calls ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        self.ensure_running()
        self.to_add.append(request)
        self.wake.set()

    def abort(self, request_id: str) -> asyncio.Event:
        """Ask the engine to drop a request; the event is set once it did (its KV cache is free)."""
        self.to_abort.add(request_id)
        done = self.aborted.setdefault(request_id, asyncio.Event())
        self.notify()
        return done

    def notify(self) -> None:
        """Something changed (a consumer took an item, a request went away): look again."""
        if self.wake is not None:
            self.wake.set()

    def ensure_running(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"LLM engine loop failed: {self.error!r}")
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            # first request, or a new event loop (a plain-class stage driven by successive asyncio.run calls)
            self.wake = asyncio.Event()
            self.task = loop.create_task(self.run())

    # --- the loop ----------------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            full = self.hooks.full_requests()
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
            threaded = self.use_thread()
            try:
                if threaded:
                    events, rejected = await loop.run_in_executor(self.executor, self.step, adds, aborts, full)
                else:
                    events, rejected = self.step(adds, aborts, full)
            except Exception as err:  # the engine is in an unknown state: fail everyone, keep the actor up
                self.hooks.fail_all(err)
                self.engine.reset()
                self._aborts_done(aborts)
                continue
            self._aborts_done(aborts)
            for request_id, err in rejected.items():
                self.hooks.reject(request_id, err)
            self.hooks.dispatch(events)
            if not threaded:
                await asyncio.sleep(0)  # the generators take their items before the next inline steps

    def _aborts_done(self, aborts: set[str]) -> None:
        for request_id in aborts:
            done = self.aborted.pop(request_id, None)
            if done is not None:
                done.set()

    async def _wait_for_burst(self) -> None:
        """An idle engine waits until no new request came for `admission_wait_s` (at most 4x that in all), so a
        burst starts in one step, in phase. Ray may deliver the calls of a burst sent within 1 ms over several
        ms; a fixed wait then split it into groups that joined a step or more apart, out of phase."""
        wait = self.config.admission_wait_s
        deadline, seen = time.monotonic() + 4 * wait, 0
        while len(self.to_add) != seen and (left := deadline - time.monotonic()) > 0:
            seen = len(self.to_add)
            await asyncio.sleep(min(wait, left))

    def use_thread(self) -> bool:
        if self.config.engine_thread is not None:
            return self.config.engine_thread
        return self.device.type == "cuda" or self.step_s > self.INLINE_STEP_S

    def step(self, adds: list, aborts: set[str], full: set[str]) -> tuple[list, dict[str, Exception]]:
        """Pause/resume for backpressure, apply aborts and admissions, then a run of decode steps over every
        active request (on the engine thread or inline).

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
            if not self.hooks.is_live(request.request_id):  # cancelled while waiting to be admitted
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
            if self.hooks.awaits_first_token(event.request_id):
                return True
        return False
