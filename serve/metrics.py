"""Prometheus metrics of the speech endpoint (Ray Serve's metrics API, exported by each node's metrics agent
with a `ray_` prefix): time to first audio, audio real-time factor, tokens/s and request outcomes per route
(`observed`, which the ingress wraps every request's event stream in), and per-stage queue time and in-flight
calls (`stage_queued` / `stage_in_flight`, recorded by serve.deployments.ServeStageClients). Measurement
stays out of the data path: these functions only look at what passes.

    vita_time_to_first_audio_seconds{route}   histogram   request start -> first PCM chunk
    vita_audio_rtf{route}                     histogram   request wall time / seconds of audio produced
    vita_tokens_per_second{route}             histogram   output tokens / request wall time
    vita_output_tokens_total{route}           counter
    vita_requests_total{route,outcome}        counter     outcome: ok | error | cancelled
    vita_stage_queue_seconds{stage}           histogram   call -> a replica of the stage took it
    vita_stage_in_flight{stage}               gauge       calls to the stage not yet answered
"""
from __future__ import annotations

import functools
import time
from typing import AsyncIterator

from actors.payloads import AudioChunk, Done, ErrorEvent

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RATIOS = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 10.0]
RATES = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]


@functools.cache
def _metrics() -> dict:
    """Created once per process, on first use (inside a replica they get its deployment/replica tags)."""
    from ray.serve.metrics import Counter, Gauge, Histogram

    return {
        "ttfa": Histogram("vita_time_to_first_audio_seconds", "request start to its first audio chunk",
                          boundaries=SECONDS, tag_keys=("route",)),
        "rtf": Histogram("vita_audio_rtf", "request wall time per second of audio produced (< 1: faster than "
                         "real time)", boundaries=RATIOS, tag_keys=("route",)),
        "tps": Histogram("vita_tokens_per_second", "output tokens per second of request wall time",
                         boundaries=RATES, tag_keys=("route",)),
        "tokens": Counter("vita_output_tokens", "output tokens (text + audio)", tag_keys=("route",)),
        "requests": Counter("vita_requests", "finished requests by outcome", tag_keys=("route", "outcome")),
        "queue": Histogram("vita_stage_queue_seconds", "a stage call waiting until a replica of the stage took it",
                           boundaries=SECONDS, tag_keys=("stage",)),
        "in_flight": Gauge("vita_stage_in_flight", "stage calls not yet answered", tag_keys=("stage",)),
    }


def stage_queued(stage: str, seconds: float) -> None:
    _metrics()["queue"].observe(seconds, tags={"stage": stage})


def stage_in_flight(stage: str, calls: int) -> None:
    _metrics()["in_flight"].set(calls, tags={"stage": stage})


async def observed(route: str, events: AsyncIterator) -> AsyncIterator:
    """Pass `events` through unchanged while recording the request's metrics under `route`."""
    m, tags = _metrics(), {"route": route}
    start = time.perf_counter()
    audio_s, first_audio, outcome = 0.0, None, "cancelled"  # a consumer that stops early: cancelled
    try:
        async for event in events:
            if isinstance(event, AudioChunk) and len(event.pcm):
                if first_audio is None:
                    first_audio = time.perf_counter() - start
                    m["ttfa"].observe(first_audio, tags=tags)
                audio_s += len(event.pcm) / event.sample_rate
            elif isinstance(event, Done):
                outcome = "ok"
                _finished(m, tags, event, time.perf_counter() - start, audio_s)
            elif isinstance(event, ErrorEvent):
                outcome = "error"
            yield event
    except Exception:
        outcome = "error"
        raise
    finally:
        m["requests"].inc(1, tags={**tags, "outcome": outcome})


def _finished(m: dict, tags: dict, done: Done, wall_s: float, audio_s: float) -> None:
    tokens = len(done.token_ids) or done.usage.get("llm", {}).get("completion_tokens", 0)
    if tokens:
        m["tokens"].inc(tokens, tags=tags)
        m["tps"].observe(tokens / max(wall_s, 1e-9), tags=tags)
    if audio_s > 0:
        m["rtf"].observe(wall_s / audio_s, tags=tags)
