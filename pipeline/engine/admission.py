"""Admission to the LLM engine's batch: a new request joins now, or a few steps later in phase with the others."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.engine.sequence import SequenceState

__all__ = ["joins_now"]


def joins_now(seq: "SequenceState", active: list, waiting: list, align_steps: int, num_modules: int, window: int = 32,
              prefill_chunk: int = 0) -> bool:
    """Whether a new request should join now rather than wait (at most `align_steps` steps) for a better
    point of the running requests' schedules.

    A step costs one forward per kind of action in it (backbone, MCTP), so a request whose backbone steps
    fall on the others' MCTP steps (or the reverse) adds a forward to those steps for as long as they
    run together. Joining after d steps costs d steps of waiting for each of the w new requests that
    wait with it, and adds rate(d) * overlap forwards, rate(d) being the share of the next `window` steps
    where the request's action kind is not already in the step. The request joins now if d = 0 is the
    cheapest (with `align_steps` = 0: always).
    """
    if not align_steps or not active or seq.waited >= align_steps:
        return True
    N, horizon = num_modules, align_steps - seq.waited
    own = seq.future_actions(N, window, prefill_chunk)
    if own is None:
        return True
    kinds: list[set[bool]] = [set() for _ in range(window + horizon)]  # per future step: backbone? values
    remaining = 0
    for r in active:
        actions = r.future_actions(N, window + horizon, prefill_chunk)
        if actions is None:
            return True  # verifying requests' steps depend on their outputs: no basis to wait
        remaining = max(remaining, r.max_new - r.generated)
        for j, k in enumerate(actions):
            kinds[j].add(k < 0)
    w = sum(1 for other in waiting if other.slot is None)  # new requests that would wait alike
    best, best_cost = 0, None
    for d in range(horizon + 1):
        steps = [j for j in range(len(own)) if kinds[d + j]]
        if not steps:  # the running requests end before this request would join
            cost = float(d * w)
        else:
            rate = sum((own[j] < 0) not in kinds[d + j] for j in steps) / len(steps)
            cost = d * w + rate * min(seq.max_new, max(remaining - d, 0))
        if best_cost is None or cost < best_cost:
            best, best_cost = d, cost
    return best == 0
