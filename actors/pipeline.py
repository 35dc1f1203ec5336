"""The staged pipeline on Ray: encoder -> LLM (+MCTP) -> decoder actors, streaming end to end.

    pipe = Pipeline.start(PipelineConfig.from_models_dir(models))
    for event in pipe.tts("Hello there."):        # TextDelta | AudioChunk | Done | ErrorEvent
        ...
    result = collect(pipe.chat("question.wav"))    # text, concatenated PCM, usage and timings

The data path itself is `actors.orchestration.run_request`; this module only adapts Ray actor handles
to its `StageClients` protocol (`RayStageClients`) and translates what Ray raises into stage-named
failures. Ray holds at most `llm.queue_size` unread items of the LLM generator, and the LLM stage stops
stepping while a request's queue is full, so backpressure reaches the engine.

Failures end a request with one `ErrorEvent` naming the stage: a dead actor (Ray restarts it, the next
request works), a stage without progress for `stage_timeout_s`, or the whole request over
`request_timeout_s`. A consumer that stops early (break, close) aborts the LLM request and frees the
decoder stream.
"""
from __future__ import annotations

from typing import AsyncIterator

import ray

from actors.aio import LoopThread
from actors.builder import StageHandles, build_stages, shutdown_stages
from actors.config import STAGES, PipelineConfig
from actors.orchestration import Limits, SpeechAPI, StageFailure, StageRestarting
from actors.payloads import AudioPayload, CodesChunk, LLMOutput, PCMChunk, SpeechRequest
from actors.placement import StagePlacement
from actors.results import SpeechResult, collect, collect_async  # noqa: F401  (re-exported)


def ray_failure(stage: str, err: BaseException) -> StageFailure:
    """Turn what Ray raised into a one-line, stage-named failure (`StageRestarting` if resending is safe)."""
    if isinstance(err, StageFailure):
        return err
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        kind = StageRestarting if isinstance(err, ray.exceptions.ActorUnavailableError) else StageFailure
        return kind(stage, f"{stage} stage actor died or is unreachable during the request "
                           f"({type(err).__name__}); Ray restarts it, retry the request")
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        first_line = str(cause).splitlines()[0] if str(cause) else ""
        return StageFailure(stage, f"{stage} stage failed: {type(cause).__name__}: {first_line}")
    return StageFailure(stage, f"{stage} stage failed: {type(err).__name__}: {err}")


class RayStageClients:
    """`StageClients` over the three stage actors' handles."""

    def __init__(self, stages: StageHandles, llm_queue_size: int):
        self.stages = stages
        self.llm_queue_size = llm_queue_size

    async def encode(self, audio: AudioPayload) -> list[int]:
        try:
            return await self.stages.encoder.encode.remote(audio)
        except Exception as err:
            raise ray_failure("encoder", err) from None

    async def generate(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        generator = self.stages.llm.generate.options(
            num_returns="streaming", _generator_backpressure_num_objects=self.llm_queue_size,
        ).remote(request)
        while True:
            try:
                ref = await generator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as err:
                raise ray_failure("llm", err) from None
            try:
                item = await ref
            except Exception as err:
                raise ray_failure("llm", err) from None
            yield item

    async def push(self, chunk: CodesChunk) -> PCMChunk:
        try:
            return await self.stages.decoder.push.remote(chunk)
        except Exception as err:
            raise ray_failure("decoder", err) from None

    def close(self, request_id: str) -> None:
        _fire(self.stages.decoder.close, request_id)

    def abort(self, request_id: str) -> None:
        _fire(self.stages.llm.abort, request_id)


def _fire(method, *args) -> None:
    try:  # a dead stage is ignored: there is nothing left to free on it
        method.remote(*args)
    except Exception:
        pass


class Pipeline(SpeechAPI):
    """tts / asr / chat (sync and `*_async`, see `SpeechAPI`) over the three stage actors."""

    def __init__(self, config: PipelineConfig, stages: StageHandles):
        self.config = config
        self.stages = stages
        self.clients = RayStageClients(stages, config.llm.queue_size)
        self.limits = Limits.of(config)
        self.bridge = LoopThread("vita-pipeline")  # drives the async API for the sync one

    @classmethod
    def start(cls, config: PipelineConfig) -> "Pipeline":
        """Place and start the stage actors (Ray must be initialised), then return the pipeline."""
        return cls(config, build_stages(config))

    def shutdown(self) -> None:
        """Kill the stage actors and free their placement group."""
        shutdown_stages(self.stages)
        self.bridge.stop()

    def placement(self) -> dict[str, StagePlacement]:
        refs = [self.stages.get(stage).placement.remote() for stage in STAGES]
        return dict(zip(STAGES, ray.get(refs, timeout=self.config.stage_timeout_s)))

    def stats(self) -> dict[str, dict]:
        refs = [self.stages.get(stage).stats.remote() for stage in STAGES]
        return dict(zip(STAGES, ray.get(refs, timeout=self.config.stage_timeout_s)))

    def check_health(self) -> None:
        ray.get([self.stages.get(stage).check_health.remote() for stage in STAGES], timeout=self.config.stage_timeout_s)
