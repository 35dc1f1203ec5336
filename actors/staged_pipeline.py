"""The staged pipeline on Ray: encoder -> LLM (+MCTP) -> decoder actors, streaming end to end.

    pipe = StagedPipeline.start(PipelineConfig.from_models_dir(models))
    for event in pipe.tts("Hello there."):        # TextDelta | AudioChunk | Done | ErrorEvent
        ...
    result = collect(pipe.chat("question.wav"))    # text, concatenated PCM, usage and timings

The data path itself is `actors.orchestration.run_request`; this module only adapts Ray actor handles
to its `StageClients` protocol (`RayStageClients`; what Ray raises becomes a stage-named failure in
`actors.handles`, shared with the Serve deployment handles). Ray holds at most `llm.queue_size` unread
items of the LLM generator, and the LLM stage stops stepping while a request's queue is full, so
backpressure reaches the engine.

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
from actors.handles import HandleStageClients
from actors.orchestration import Limits, SpeechAPI
from actors.requests import model_caps
from actors.payloads import LLMOutput, SpeechRequest
from actors.placement import StagePlacement
from actors.results import SpeechResult, collect, collect_async  # noqa: F401  (re-exported)


class RayStageClients(HandleStageClients):
    """`StageClients` over the three stage actors' handles (error translation: `actors.handles`)."""

    def __init__(self, stages: StageHandles, llm_queue_size: int):
        super().__init__(stages.encoder, stages.llm, stages.decoder)
        self.llm_queue_size = llm_queue_size

    async def _llm_stream(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        generator = self.llm.generate.options(
            num_returns="streaming", _generator_backpressure_num_objects=self.llm_queue_size,
        ).remote(request)
        async for ref in generator:
            yield await ref


class StagedPipeline(SpeechAPI):
    """tts / asr / chat (sync and `*_async`, see `SpeechAPI`) over the three stage actors."""

    def __init__(self, config: PipelineConfig, stages: StageHandles):
        self.config = config
        self.stages = stages
        self.clients = RayStageClients(stages, config.llm.queue_size)
        self.limits = Limits.of(config)
        self.caps = model_caps(config.llm.path)  # the request policy's model caps (actors.requests)
        self.bridge = LoopThread("vita-pipeline")  # drives the async API for the sync one

    @classmethod
    def start(cls, config: PipelineConfig) -> "StagedPipeline":
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
