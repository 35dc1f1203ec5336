"""One Serve deployment per stage, built from the plain stage classes at build time, and the adapter that
lets `actors.orchestration.run_request` drive them through DeploymentHandles (no copy of the data path).

Each stage gets its own resources and autoscaling config (the LLM is KV-bound, the decoder FLOP-bound) and a
cap on the requests waiting for it at each caller (`max_queued_requests`): beyond it Serve refuses at once
(BackPressureError) instead of letting requests pile up. The adapter records each stage's queue time (until
a replica took the call) and in-flight calls (serve.metrics).

A decoder stream (flow-matching + vocoder state) lives on the replica that got the request's first chunk; the
decoder deployment routes by request id (`serve.decoder_router.DecoderStreamRouter`), so every later chunk of
the request reaches that replica and the decoder scales out by replicas like the other stages.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated, AsyncIterator

from pydantic import AfterValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ray import serve

from actors.builder import STAGE_CLASSES
from actors.config import STAGES, PipelineConfig
from actors.handles import HandleStageClients, stage_failure
from actors.orchestration import ChunkGate
from actors.payloads import CodesChunk, LLMOutput, PCMChunk, SpeechRequest
from serve import metrics

HEALTH_TIMEOUT_S = 3.0  # a stage whose replica is gone (calls wait for a new one) counts as down after this


def _queue_cap(value: int) -> int:
    if value != -1 and value < 1:
        raise ValueError(f"{value}: a queue cap is -1 (no cap) or at least 1")  # Serve refuses 0 at deploy time
    return value


QueueCap = Annotated[int, AfterValidator(_queue_cap)]  # Serve's max_queued_requests


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class Autoscaling:
    """Serve's autoscaling of one deployment's replicas on the requests each holds: typed once for the stages and
    the ingress."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float = Field(10.0, gt=0)  # how often callers push the load metrics autoscaling uses

    def __post_init__(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")

    def autoscaling_config(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1), "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s, "metrics_interval_s": self.metrics_interval_s}


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class StageScaling(Autoscaling):
    """One stage deployment's resources and autoscaling: typed once, for the app args (`serve.app.Args`, the Serve
    config's `args:`), `vita-audio serve` and `vita-audio plan --write-config`."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = None  # e.g. "L40S": pin the stage to that GPU type (a cluster-only setting)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: QueueCap = 64  # per caller (the ingress); beyond it: BackPressureError, -1 = no cap
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)  # a stopping replica's requests get this long to finish
    env_vars: dict[str, str] = Field(default_factory=dict)  # the app's env_vars (set by serve.app.Args)

    def options(self, name: str) -> dict:
        autoscaling = self.autoscaling_config()
        actor = {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}
        if self.accelerator_type:
            actor["accelerator_type"] = self.accelerator_type
        if self.env_vars:
            actor["runtime_env"] = {"env_vars": dict(self.env_vars)}
        return dict(name=name, ray_actor_options=actor, autoscaling_config=autoscaling,
                    max_ongoing_requests=self.max_ongoing_requests, max_queued_requests=self.max_queued_requests,
                    health_check_period_s=self.health_check_period_s,
                    health_check_timeout_s=self.health_check_timeout_s,
                    graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5)


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class IngressReplicas(Autoscaling):
    """How many ingress replicas, scaled by Serve on the requests each holds (like the stages). Replicas keep
    nothing a later request needs (state: serve.state, shared by all), so any replica serves any request."""

    min_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(64.0, gt=0)


@dataclass
class IngressScaling:
    """The ingress: its replicas, requests per replica, the proxy's wait queue and the Retry-After of its 503s."""

    max_ongoing_requests: int = 256
    max_queued_requests: int = 64
    retry_after_s: float = 1.0
    num_cpus: float = 0.0
    graceful_shutdown_timeout_s: float = 5.0
    env_vars: dict = field(default_factory=dict)
    replicas: IngressReplicas = field(default_factory=IngressReplicas)


def ingress_options(scaling: IngressScaling) -> dict:
    """Beyond max_ongoing + max_queued requests the proxy answers 503 with Retry-After (Serve's backpressure)."""
    actor = {"num_cpus": scaling.num_cpus}
    if scaling.env_vars:
        actor["runtime_env"] = {"env_vars": dict(scaling.env_vars)}
    return dict(name="vita-ingress", ray_actor_options=actor, autoscaling_config=scaling.replicas.autoscaling_config(),
                max_ongoing_requests=scaling.max_ongoing_requests,
                max_queued_requests=scaling.max_queued_requests,
                backpressure_config={"status_code": 503, "retry_after_s": scaling.retry_after_s},
                graceful_shutdown_timeout_s=scaling.graceful_shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5)


def stage_application(stage: str, config: PipelineConfig, scaling: StageScaling):
    """The bound deployment of one stage: its Ray form (`actors.builder.STAGE_CLASSES`: device and dtype from
    the GPU Serve's replica was given, else CPU fp32) wrapped by Serve, built with its stage config (the
    decoder with request-id routing: a request's chunks go to the replica holding its stream)."""
    options = scaling.options(f"vita-{stage}")
    if stage == "decoder":
        from ray.serve.config import RequestRouterConfig

        from serve.decoder_router import ROUTER_CLASS

        options["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER_CLASS)
    deployment = serve.deployment(STAGE_CLASSES[stage]).options(**options)
    return deployment.bind(config.stage(stage))


async def _assigned(response) -> None:
    """Wait until Serve assigned the call to a replica (the routing queue; raises BackPressureError)."""
    fetch = getattr(response, "_fetch_future_result_async", None)  # cached: awaiting the response reuses it
    if fetch is not None:
        await fetch()


class ServeStageClients(HandleStageClients):
    """`actors.orchestration.StageClients` over the three stage DeploymentHandles (error translation:
    `actors.handles`); records each stage's queue time and in-flight calls."""

    def __init__(self, encoder, llm, decoder):
        super().__init__(encoder, llm, decoder)
        self.in_flight = {stage: 0 for stage in STAGES}
        self.chunk_gate = ChunkGate()  # a request's chunks accepted in order, a refused one resent

    async def push(self, chunk: CodesChunk) -> PCMChunk:
        """A decoder chunk sent once the request's earlier ones were accepted by a replica, resent if refused at
        capacity (`actors.orchestration.ChunkGate`): the decoder never waits for a chunk that is only queued."""

        async def submit():
            response = self.decoder.push.remote(chunk)
            try:
                await _assigned(response)
            except BaseException as err:
                _cancel(response)
                raise stage_failure("decoder", err) if isinstance(err, Exception) else err
            return response

        self._enter("decoder")
        start = time.perf_counter()
        try:
            response = await self.chunk_gate.send(chunk, submit)
            metrics.stage_queued("decoder", time.perf_counter() - start)
            try:
                return await response
            except asyncio.CancelledError:
                _cancel(response)
                raise
        except Exception as err:
            raise stage_failure("decoder", err) from None
        finally:
            self._leave("decoder")

    def close(self, request_id: str) -> None:
        self.chunk_gate.forget(request_id)
        super().close(request_id)

    async def _await(self, stage: str, response):
        self._enter(stage)
        start = time.perf_counter()
        try:
            await _assigned(response)
            metrics.stage_queued(stage, time.perf_counter() - start)
            return await response
        except asyncio.CancelledError:
            _cancel(response)
            raise
        finally:
            self._leave(stage)

    def _enter(self, stage: str) -> None:
        self.in_flight[stage] += 1
        metrics.stage_in_flight(stage, self.in_flight[stage])

    def _leave(self, stage: str) -> None:
        self.in_flight[stage] -= 1
        metrics.stage_in_flight(stage, self.in_flight[stage])

    async def _llm_stream(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        stream = self.llm.options(stream=True).generate.remote(request)
        self._enter("llm")
        start = time.perf_counter()
        try:
            await _assigned(stream)
            metrics.stage_queued("llm", time.perf_counter() - start)
            async for item in stream:
                yield item
        finally:
            self._leave("llm")
            _cancel(stream)

    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict[str, str]:
        """Each stage's state: "ok", or why not. A stage with no live replica is down: its calls would wait
        for a replacement, so a check that takes longer than `timeout_s` reports it."""

        async def one(stage: str) -> str:
            try:
                await asyncio.wait_for(getattr(self, stage).check_health.remote(), timeout_s)
                return "ok"
            except asyncio.TimeoutError:
                return f"down: no replica answered within {timeout_s:g} s (restarting?)"
            except Exception as err:
                text = str(err).strip().splitlines()
                return f"down: {type(err).__name__}: {text[-1] if text else ''}"

        states = await asyncio.gather(*(one(stage) for stage in STAGES))
        return dict(zip(STAGES, states))


def _cancel(response) -> None:
    """Cancel a handle call. Serve's `cancel()` re-raises the call's routing error when it never reached a
    replica (refused at capacity: BackPressureError), which would replace the StageBusy being raised."""
    try:
        response.cancel()
    except Exception:
        pass

