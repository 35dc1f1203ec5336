"""Where a stage runs: its torch device and dtype, and a report of node, IP and GPU ids. Nothing here imports ray.

The stage classes take their device and dtype as arguments; whoever builds a stage picks them. On Ray (the
stage actors of `actors.builder`, the Serve deployments, the batch and prepare actor pools) that is
`actors.ray_runtime.ray_device`: Ray sets CUDA_VISIBLE_DEVICES to the GPU ids it assigned an actor, so inside
the actor its GPU is always `cuda:0`. On a machine without CUDA (or with logical GPUs declared to a local Ray)
the stage runs on CPU in float32; on a GPU in bfloat16, the dtype of the released checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class StagePlacement:
    stage: str
    node_id: str  # Ray node id ("" outside Ray)
    ip: str
    gpu_ids: list[str]  # ids Ray assigned (logical on a GPU-less machine)
    cuda_visible_devices: str | None
    device: str  # torch device the stage computes on
    dtype: str
    pid: int
    actor_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def device_for(gpu_ids: list[str]) -> tuple[torch.device, torch.dtype]:
    """cuda:0 (bf16) when CUDA exists and the worker was given a GPU, else CPU (fp32)."""
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0), torch.bfloat16
    return torch.device("cpu"), torch.float32


@dataclass(frozen=True)
class Where:
    """The node a stage's process runs on, as its runtime reports it ("" and loopback outside Ray)."""

    node_id: str = ""
    ip: str = "127.0.0.1"
    gpu_ids: list[str] = field(default_factory=list)
    actor_id: str = ""


def describe(stage: str, device: torch.device, dtype: torch.dtype, where: Where = Where()) -> StagePlacement:
    return StagePlacement(
        stage=stage,
        node_id=where.node_id,
        ip=where.ip,
        gpu_ids=list(where.gpu_ids),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        pid=os.getpid(),
        actor_id=where.actor_id,
    )
