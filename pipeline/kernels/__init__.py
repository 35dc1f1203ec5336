"""Optional faster implementations of pieces of a decode step, registered by name and chosen at load.

As transformers does with its attention interface: the model (`pipeline.llm`) always has a plain path and
never decides which implementation runs; `load_llm(..., kernels="auto")` (or `model.set_decode_kernels(name)`)
picks a registered `DecodeKernels` for the device. Each implementation gives the plain path's outputs
(within float rounding) and may decline a call (return None) where it would not be faster.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeKernels:
    """What a kernel set takes over; None = the model's plain path."""

    attention: str | None = None  # an AttentionInterface name used where the model's config says "sdpa"
    lm_head: Callable | None = None  # (model, hidden [rows, H], lo, hi) -> float32 [rows, hi - lo] | None
    mtp_modules: Callable | None = None  # (model, modules, hidden, next_embeds, position_ids, mask, cache) -> out | None


PLAIN = DecodeKernels()
KERNELS: dict[str, DecodeKernels] = {"plain": PLAIN}


def register_kernels(name: str, kernels: DecodeKernels) -> None:
    KERNELS[name] = kernels


def kernels_for(name: str, device_type: str) -> DecodeKernels:
    """The kernel set `name` ("auto": the device's own set if one is registered, else "plain")."""
    if name in ("auto", "cpu"):
        import pipeline.kernels.cpu  # noqa: F401  (registers "cpu")
    if name == "auto":
        name = device_type if device_type in KERNELS else "plain"
    if name not in KERNELS:
        raise ValueError(f"kernels={name!r}: expected 'auto' or one of {sorted(KERNELS)}")
    return KERNELS[name]
