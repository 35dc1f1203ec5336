"""Test helpers that watch the LLM engine through its public observer hooks (`pipeline.observe.StepObserver`)."""
from __future__ import annotations

from pipeline.engine.observe import StepObserver


class ForwardLog(StepObserver):
    """Every model call of every step, in order: (kind, rows, longest query) — kind "backbone", "mtp<k>[,...]"
    or "lm_head" (one per step, after its forwards)."""

    def __init__(self):
        self.forwards: list[tuple[str, int, int]] = []

    def on_forward(self, kind, rows, q_len, run):
        self.forwards.append((kind, rows, q_len))
        return run()
