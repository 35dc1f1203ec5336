"""The typed application builder: `serve run serve.app:build_app models=DIR`, serve/config.yaml (`serve run
serve/config.yaml`, the RayService's serveConfigV2) and `vita-audio serve` all start this same app: three
stage deployments + the ingress holding their handles.
"""
from __future__ import annotations


import dataclasses

from pydantic import BaseModel, ConfigDict, Field

from actors.config import STAGES, PipelineConfig
from serve.deployments import IngressScaling, QueueCap, StageScaling, ingress_options, stage_application


class Args(BaseModel):
    """Arguments of the app (`key=value` on `serve run`, `args:` in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    models: str | None = None  # folder with llm/, encoder/, decoder/; None: $VITA_AUDIO_MODELS, else the tiny set
    api_key: str | None = None
    max_body_bytes: int = Field(8 * 2**20, ge=1)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_text_chars: int = Field(4096, ge=1)
    max_tokens: int = Field(2048, ge=1)
    # the request limits of every front end (actors.orchestration.Limits, from PipelineConfig: same defaults)
    request_timeout_s: float = Field(PipelineConfig.request_timeout_s, gt=0)
    stage_timeout_s: float = Field(PipelineConfig.stage_timeout_s, gt=0)
    max_inflight_chunks: int = Field(PipelineConfig.max_inflight_chunks, ge=1)
    torch_threads: int | None = 1
    # the ingress: requests it runs at once per replica, and how many wait at the proxy beyond that before the
    # proxy answers 503 with Retry-After (in OpenAI's error JSON: serve.proxy_errors). Keep it above the stages'
    # caps (their max_ongoing + max_queued): requests beyond a stage's capacity are then refused by the ingress,
    # at once, as 503 in OpenAI's error shape with Retry-After; this is the last guard against piling up
    max_concurrent_requests: int = Field(256, ge=1)
    max_waiting_requests: QueueCap = 64
    retry_after_s: float = Field(1.0, ge=0)
    env_vars: dict[str, str] = {}  # set in every replica of the app (e.g. Serve's metric push intervals)
    encoder: StageScaling = Field(default_factory=StageScaling)
    llm: StageScaling = Field(default_factory=StageScaling)
    decoder: StageScaling = Field(default_factory=StageScaling)

    def caps(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "max_audio_seconds": self.max_audio_seconds,
                "max_text_chars": self.max_text_chars, "max_tokens": self.max_tokens}

    def stage_scaling(self, stage: str) -> StageScaling:
        return dataclasses.replace(getattr(self, stage), env_vars={**getattr(self, stage).env_vars, **self.env_vars})

    def ingress_scaling(self) -> IngressScaling:
        return IngressScaling(max_ongoing_requests=self.max_concurrent_requests,
                              max_queued_requests=self.max_waiting_requests, retry_after_s=self.retry_after_s,
                              env_vars=dict(self.env_vars))

    def pipeline_config(self) -> PipelineConfig:
        """The stages' config: the models folder, the request limits; stages on CPU unless scaled onto GPUs."""
        return PipelineConfig.from_models_dir(
            self.models_dir(), request_timeout_s=self.request_timeout_s, stage_timeout_s=self.stage_timeout_s,
            max_inflight_chunks=self.max_inflight_chunks,
        ).with_resources(num_gpus=0.0, torch_threads=self.torch_threads)

    def models_dir(self) -> str:
        if self.models:
            return self.models
        from pipeline.tiny import default_models_dir

        return str(default_models_dir())


def build_app(args: Args | dict):
    """The bound Serve application (stage deployments built from the plain stage classes)."""
    from ray import serve

    from actors.orchestration import Limits
    from serve.ingress import Ingress

    args = args if isinstance(args, Args) else Args.model_validate(args)
    config = args.pipeline_config()
    handles = {s: stage_application(s, config, args.stage_scaling(s)) for s in STAGES}
    ingress = serve.deployment(Ingress).options(**ingress_options(args.ingress_scaling()))
    return ingress.bind(handles["encoder"], handles["llm"], handles["decoder"], args.caps(), args.api_key,
                        Limits.of(config), config.llm.path)
