"""The typed application builder: `serve run serve.app:build_app models=DIR`, serve/config.yaml and
`vita-audio serve` all start this same app (three stage deployments + the ingress holding their handles).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from actors.config import STAGES, PipelineConfig
from serve.deployments import StageScaling, stage_application


class ScalingArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)


class Args(BaseModel):
    """Arguments of the app (`key=value` on `serve run`, `args:` in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    models: str  # folder with llm/, encoder/, decoder/
    api_key: str | None = None
    max_body_bytes: int = Field(8 * 2**20, ge=1)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_text_chars: int = Field(4096, ge=1)
    max_tokens: int = Field(2048, ge=1)
    torch_threads: int | None = 1
    encoder: ScalingArgs = ScalingArgs()
    llm: ScalingArgs = ScalingArgs()
    decoder: ScalingArgs = ScalingArgs()

    def caps(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "max_audio_seconds": self.max_audio_seconds,
                "max_text_chars": self.max_text_chars, "max_tokens": self.max_tokens}


def build_app(args: Args | dict):
    """The bound Serve application (stage deployments built from the plain stage classes)."""
    from serve.ingress import Ingress

    args = args if isinstance(args, Args) else Args.model_validate(args)
    config = PipelineConfig.from_models_dir(args.models).with_resources(num_gpus=0.0,
                                                                       torch_threads=args.torch_threads)
    handles = {s: stage_application(s, config, StageScaling(**getattr(args, s).model_dump())) for s in STAGES}
    from ray import serve

    return serve.deployment(Ingress, name="vita-ingress", max_ongoing_requests=256).bind(handles["encoder"], handles["llm"], handles["decoder"],
                                                      args.caps(), args.api_key)
