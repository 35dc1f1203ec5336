"""The speech data path, written once: request -> speech encoder -> LLM stream -> audio decoder -> events.

    async for event in run_request(clients, limits, "tts", text="Hello there."):
        ...                                   # TextDelta | AudioChunk | Done | ErrorEvent

Every front end runs requests through `run_request`; they differ only in the `StageClients` they pass:
Ray actor handles (`actors.staged_pipeline.StagedPipeline`), in-process stage objects (`actors.local.LocalPipeline`) or
Ray Serve deployment handles. This module imports neither ray nor torch, so an adapter for any of them
can import the protocol, the failure types and the function.

Per request two tasks cooperate: one reads the LLM stream and sends each audio chunk to the decoder as
soon as it arrives (the decoder starts on chunk 1 while the LLM goes on), the other awaits the PCM of
those chunks in order. At most `limits.max_inflight_chunks` chunks wait for the decoder, so a slow
decoder or client slows the LLM down instead of piling up memory (and the decoder's capacity can hold every
LLM slot's chunks: serve.app.Args derives it). A transport whose calls can be refused at capacity or reordered
on the way (Ray Serve) sends a request's chunks through a `ChunkGate`: in order of acceptance, a refused chunk
resent, so the decoder never waits for a chunk that is only queued (its `chunk_wait_s` is for lost ones).

Failures end a request with one `ErrorEvent` naming the stage. A client raises `StageRestarting` for a
call that never ran because its stage is restarting: calls that are safe to resend (the encoding, the
start of the LLM stream, the first chunk of a decoder stream) are retried until `stage_timeout_s`.
A consumer that stops early (break, aclose) aborts the LLM request and closes the decoder stream.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Iterator, Protocol, Sequence, TypeVar

from actors.aio import LoopThread, within
from actors.config import STAGES
from actors.payloads import (
    LAYOUT_AUTO,
    AudioChunk,
    AudioPayload,
    CodesChunk,
    Done,
    ErrorEvent,
    LLMOutput,
    PCMChunk,
    PipelineEvent,
    SpeechRequest,
    TextDelta,
    load_waveform,
    new_request_id,
)
from actors.requests import Caps, build_request, check_text, check_voice_codes, request_options
from actors.streams import DecoderFeed, LLMFold

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# The contract with the stages


class StageFailure(Exception):
    """A stage failed for one request; `stage` names it ("input", "encoder", "llm", "decoder", "pipeline")."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class StageRestarting(StageFailure):
    """The call did not run because the stage is restarting: resending it is safe."""


class StageBusy(StageFailure):
    """The stage refused the call at capacity (e.g. Serve's max_queued_requests): retry later."""


def error_event(err: StageFailure, request_id: str = "") -> ErrorEvent:
    """The terminal event of a request a stage failed; `busy` when the stage refused it at capacity."""
    return ErrorEvent(err.stage, str(err), request_id, busy=isinstance(err, StageBusy))


