"""Where a stage runs: its torch device from what Ray assigned it, and a report of node, IP and GPU ids.

Ray sets CUDA_VISIBLE_DEVICES to the GPU ids it assigned an actor, so inside the actor its GPU is always
`cuda:0`. On a machine without CUDA (or with logical GPUs declared to a local Ray) the stage runs on
CPU in float32; on a GPU in bfloat16, the dtype of the released checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

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


def assigned_gpu_ids() -> list[str]:
    """GPU ids Ray assigned the current worker ([] outside Ray or without GPUs)."""
    import ray

    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def stage_device(gpu_ids: list[str] | None = None) -> tuple[torch.device, torch.dtype]:
    """cuda:0 (bf16) when CUDA exists and Ray gave this worker a GPU, else CPU (fp32)."""
    gpu_ids = assigned_gpu_ids() if gpu_ids is None else gpu_ids
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0), torch.bfloat16
    return torch.device("cpu"), torch.float32


def describe(stage: str, device: torch.device, dtype: torch.dtype) -> StagePlacement:
    import ray

    node_id, ip, actor_id = "", "127.0.0.1", ""
    if ray.is_initialized():
        context = ray.get_runtime_context()
        node_id = context.get_node_id()
        actor_id = context.get_actor_id() or ""
        ip = ray.util.get_node_ip_address()
    return StagePlacement(
        stage=stage,
        node_id=node_id,
        ip=ip,
        gpu_ids=assigned_gpu_ids(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        pid=os.getpid(),
        actor_id=actor_id,
    )
