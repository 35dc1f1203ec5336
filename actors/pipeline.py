"""The staged pipeline on Ray: encoder -> LLM (+MCTP) -> decoder actors, streaming end to end.

    pipe = Pipeline.start(PipelineConfig.from_models_dir(models))
    for event in pipe.tts("Hello there."):        # TextDelta | AudioChunk | Done | ErrorEvent
        ...
    result = collect(pipe.chat("question.wav"))    # text, concatenated PCM, usage and timings

Per request the driver runs two cooperating tasks: one reads the LLM stage's streaming generator and
sends every audio chunk to the DecoderStage as soon as it arrives (so the decoder starts on chunk 1
while the LLM goes on), the other awaits the PCM of those chunks in order. The hand-off is bounded
at every step: at most `max_inflight_chunks` chunks wait for the decoder, Ray holds at most
`llm.queue_size` unread items of the generator, and the LLM stage stops stepping while a request's
queue is full. So a slow decoder or client slows the LLM down instead of piling up memory.

Failures end a request with one `ErrorEvent` naming the stage: a dead actor (Ray restarts it, the next
request works), a stage without progress for `stage_timeout_s`, or the whole request over
`request_timeout_s`. A consumer that stops early (break, close) aborts the LLM request and frees the
decoder stream.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import numpy as np
import ray

from actors.builder import StageHandles, build_stages, shutdown_stages
from actors.aio import within
from actors.config import STAGES, PipelineConfig
from actors.payloads import (
    TASK_DEFAULT,
    AudioChunk,
    AudioPayload,
    DecodeChunk,
    Done,
    ErrorEvent,
    LLMEnd,
    PipelineEvent,
    SpeechRequest,
    TextDelta,
    load_waveform,
    new_request_id,
)
from actors.placement import StagePlacement


class StageFailure(Exception):
    """A stage failed for one request; `stage` names it, the message says what happened."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def describe_failure(stage: str, err: BaseException, timeout_s: float) -> StageFailure:
    """Turn what Ray raised into a one-line, stage-named message."""
    if isinstance(err, StageFailure):
        return err
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return StageFailure(stage, f"{stage} stage actor died or is unreachable during the request "
                                   f"({type(err).__name__}); Ray restarts it, retry the request")
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        return StageFailure(stage, f"{stage} stage failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return StageFailure(stage, f"{stage} stage made no progress for {timeout_s:g} s (stage_timeout_s)")
    return StageFailure(stage, f"{stage} stage failed: {type(err).__name__}: {err}")


@dataclass
class _Trace:
    """Per-request bookkeeping: timings (seconds from submission) and what each stage did."""

    start: float = field(default_factory=time.perf_counter)
    wall_start: float = field(default_factory=time.time)  # to place the stages' wall-clock stamps on our axis
    timings: dict = field(default_factory=dict)
    usage: dict = field(default_factory=lambda: {s: {} for s in STAGES})
    text: str = ""
    audio_codes: list[int] = field(default_factory=list)
    end: LLMEnd | None = None
    chunks_out: int = 0

    def mark(self, name: str) -> None:
        self.timings.setdefault(name, time.perf_counter() - self.start)


class Pipeline:
    """Python API over the three stage actors. Sync methods yield events; `*_async` methods are async generators."""

    def __init__(self, config: PipelineConfig, stages: StageHandles):
        self.config = config
        self.stages = stages
        self._loop = asyncio.new_event_loop()  # drives the async core for the sync API
        self._thread = threading.Thread(target=self._loop.run_forever, name="vita-pipeline", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, config: PipelineConfig) -> "Pipeline":
        """Place and start the stage actors (Ray must be initialised), then return the pipeline."""
        return cls(config, build_stages(config))

    def shutdown(self) -> None:
        """Kill the stage actors and free their placement group."""
        shutdown_stages(self.stages)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def placement(self) -> dict[str, StagePlacement]:
        refs = [self.stages.get(stage).placement.remote() for stage in STAGES]
        return dict(zip(STAGES, ray.get(refs, timeout=self.config.stage_timeout_s)))

    def stats(self) -> dict[str, dict]:
        refs = [self.stages.get(stage).stats.remote() for stage in STAGES]
        return dict(zip(STAGES, ray.get(refs, timeout=self.config.stage_timeout_s)))

    def check_health(self) -> None:
        ray.get([self.stages.get(stage).check_health.remote() for stage in STAGES], timeout=self.config.stage_timeout_s)

    # --- the public request API -------------------------------------------------------------------------
    # options for every method: mode, max_new_tokens, sampling (pipeline.generate.SamplingParams, None =
    # greedy), constraint ("task" = the task's layout, "interleaved", "text" or None), request_id, timeout_s.

    def tts(self, text: str, *, voice=None, **options) -> Iterator[PipelineEvent]:
        """Speak `text` (optional voice prompt: audio or codes). Yields text deltas, PCM chunks, then Done."""
        return self._iterate(self.tts_async(text, voice=voice, **options))

    def asr(self, audio, **options) -> Iterator[PipelineEvent]:
        """Transcribe `audio` (path, bytes or a 16 kHz array). Yields text deltas, then Done."""
        return self._iterate(self.asr_async(audio, **options))

    def chat(self, audio_or_text, *, history: Sequence[dict] = (), voice=None, system: str | None = None,
             **options) -> Iterator[PipelineEvent]:
        """One spoken (or text) turn after `history`; answers in text and speech."""
        return self._iterate(self.chat_async(audio_or_text, history=history, voice=voice, system=system, **options))

    def tts_async(self, text: str, *, voice=None, **options) -> AsyncIterator[PipelineEvent]:
        return self._run("tts", text=text, voice=voice, **options)

    def asr_async(self, audio, **options) -> AsyncIterator[PipelineEvent]:
        return self._run("asr", audio=audio, **options)

    def chat_async(self, audio_or_text, *, history: Sequence[dict] = (), voice=None, system: str | None = None,
                   **options) -> AsyncIterator[PipelineEvent]:
        if isinstance(audio_or_text, str) and not _looks_like_path(audio_or_text):
            return self._run("chat", text=audio_or_text, history=history, voice=voice, system=system, **options)
        return self._run("chat", audio=audio_or_text, history=history, voice=voice, system=system, **options)

    # --- the async core -----------------------------------------------------------------------------------
    async def _run(self, task: str, *, text: str | None = None, audio=None, voice=None, history=(), system=None,
                   mode=None, max_new_tokens: int = 256, sampling=None, constraint=TASK_DEFAULT,
                   request_id: str = "", timeout_s: float | None = None) -> AsyncIterator[PipelineEvent]:
        request_id = request_id or new_request_id(task)
        trace = _Trace()
        try:  # input problems are the caller's: report them before touching any stage
            audio_payload = load_waveform(audio) if audio is not None else None
            voice_payload = None if voice is None or _is_codes(voice) else load_waveform(voice)
            if task == "tts" and (not isinstance(text, str) or not text.strip()):
                raise ValueError(f"text={text!r}: TTS needs a non-empty text")
        except (ValueError, FileNotFoundError) as err:
            yield ErrorEvent("input", str(err), request_id)
            return

        out: asyncio.Queue = asyncio.Queue()
        worker = asyncio.create_task(self._drive(task, request_id, trace, out, text=text, audio=audio_payload,
                                                 voice=voice, voice_payload=voice_payload, history=history,
                                                 system=system, mode=mode, max_new_tokens=max_new_tokens,
                                                 sampling=sampling, constraint=constraint))
        deadline = time.monotonic() + (timeout_s or self.config.request_timeout_s)
        finished = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await within(out.get(), max(remaining, 0.0))
                except asyncio.TimeoutError:
                    yield ErrorEvent("pipeline", f"request timed out after {timeout_s or self.config.request_timeout_s:g} s "
                                                 "(request_timeout_s)", request_id)
                    return
                if event is None:  # the worker finished without a terminal event (cannot happen; be safe)
                    return
                if isinstance(event, AudioChunk):
                    trace.mark("time_to_first_audio")
                elif isinstance(event, TextDelta):
                    trace.mark("time_to_first_text")
                if isinstance(event, Done):
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
                self._release(request_id)

    async def _drive(self, task: str, request_id: str, trace: _Trace, out: asyncio.Queue, *, text, audio, voice,
                     voice_payload, history, system, mode, max_new_tokens, sampling, constraint) -> None:
        """Run one request through the stages, putting client events on `out` (ends with Done or ErrorEvent)."""
        try:
            codes, voice_codes = await self._encode(trace, audio, voice_payload)
            if voice is not None and voice_payload is None:
                voice_codes = [int(c) for c in voice]
            try:
                request = SpeechRequest(task=task, request_id=request_id, text=text, codes=codes, history=tuple(history),
                                        voice_codes=voice_codes, system=system, mode=mode,
                                        max_new_tokens=max_new_tokens, sampling=sampling, constraint=constraint)
            except ValueError as err:
                raise StageFailure("input", str(err)) from None
            await self._stream(request, trace, out)
            trace.usage["llm"].update(trace.end.usage)
            # when the LLM stage finished, on the request's time axis (stage clock; same host or NTP-synced)
            trace.timings["llm_finished"] = trace.end.finished_at - trace.wall_start
            out.put_nowait(Done(reason=trace.end.reason, text=trace.text, token_ids=list(trace.end.token_ids),
                                audio_codes=trace.audio_codes, usage=trace.usage, timings={}))
        except StageFailure as err:
            out.put_nowait(ErrorEvent(err.stage, str(err), request_id))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug in the driver: still a clean terminal event
            out.put_nowait(ErrorEvent("pipeline", f"{type(err).__name__}: {err}", request_id))

    async def _encode(self, trace: _Trace, audio: AudioPayload | None, voice: AudioPayload | None):
        payloads = [p for p in (audio, voice) if p is not None]
        if not payloads:
            return None, None
        results = [await self._await_restarting("encoder", lambda p=p: self.stages.encoder.tokenize.remote(p))
                   for p in payloads]
        trace.mark("encoded")
        trace.usage["encoder"] = {"waveforms": len(payloads), "seconds_of_audio": sum(p.seconds for p in payloads),
                                  "codes": sum(len(r) for r in results)}
        codes = results.pop(0) if audio is not None else None
        voice_codes = results.pop(0) if voice is not None else None
        if audio is not None and not codes:
            raise StageFailure("encoder", f"the encoder produced no codes for {audio.name!r} ({audio.seconds:.2f} s)")
        return codes, voice_codes

    async def _stream(self, request: SpeechRequest, trace: _Trace, out: asyncio.Queue) -> None:
        """LLM stream -> text events + decoder pushes (bounded), decoder PCM -> audio events, in order."""
        pending_pcm: asyncio.Queue = asyncio.Queue(maxsize=self.config.max_inflight_chunks)
        decoder_usage = {"chunks": 0, "forwards": 0}
        trace.usage["decoder"] = decoder_usage

        def start_llm():
            return self.stages.llm.generate.options(
                num_returns="streaming", _generator_backpressure_num_objects=self.config.llm.queue_size,
            ).remote(request)

        async def read_llm() -> None:
            generator, first = await self._start_stream(start_llm)
            sent_audio, n_chunks = False, 0
            while True:
                try:
                    if first is not None:
                        item, first = first, None
                    else:
                        ref = await within(generator.__anext__(), self.config.stage_timeout_s)
                        item = await self._await("llm", ref)
                except StopAsyncIteration:
                    raise StageFailure("llm", "LLM stream ended without an end marker") from None
                except StageFailure:
                    raise
                except Exception as err:
                    raise describe_failure("llm", err, self.config.stage_timeout_s) from None
                if item.text or item.text_ids:
                    trace.text += item.text
                    out.put_nowait(TextDelta(item.text, list(item.text_ids)))
                for codes in item.audio_chunks:
                    trace.mark("first_audio_codes")
                    trace.audio_codes.extend(codes)
                    chunk = DecodeChunk(request.request_id, codes, seq=n_chunks)
                    n_chunks += 1
                    if not sent_audio:  # the decoder may still be restarting: its stream starts on this chunk,
                        # and later chunks are sent only once that stream exists (on the restarted actor)
                        first_pcm = asyncio.get_running_loop().create_future()
                        first_pcm.set_result(await self._await_restarting(
                            "decoder", lambda c=chunk: self.stages.decoder.push.remote(c)))
                        await pending_pcm.put(first_pcm)
                    else:
                        await pending_pcm.put(self.stages.decoder.push.remote(chunk))
                    sent_audio = True
                if item.end is not None:
                    trace.end = item.end
                    trace.mark("llm_done")
                    break
            if sent_audio:  # flush the decoder stream's tail (and free it)
                await pending_pcm.put(self.stages.decoder.push.remote(DecodeChunk(request.request_id, [], final=True, seq=n_chunks)))
            await pending_pcm.put(None)

        async def read_pcm() -> None:
            while (ref := await pending_pcm.get()) is not None:
                chunk = await self._await("decoder", ref)
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

    async def _await_restarting(self, stage: str, make_ref):
        """Await a call that is safe to resend while the stage restarts (it never ran on a restarting actor)."""
        deadline = time.monotonic() + self.config.stage_timeout_s
        delay = 0.05
        while True:
            try:
                return await within(make_ref(), max(deadline - time.monotonic(), 0.0))
            except ray.exceptions.ActorUnavailableError as err:
                if time.monotonic() + delay >= deadline:
                    raise describe_failure(stage, err, self.config.stage_timeout_s) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise describe_failure(stage, err, self.config.stage_timeout_s) from None

    async def _start_stream(self, start):
        """Start the LLM stream and read its first item, waiting out a restart of the stage (nothing ran yet)."""
        deadline = time.monotonic() + self.config.stage_timeout_s
        delay = 0.05
        while True:
            generator = start()
            try:
                ref = await within(generator.__anext__(), max(deadline - time.monotonic(), 0.0))
                return generator, await within(ref, max(deadline - time.monotonic(), 0.0))
            except ray.exceptions.ActorUnavailableError as err:
                if time.monotonic() + delay >= deadline:
                    raise describe_failure("llm", err, self.config.stage_timeout_s) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except StopAsyncIteration:
                raise StageFailure("llm", "LLM stream ended without an end marker") from None
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise describe_failure("llm", err, self.config.stage_timeout_s) from None

    async def _await(self, stage: str, ref):
        try:
            return await within(ref, self.config.stage_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise describe_failure(stage, err, self.config.stage_timeout_s) from None

    def _release(self, request_id: str) -> None:
        """Fire-and-forget: abort the LLM request and drop the decoder stream (dead stages are ignored)."""
        for call in (self.stages.llm.abort, self.stages.decoder.close):
            try:
                call.remote(request_id)
            except Exception:
                pass

    # --- sync bridge ----------------------------------------------------------------------------------------
    def _iterate(self, agen: AsyncIterator[PipelineEvent]) -> Iterator[PipelineEvent]:
        """Drive an async generator on the pipeline's loop thread; closing the iterator closes the generator."""
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop).result()
                except StopAsyncIteration:
                    return
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result(timeout=30)


def _is_codes(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value)


def _looks_like_path(text: str) -> bool:
    import os

    return os.path.exists(text) or text.lower().endswith((".wav", ".flac", ".mp3", ".ogg"))


# ---------------------------------------------------------------------------------------------------------
# Collecting a stream


@dataclass
class SpeechResult:
    """Everything one request produced, gathered from its events."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    audio_codes: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 0
    done: Done | None = None
    error: ErrorEvent | None = None
    event_kinds: list[str] = field(default_factory=list)  # "text" / "audio" in arrival order

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)

    @property
    def ok(self) -> bool:
        return self.done is not None


def collect(events) -> SpeechResult:
    result = SpeechResult()
    for event in events:
        _add(result, event)
    return result


async def collect_async(events) -> SpeechResult:
    result = SpeechResult()
    async for event in events:
        _add(result, event)
    return result


def _add(result: SpeechResult, event: PipelineEvent) -> None:
    if isinstance(event, TextDelta):
        result.text += event.text
        result.event_kinds.append("text")
    elif isinstance(event, AudioChunk):
        result.chunks.append(event.pcm)
        result.sample_rate = event.sample_rate
        result.event_kinds.append("audio")
    elif isinstance(event, Done):
        result.done = event
        result.text = event.text
        result.token_ids = event.token_ids
        result.audio_codes = event.audio_codes
    elif isinstance(event, ErrorEvent):
        result.error = event