class StageClients(Protocol):
    """What the orchestration needs from the three stages. Adapters translate their transport's errors
    into `StageFailure` / `StageRestarting`; any other exception is reported as a failure of the stage.

    Calls for one request are made from one event loop; implementations must be safe for concurrent
    requests (the orchestration runs many at once on one client object).
    """

    async def encode(self, audio: AudioPayload) -> list[int]:
        """Speech encoder: the audio codes of one waveform."""

    def generate(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        """LLM engine: the request's outputs in order; the last one has `end` set."""

    async def push(self, chunk: CodesChunk) -> PCMChunk:
        """Audio decoder: PCM for the request's next chunk (by `chunk.seq`); `final` flushes and frees."""

    def close(self, request_id: str) -> None:
        """Audio decoder: drop the request's stream (fire and forget; never raises)."""

    def abort(self, request_id: str) -> None:
        """LLM engine: stop generating for the request (fire and forget; never raises)."""


@dataclass(frozen=True)
class Limits:
    """Deadlines and the decoder hand-off bound of every front end: `Limits.of(PipelineConfig)` (the defaults
    are PipelineConfig's; Serve's app args set them as the CLI's flags do)."""

    stage_timeout_s: float = 60.0  # a stage call without progress for this long fails the request
    request_timeout_s: float = 600.0  # the whole request
    max_inflight_chunks: int = 2  # chunks sent to the decoder whose PCM was not yet taken

    @classmethod
    def of(cls, config) -> "Limits":
        return cls(config.stage_timeout_s, config.request_timeout_s, config.max_inflight_chunks)


# ---------------------------------------------------------------------------------------------------------
# One request


@dataclass
class _Trace:
    """Per-request bookkeeping: timings (seconds from submission) and what each stage did."""

    start: float = field(default_factory=time.perf_counter)
    wall_start: float = field(default_factory=time.time)  # places the stages' wall-clock stamps on our axis
    timings: dict = field(default_factory=dict)
    usage: dict = field(default_factory=lambda: {s: {} for s in STAGES})
    llm: LLMFold = field(default_factory=LLMFold)  # what the LLM stream said (text, audio chunks, end)
    chunks_out: int = 0

    def mark(self, name: str) -> None:
        self.timings.setdefault(name, time.perf_counter() - self.start)

    text = property(lambda self: self.llm.text)
    audio_codes = property(lambda self: self.llm.audio_codes)
    end = property(lambda self: self.llm.end)


async def run_request(clients: StageClients, limits: Limits, task: str, *, text: str | None = None, audio=None,
                      voice=None, history: Sequence[dict] = (), system: str | None = None, mode=None,
                      max_new_tokens: int = 256, sampling=None, constraint=LAYOUT_AUTO, request_id: str = "",
                      timeout_s: float | None = None, caps: Caps = Caps()) -> AsyncIterator[PipelineEvent]:
    """Run one tts / asr / chat request through the stages; yields events, the last is Done or ErrorEvent.

    `audio` / `voice`: a path, bytes or 16 kHz array (voice may also be a list of audio codes). Closing
    the generator early aborts the LLM request and closes the decoder stream. The request's options are
    checked by the one request policy (`actors.requests`) before any stage work; `constraint` "auto" lets
    the LLM stage choose the layout by its checkpoint. `caps`: the model's and the front end's caps.
    """
    request_id = request_id or new_request_id(task)
    trace = _Trace()
    try:  # input problems are the caller's: report them before touching any stage
        options = request_options(mode=mode, max_new_tokens=max_new_tokens, sampling=sampling, layout=constraint,
                                  caps=caps)
        if task == "tts" or (task == "chat" and audio is None):
            check_text(text, "text", caps, options.max_new_tokens)
        if system is not None:
            check_text(system, "system", caps, system=True)
        if voice is not None and is_codes(voice):
            check_voice_codes(voice)
        audio_payload = load_waveform(audio) if audio is not None else None
        voice_payload = None if voice is None or is_codes(voice) else load_waveform(voice)
    except (ValueError, FileNotFoundError) as err:
        yield ErrorEvent("input", str(err), request_id)
        return

    out: asyncio.Queue = asyncio.Queue()
    worker = asyncio.create_task(_drive(clients, limits, trace, out, task=task, request_id=request_id, text=text,
                                        audio=audio_payload, voice=voice, voice_payload=voice_payload,
                                        history=history, system=system, options=options, caps=caps))
    timeout = timeout_s or limits.request_timeout_s
    deadline = time.monotonic() + timeout
    finished = False
    try:
        while True:
            try:
                event = await within(out.get(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                yield ErrorEvent("pipeline", f"request timed out after {timeout:g} s (request_timeout_s)", request_id)
                return
            if isinstance(event, AudioChunk):
                trace.mark("time_to_first_audio")
            elif isinstance(event, TextDelta):
                trace.mark("time_to_first_text")
            elif isinstance(event, Done):
                trace.mark("total")
                event.timings = dict(trace.timings)
            if isinstance(event, (Done, ErrorEvent)):
                finished = isinstance(event, Done)
                yield event
                return
            yield event
    finally:
        worker.cancel()
        if not finished:  # consumer stopped, error or timeout: free the LLM request and the decoder stream
            clients.abort(request_id)
            clients.close(request_id)


async def _drive(clients: StageClients, limits: Limits, trace: _Trace, out: asyncio.Queue, *, task, request_id,
                 text, audio, voice, voice_payload, history, system, options, caps) -> None:
    """Run one request through the stages, putting client events on `out` (ends with Done or ErrorEvent)."""
    try:
        codes, voice_codes = await _encode(clients, limits, trace, audio, voice_payload)
        if voice is not None and voice_payload is None:
            voice_codes = [int(c) for c in voice]
        try:
            request = build_request(task, request_id=request_id, text=text, codes=codes, history=history,
                                    voice_codes=voice_codes, system=system, options=options, caps=caps)
        except ValueError as err:  # InputError, or SpeechRequest's own checks
            raise StageFailure("input", str(err)) from None
        await _stream(clients, limits, request, trace, out)
        trace.usage["llm"].update(trace.end.usage)
        # when the LLM stage finished, on the request's time axis (stage clock; same host or NTP-synced)
        trace.timings["llm_finished"] = trace.end.finished_at - trace.wall_start
        out.put_nowait(Done(reason=trace.end.reason, text=trace.text, token_ids=list(trace.end.token_ids),
                            audio_codes=trace.audio_codes, usage=trace.usage, timings={}))
    except StageFailure as err:
        out.put_nowait(error_event(err, request_id))
    except asyncio.CancelledError:
        raise
    except Exception as err:  # a bug in the orchestration: still a clean terminal event
        out.put_nowait(ErrorEvent("pipeline", f"{type(err).__name__}: {err}", request_id))


async def _encode(clients: StageClients, limits: Limits, trace: _Trace, audio: AudioPayload | None,
                  voice: AudioPayload | None):
    payloads = [p for p in (audio, voice) if p is not None]
    if not payloads:
        return None, None
    results = [await retry_restarting("encoder", lambda p=p: clients.encode(p), limits.stage_timeout_s)
               for p in payloads]
    trace.mark("encoded")
    trace.usage["encoder"] = {"waveforms": len(payloads), "seconds_of_audio": sum(p.seconds for p in payloads),
                              "codes": sum(len(r) for r in results)}
    codes = results.pop(0) if audio is not None else None
    voice_codes = results.pop(0) if voice is not None else None
    if audio is not None and not codes:
        raise StageFailure("encoder", f"the encoder produced no codes for {audio.name!r} ({audio.seconds:.2f} s)")
    return codes, voice_codes


async def _stream(clients: StageClients, limits: Limits, request: SpeechRequest, trace: _Trace,
                  out: asyncio.Queue) -> None:
    """LLM stream -> text events + decoder pushes (bounded), decoder PCM -> audio events, in order."""
    pending_pcm: asyncio.Queue = asyncio.Queue()
    # decoder calls of this request not yet taken by read_pcm: exactly max_inflight_chunks at most (the chunk read_pcm
    # awaits counts too), so the decoder's capacity can be sized to hold every LLM slot's chunks (serve.app.Args)
    inflight = asyncio.Semaphore(limits.max_inflight_chunks)
    feed = DecoderFeed(clients, request.request_id)  # the decoder's chunk protocol (actors.streams)
    decoder_usage = {"chunks": 0, "forwards": 0}
    trace.usage["decoder"] = decoder_usage
    timeout = limits.stage_timeout_s

    async def start_llm():
        stream = clients.generate(request)
        try:
            return stream, await within(_next(stream), timeout)
        except BaseException:
            await _aclose(stream)
            raise

    async def read_llm() -> None:
        stream, item = await retry_restarting("llm", start_llm, timeout)
        try:
            while True:
                trace.llm.add(item)
                if item.text or item.text_ids:
                    out.put_nowait(TextDelta(item.text, list(item.text_ids)))
                for codes in item.audio_chunks:
                    trace.mark("first_audio_codes")
                    await inflight.acquire()
                    if not feed.sent:  # the decoder may still be restarting: its stream starts on this chunk,
                        # and later chunks are sent only once that stream exists (on the restarted stage)
                        chunk = feed.chunk(codes)
                        first_pcm = asyncio.get_running_loop().create_future()
                        first_pcm.set_result(await retry_restarting("decoder", lambda c=chunk: clients.push(c), timeout))
                        await pending_pcm.put(first_pcm)
                    else:
                        await pending_pcm.put(asyncio.ensure_future(feed.push(codes)))
                if item.end is not None:
                    trace.mark("llm_done")
                    break
                item = await _guard("llm", _next(stream), timeout)
        finally:
            await _aclose(stream)
        if feed.sent:  # flush the decoder stream's tail (and free it)
            await inflight.acquire()
            await pending_pcm.put(asyncio.ensure_future(feed.flush()))
        await pending_pcm.put(None)

    async def read_pcm() -> None:
        while (pushed := await pending_pcm.get()) is not None:
            chunk = await _guard("decoder", pushed, timeout)
            inflight.release()
            decoder_usage["chunks"] += 1
            decoder_usage["forwards"] = chunk.forwards
            decoder_usage["compute_s"] = decoder_usage.get("compute_s", 0.0) + chunk.compute_s
            if len(chunk.pcm):
                if not trace.chunks_out:  # decoder compute behind the first audio (the rest is hand-off)
                    trace.timings["first_audio_decoder_compute"] = decoder_usage["compute_s"]
                out.put_nowait(AudioChunk(chunk.pcm, chunk.sample_rate, trace.chunks_out))
                trace.chunks_out += 1

    tasks = [asyncio.create_task(read_llm()), asyncio.create_task(read_pcm())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        while not pending_pcm.empty():  # pushes nobody will await: do not leave "exception never retrieved"
            pushed = pending_pcm.get_nowait()
            if isinstance(pushed, asyncio.Future):
                pushed.cancel()


# ---------------------------------------------------------------------------------------------------------
# Failures and retries


def as_failure(stage: str, err: BaseException, timeout_s: float) -> StageFailure:
    """A stage-named failure for whatever a client raised (adapters have translated their transport's)."""
    if isinstance(err, StageFailure):
        return err
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return StageFailure(stage, f"{stage} stage made no progress for {timeout_s:g} s (stage_timeout_s)")
    if isinstance(err, StopAsyncIteration):
        return StageFailure(stage, f"{stage} stream ended without an end marker")
    return StageFailure(stage, f"{stage} stage failed: {type(err).__name__}: {err}")


async def _guard(stage: str, awaitable: Awaitable[T], timeout_s: float) -> T:
    """Await one stage call under the stage deadline, turning any error into a StageFailure naming it."""
    try:
        return await within(awaitable, timeout_s)
    except asyncio.CancelledError:
        raise
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise as_failure(stage, err, timeout_s) from None


async def retry_restarting(stage: str, call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Await `call()`, resending it while the stage restarts (it never ran there), until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return await _guard(stage, call(), max(deadline - time.monotonic(), 0.0))
        except StageRestarting:
            if time.monotonic() + delay >= deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def retry_busy(call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Await `call()`, resending it (backing off) while the stage refuses it at capacity, until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return await call()
        except StageBusy:
            if time.monotonic() + delay >= deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


class ChunkGate:
    """A transport's side of the decoder's chunk order, for transports that accept a call in a step of its own and
    may refuse it there at capacity (Ray Serve: a caller's queue beyond max_queued_requests, a replica at
    max_ongoing_requests). Each request's chunks go out in `seq` order, the next one only once a decoder replica
    accepted the one before; a chunk refused at capacity (`StageBusy`) is resent, backing off, for up to
    `busy_timeout_s`. So no chunk reaches the decoder before an earlier one that is merely queued or refused: the
    decoder's `chunk_wait_s` clock runs only for chunks that really went missing.

        response = await gate.send(chunk, submit)   # submit(): the call, once accepted (raises StageBusy if refused)
        pcm = await response
    """

    def __init__(self, busy_timeout_s: float = 60.0):
        self.busy_timeout_s = busy_timeout_s
        self.accepted: dict[str, int] = {}  # request id -> how many of its chunks a replica accepted
        self.changed: dict[str, asyncio.Event] = {}  # set when that count changes or the request is forgotten
        self.refused = 0  # refusals at capacity, each followed by a resend unless busy_timeout_s ran out

    async def send(self, chunk: CodesChunk, submit: Callable[[], Awaitable[T]]) -> T:
        request_id = chunk.request_id
        if chunk.seq and request_id not in self.accepted:
            raise StageFailure("decoder", f"request {request_id!r} was closed; chunk {chunk.seq} is not sent")
        self.accepted.setdefault(request_id, 0)
        while self.accepted.get(request_id, -1) < chunk.seq:  # an earlier chunk is not accepted yet
            if request_id not in self.accepted:
                raise StageFailure("decoder", f"request {request_id!r} was closed; chunk {chunk.seq} is not sent")
            await self.changed.setdefault(request_id, asyncio.Event()).wait()

        async def attempt() -> T:
            try:
                return await submit()
            except StageBusy:
                self.refused += 1
                raise

        response = await retry_busy(attempt, self.busy_timeout_s)
        if request_id in self.accepted:
            self.accepted[request_id] = max(self.accepted[request_id], chunk.seq + 1)
            self._wake(request_id)
        if chunk.final:
            self.forget(request_id)
        return response

    def forget(self, request_id: str) -> None:
        """The request ended (its final chunk was accepted, or it was closed): chunks still waiting give up."""
        self.accepted.pop(request_id, None)
        self._wake(request_id)
        self.changed.pop(request_id, None)

    def _wake(self, request_id: str) -> None:
        event = self.changed.pop(request_id, None)
        if event is not None:
            event.set()


async def _next(stream: AsyncIterator[T]) -> T:
    return await stream.__anext__()


async def _aclose(stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------------------
# The request API every front end offers


class SpeechAPI:
    """tts / asr / chat over `run_request`; a front end provides `clients`, `limits` and `bridge`.

    `*_async` methods are async generators; the sync ones drive them on `bridge`'s loop thread.

    Options for every method: mode, max_new_tokens, sampling (SamplingParams, e.g. from
    `actors.requests.build_sampling`; None = greedy), constraint ("auto" = the LLM stage decides by its
    checkpoint, "task" = the task's layout, "interleaved", "text" or None), request_id, timeout_s; all checked
    by `actors.requests` (a bad one ends the request with an input ErrorEvent before any stage work).
    """

    clients: StageClients
    limits: Limits
    bridge: LoopThread
    caps: Caps = Caps()  # the model's caps (positions, tokenizer) where the front end knows them

    def tts(self, text: str, *, voice=None, **options) -> Iterator[PipelineEvent]:
        return self.bridge.iterate(self.tts_async(text, voice=voice, **options))

    def asr(self, audio, **options) -> Iterator[PipelineEvent]:
        return self.bridge.iterate(self.asr_async(audio, **options))

    def chat(self, audio_or_text, *, history: Sequence[dict] = (), voice=None, system: str | None = None,
             **options) -> Iterator[PipelineEvent]:
        return self.bridge.iterate(self.chat_async(audio_or_text, history=history, voice=voice, system=system,
                                                   **options))

    def tts_async(self, text: str, *, voice=None, **options) -> AsyncIterator[PipelineEvent]:
        """Speak `text` (optional voice prompt: audio or codes): text deltas, PCM chunks, then Done."""
        return run_request(self.clients, self.limits, "tts", text=text, voice=voice, caps=self.caps, **options)

    def asr_async(self, audio, **options) -> AsyncIterator[PipelineEvent]:
        """Transcribe `audio` (path, bytes or a 16 kHz array): text deltas, then Done."""
        return run_request(self.clients, self.limits, "asr", audio=audio, caps=self.caps, **options)

    def chat_async(self, audio_or_text, *, history: Sequence[dict] = (), voice=None, system: str | None = None,
                   **options) -> AsyncIterator[PipelineEvent]:
        """One spoken (or text) turn after `history`; answers in text and speech."""
        key = "text" if isinstance(audio_or_text, str) and not looks_like_path(audio_or_text) else "audio"
        return run_request(self.clients, self.limits, "chat", history=history, voice=voice, system=system,
                           caps=self.caps, **{key: audio_or_text}, **options)


def is_codes(value) -> bool:
    """A voice prompt given as audio codes (a list of ints) rather than audio."""
    import numbers

    return isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Integral) for v in value)


def looks_like_path(text: str) -> bool:
    return os.path.exists(text) or text.lower().endswith((".wav", ".flac", ".mp3", ".ogg"))
