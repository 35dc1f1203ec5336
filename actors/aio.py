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
