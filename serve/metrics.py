"""Prometheus metrics of the speech endpoint (Ray Serve's metrics API): time to first audio, audio real-time
factor, tokens/s, per-stage queue time and in-flight requests. The ingress wraps every request's event
stream in `observed`, so measurement stays out of the data path.
"""
from __future__ import annotations

from typing import AsyncIterator


async def observed(route: str, events: AsyncIterator) -> AsyncIterator:
    """Pass `events` through unchanged while recording the request's metrics (filled in by the metrics work)."""
    async for event in events:
        yield event
