"""Build the stage actors: one placement group (a bundle per stage), `ray.remote` and resources applied here.

The stage classes stay plain and Ray-free (as Ray Serve LLM's `LLMServer`): `STAGE_CLASSES` are their Ray
forms, which take the device and dtype from the GPU Ray assigned the actor (`actors.ray_runtime.ray_device`)
and report the node they run on; the Serve deployments use the same classes. Only this builder knows Ray
options. The placement group strategy comes from the config: PACK puts the stages on one node when it fits,
SPREAD puts them on different nodes when the cluster has room (STRICT_* variants refuse otherwise). A
restarted actor comes back in its own bundle, so its GPU stays its own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import STAGES, PipelineConfig
from actors.decoder_stage import DecoderStage
from actors.encoder_stage import EncoderStage
from actors.llm_stage import LLMStage
from actors.placement import StagePlacement, describe
from actors.ray_runtime import ray_device, ray_where

logger = logging.getLogger(__name__)


class _OnRay:
    """A stage as a Ray actor or Serve replica: it computes on the device of the GPU Ray assigned it (else CPU)
    and its placement names the node, IP, GPU ids and actor id."""

    stage: str

    def __init__(self, config):
        device, dtype = ray_device()
        super().__init__(config, device=device, dtype=dtype)

    async def placement(self) -> StagePlacement:
        return describe(self.stage, self.device, self.dtype, ray_where())


class RayEncoderStage(_OnRay, EncoderStage):
    stage = "encoder"


class RayLLMStage(_OnRay, LLMStage):
    stage = "llm"


class RayDecoderStage(_OnRay, DecoderStage):
    stage = "decoder"


STAGE_CLASSES = {"encoder": RayEncoderStage, "llm": RayLLMStage, "decoder": RayDecoderStage}


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested layout (e.g. fewer GPUs than stages)."""


@dataclass
class StageHandles:
    encoder: ray.actor.ActorHandle
    llm: ray.actor.ActorHandle
    decoder: ray.actor.ActorHandle
    placement_group: PlacementGroup

    def get(self, stage: str) -> ray.actor.ActorHandle:
        return getattr(self, stage)


def stage_actor_options(config: PipelineConfig, stage: str, pg: PlacementGroup, bundle_index: int) -> dict:
    """The `.options()` of one stage actor: resources from its StageResources, placed in its bundle."""
    resources = config.stage(stage).resources
    options = dict(
        num_gpus=resources.num_gpus,
        num_cpus=resources.num_cpus,
        max_restarts=resources.max_restarts,
        max_task_retries=0,  # a call in flight when the actor dies fails (the client sees an error event)
        max_concurrency=1000,  # async actor: many requests interleave on its event loop
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
    )
    if resources.memory:
        options["memory"] = resources.memory
    if config.name_prefix:
        options["name"] = f"{config.name_prefix}{stage}"
    return options


def build_stages(config: PipelineConfig) -> StageHandles:
    """Reserve the placement group, start the three stage actors in it and wait until each is up."""
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init() (or pass --address) before building stages")
    for stage in STAGES:
        if not config.stage(stage).path:
            raise ValueError(f"config.{stage}.path is empty: use PipelineConfig.from_models_dir(DIR)")
    bundles = [config.stage(stage).resources.bundle() for stage in STAGES]
    pg = placement_group(bundles, strategy=config.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=config.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"the cluster cannot place {bundles} with strategy {config.placement_strategy} within "
            f"{config.placement_timeout_s:g} s; cluster resources: {ray.cluster_resources()}"
        ) from None
    handles = {}
    for index, stage in enumerate(STAGES):
        options = stage_actor_options(config, stage, pg, index)
        logger.info("starting %s stage with %s", stage, {k: v for k, v in options.items() if k != "scheduling_strategy"})
        handles[stage] = ray.remote(STAGE_CLASSES[stage]).options(**options).remote(config.stage(stage))
    stages = StageHandles(placement_group=pg, **handles)
    try:  # constructor errors (missing checkpoint, ...) surface here rather than at the first request
        ray.get([stages.get(stage).check_health.remote() for stage in STAGES])
    except Exception:
        shutdown_stages(stages)
        raise
    return stages


def shutdown_stages(stages: StageHandles) -> None:
    for stage in STAGES:
        try:
            ray.kill(stages.get(stage), no_restart=True)
        except Exception:  # already dead
            pass
    try:
        remove_placement_group(stages.placement_group)
    except Exception:
        pass
