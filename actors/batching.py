"""Micro-batching for stage actors: concurrent calls that arrive while a forward runs share the next one.

Like `serve.batch`, but without a wait window: the first call runs at once (lowest latency when idle),
calls arriving meanwhile queue up and go together into the next forward (throughput under load). A `key`
keeps items with the same key in order and at most one per batch (one chunk per decoder stream).
All forwards run on one worker thread, so the model is never used by two threads at once.
"""
from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class MicroBatcher:
    def __init__(self, fn: Callable[[list], list], max_batch_size: int, executor: ThreadPoolExecutor,
                 key: Callable[[Any], Any] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be >= 1")
        self.fn = fn  # list of items -> list of results (same order), run on the executor thread
        self.max_batch_size = max_batch_size
        self.executor = executor
        self.key = key
        self.pending: collections.deque = collections.deque()  # (item, future)
        self.runner: asyncio.Task | None = None
        self.batches = 0  # forwards run
        self.largest_batch = 0

    async def submit(self, item) -> Any:
        return await self.enqueue(item)

    def enqueue(self, item) -> asyncio.Future:
        """Queue `item` now (items of one key run in the order they were queued); await the returned future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((item, future))
        if self.runner is None or self.runner.done() or self.runner.get_loop() is not loop:
            self.runner = loop.create_task(self._run())
        return future

    def _take_batch(self) -> list:
        batch, keys, keep = [], set(), collections.deque()
        while self.pending and len(batch) < self.max_batch_size:
            item, future = self.pending.popleft()
            if future.cancelled():
                continue
            key = self.key(item) if self.key else None
            if key is not None and key in keys:
                keep.append((item, future))  # same stream already in this batch: next one
                continue
            keys.add(key)
            batch.append((item, future))
        self.pending.extendleft(reversed(keep))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            batch = self._take_batch()
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
                error = None
            except Exception as err:  # a failed forward fails every call in it, never the actor
                results, error = None, err
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            for i, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(results[i])
