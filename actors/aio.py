"""Async helpers shared by the stages and the pipeline driver."""
from __future__ import annotations

import asyncio


async def within(awaitable, seconds: float | None):
    """Await with a deadline (raises TimeoutError).

    Used instead of `asyncio.wait_for`, which on Python 3.11 can swallow a cancellation when the awaited
    thing completes at the same moment, leaving a loop that was told to stop running forever.
    """
    async with asyncio.timeout(seconds):
        return await awaitable


class LoopThread:
    """An event loop on a daemon thread: the sync API of a pipeline is a thin bridge over its async one."""

    def __init__(self, name: str):
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def iterate(self, agen):
        """Drive an async generator on the loop; closing the returned iterator closes the generator."""
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(agen.__anext__(), self.loop).result()
                except StopAsyncIteration:
                    return
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), self.loop).result(timeout=30)

    def stop(self) -> None:
        """Cancel what still runs on the loop (e.g. a stage's engine task), then stop it."""

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(timeout=5)
            except Exception:  # a task that would not end in time: stop the loop anyway
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
