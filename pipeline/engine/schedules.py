"""Decode schedules (spec §3.1): `mtp_inference_mode` lists such as Boost [1, 10, 4, 10], the named modes,
the checkpoint's default, and the expanded "M mmmmmmmmmm MMMM ..." action string the engine follows."""
from __future__ import annotations

import json
import operator
import os

from pipeline.tokens.chat import MODES

EXACT = "exact"  # lossless MCTP: draft with every module, verify with the backbone


def check_mode_list(mode) -> list[int]:
    try:
        values = [operator.index(v) for v in mode]
    except TypeError:
        raise ValueError(
            f"mode must be a name, a list of integers or a string like '1,10,4,10', got {mode!r}"
        ) from None
    if len(values) < 2 or len(values) % 2:
        raise ValueError(f"mode {values} must have an even length >= 2: [M1, m1, M2, m2, ...]")
    if any(v < 0 for v in values):
        raise ValueError(f"mode {values} has a negative count")
    if values[0] < 1:
        raise ValueError(f"mode {values} must start with a backbone step (M1 >= 1): the prompt needs a prefill")
    if values[-2] + values[-1] < 1:
        raise ValueError(f"mode {values}: the last (M, m) pair repeats and must not be (0, 0)")
    return values


def checkpoint_default_mode(model) -> list[int]:
    """generation_config `mtp_inference_mode` of the checkpoint, else [1, N] (the original's fallback)."""
    gen = getattr(model, "generation_config", None)
    mode = getattr(gen, "mtp_inference_mode", None) if gen is not None else None
    if mode is None:
        path = os.path.join(str(getattr(model, "name_or_path", "") or ""), "generation_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                mode = json.load(f).get("mtp_inference_mode")
    if mode is None:
        return [1, model.config.num_nextn_predict_layers]
    return check_mode_list(mode)


def resolve_mode(mode, model) -> list[int] | str:
    """A mode name (vanilla, balance, boost, turbo, exact), a list, or a string "1,10,4,10" -> list or "exact".

    None = the checkpoint default. Raises ValueError on anything else.
    """
    if mode is None:
        return checkpoint_default_mode(model)
    if isinstance(mode, str):
        name = mode.strip().lower()
        if name == EXACT:
            return EXACT
        if name in MODES:
            return list(MODES[name])
        parts = [p.strip() for p in name.strip("[]() ").split(",")]
        if len(parts) > 1 and all(p.isdigit() for p in parts):
            return check_mode_list(int(p) for p in parts)
        raise ValueError(f"unknown mode {mode!r}: use one of {sorted([*MODES, EXACT])} or a list like '1,10,4,10'")
    if isinstance(mode, (list, tuple)):
        return check_mode_list(mode)
    raise ValueError(f"mode must be a name, a list of integers or None, got {type(mode).__name__} {mode!r}")


def expand_schedule(mode: list[int], length: int) -> str:
    """[M1, m1, M2, m2, ...] -> "M"*M1 + "m"*m1 + ... with the last pair repeated, cut to `length` chars."""
    values = check_mode_list(mode)
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an integer >= 0, got {length!r}")
    pieces, total = [], 0
    pairs = list(zip(values[::2], values[1::2]))
    for i, (M, m) in enumerate(pairs):
        if total >= length:
            break
        if i == len(pairs) - 1:
            period = "M" * M + "m" * m
            repeats = -(-(length - total) // len(period))
            pieces.append(period * repeats)
        else:
            pieces.append("M" * M + "m" * m)
        total += len(pieces[-1])
    return "".join(pieces)[:length]


def m_run(schedule: str, start: int) -> int:
    """Number of consecutive 'm' in `schedule` from index `start`."""
    n = 0
    while start + n < len(schedule) and schedule[start + n] == "m":
        n += 1
    return n
