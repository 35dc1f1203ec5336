"""One Serve deployment per stage, built from the plain stage classes at build time, and the adapter that
lets `actors.orchestration.run_request` drive them through DeploymentHandles (no copy of the data path).

Each stage gets its own resources and autoscaling config (the LLM is KV-bound, the decoder FLOP-bound).
Note: a decoder stream lives on one replica; with several decoder replicas use session affinity (not yet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

from ray import serve

from actors.builder import STAGE_CLASSES
from actors.config import STAGES, PipelineConfig
from actors.orchestration import StageFailure
from actors.payloads import AudioPayload, DecodeChunk, LLMOutput, PCMChunk, SpeechRequest


@dataclass
class StageScaling:
    """Serve options of one stage deployment."""

    num_gpus: float = 0.0
    num_cpus: float = 0.0
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    max_ongoing_requests: int = 64

    def options(self, name: str) -> dict:
        autoscaling = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                       "target_ongoing_requests": self.target_ongoing_requests,
                       "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}
        return dict(name=name, ray_actor_options={"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
                    autoscaling_config=autoscaling, max_ongoing_requests=self.max_ongoing_requests,
                    health_check_period_s=2.0)


def stage_application(stage: str, config: PipelineConfig, scaling: StageScaling):
    """The bound deployment of one stage: its plain class wrapped by Serve, built with its stage config."""
    deployment = serve.deployment(STAGE_CLASSES[stage]).options(**scaling.options(f"vita-{stage}"))
    return deployment.bind(config.stage(stage))


def _failure(stage: str, err: BaseException) -> StageFailure:
    if isinstance(err, StageFailure):
        return err
    text = str(err).strip().splitlines()
    return StageFailure(stage, f"{stage} stage failed: {type(err).__name__}: {text[-1] if text else ''}")


class ServeStageClients:
    """`actors.orchestration.StageClients` over the three stage DeploymentHandles."""

    def __init__(self, encoder, llm, decoder):
        self.encoder, self.llm, self.decoder = encoder, llm, decoder

    async def tokenize(self, audio: AudioPayload) -> list[int]:
        try:
            return await self.encoder.tokenize.remote(audio)
        except Exception as err:
            raise _failure("encoder", err) from None

    async def generate(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        stream = self.llm.options(stream=True).generate.remote(request)
        try:
            while True:
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as err:
                    raise _failure("llm", err) from None
                yield item
        finally:
            stream.cancel()

    async def push(self, chunk: DecodeChunk) -> PCMChunk:
        try:
            return await self.decoder.push.remote(chunk)
        except Exception as err:
            raise _failure("decoder", err) from None

    def close(self, request_id: str) -> None:
        _fire(self.decoder.close, request_id)

    def abort(self, request_id: str) -> None:
        _fire(self.llm.abort, request_id)

    async def check_health(self) -> dict[str, str]:
        """Each stage's state ("ok" or the error)."""
        states = {}
        for stage in STAGES:
            try:
                await getattr(self, stage).check_health.remote()
                states[stage] = "ok"
            except Exception as err:
                states[stage] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return states


def _fire(method, *args) -> None:
    try:
        method.remote(*args)
    except Exception:
        pass
