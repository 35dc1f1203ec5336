"""Prometheus metrics of the speech endpoint (Ray Serve's metrics API, exported by each node's metrics agent
with a `ray_` prefix): time to first audio, audio real-time factor, tokens/s and request outcomes per route
(`observed`, which the ingress wraps every request's event stream in), and per-stage queue time and in-flight
calls (`stage_queued` / `stage_in_flight`, recorded by serve.deployments.ServeStageClients). Measurement
stays out of the data path: these functions only look at what passes.

Streamed responses also get the client's view of playback (`StreamClock`): each audio chunk is timed when the
ingress hands it to the response body, and a client that starts playing at the first chunk and plays at real
time would have waited (underrun) whenever a chunk came after the audio before it had finished playing.
Serve adds the `deployment` and `replica` tags to every series, so each is per stage and per replica.

    vita_time_to_first_audio_seconds{route}   histogram   request start -> first PCM chunk
    vita_audio_rtf{route}                     histogram   request wall time / seconds of audio produced
    vita_tokens_per_second{route}             histogram   output tokens / request wall time
    vita_output_tokens_total{route}           counter
    vita_requests_total{route,outcome}        counter     outcome: ok | error | cancelled
    vita_stage_queue_seconds{stage}           histogram   call -> a replica of the stage took it
    vita_stage_in_flight{stage}               gauge       calls to the stage not yet answered
    vita_audio_chunk_interval_seconds{route}  histogram   streamed: gap between consecutive audio chunks
    vita_playback_underrun_seconds{route}     histogram   streamed: seconds a real-time player waited, per stream
    vita_audio_streams_total{route,continuous} counter    streamed: continuous = no stall above CONTINUITY_S
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from actors.payloads import AudioChunk, Done, ErrorEvent

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RATIOS = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 10.0]
RATES = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]
UNDERRUN = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
CONTINUITY_S = 0.1  # a stall a listener notices (a typical jitter buffer holds about this much)


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
        "interval": Histogram("vita_audio_chunk_interval_seconds", "streamed audio: time between consecutive chunks "
                              "handed to the client", boundaries=SECONDS, tag_keys=("route",)),
        "underrun": Histogram("vita_playback_underrun_seconds", "streamed audio: seconds a client playing from the "
                              "first chunk at real time would have waited, per stream", boundaries=UNDERRUN,
                              tag_keys=("route",)),
        "streams": Counter("vita_audio_streams", f"finished audio streams; continuous: no stall over {CONTINUITY_S} s",
                           tag_keys=("route", "continuous")),
    }


@dataclass
class StreamClock:
    """A real-time player of one audio stream, fed each chunk's seconds as the chunk is handed to the client.

    The player starts at the first chunk; whenever a chunk arrives after the audio before it has finished
    playing, it waits for the difference (a stall). `underrun_s` is the sum of the stalls, `max_stall_s` the
    longest. `streaming` is set for responses the client receives as they are made (serve.http.streamed); a
    body sent whole at the end has no playback to starve."""

    streaming: bool = False
    audio_s: float = 0.0
    underrun_s: float = 0.0
    max_stall_s: float = 0.0
    intervals: list[float] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    playing_until: float = 0.0  # when the audio received so far finishes playing

    def chunk(self, seconds: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first_at is None:
            self.first_at = self.playing_until = now
        else:
            self.intervals.append(now - self.last_at)
        stall = max(0.0, now - self.playing_until)
        self.underrun_s += stall
        self.max_stall_s = max(self.max_stall_s, stall)
        self.playing_until = max(self.playing_until, now) + seconds
        self.last_at = now
        self.audio_s += seconds

    @property
    def continuous(self) -> bool:
        return self.max_stall_s <= CONTINUITY_S


def stage_queued(stage: str, seconds: float) -> None:
    _metrics()["queue"].observe(seconds, tags={"stage": stage})


def stage_in_flight(stage: str, calls: int) -> None:
    _metrics()["in_flight"].set(calls, tags={"stage": stage})


async def observed(route: str, events: AsyncIterator, clock: StreamClock | None = None) -> AsyncIterator:
    """Pass `events` through unchanged while recording the request's metrics under `route` (and, when `clock` is
    marked streaming, its playback: chunk intervals, underrun, continuity)."""
    m, tags = _metrics(), {"route": route}
    clock = clock or StreamClock()
    start = time.perf_counter()
    audio_s, first_audio, outcome = 0.0, None, "cancelled"  # a consumer that stops early: cancelled
    try:
        async for event in events:
            if isinstance(event, AudioChunk) and len(event.pcm):
                if first_audio is None:
                    first_audio = time.perf_counter() - start
                    m["ttfa"].observe(first_audio, tags=tags)
                audio_s += len(event.pcm) / event.sample_rate
                clock.chunk(len(event.pcm) / event.sample_rate)
                if clock.streaming and clock.intervals:
                    m["interval"].observe(clock.intervals[-1], tags=tags)
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
        if clock.streaming and clock.first_at is not None:
            m["underrun"].observe(clock.underrun_s, tags=tags)
            m["streams"].inc(1, tags={**tags, "continuous": str(clock.continuous).lower()})


def _finished(m: dict, tags: dict, done: Done, wall_s: float, audio_s: float) -> None:
    tokens = len(done.token_ids) or done.usage.get("llm", {}).get("completion_tokens", 0)
    if tokens:
        m["tokens"].inc(tokens, tags=tags)
        m["tps"].observe(tokens / max(wall_s, 1e-9), tags=tags)
    if audio_s > 0:
        m["rtf"].observe(wall_s / audio_s, tags=tags)
