"""Watching the LLM engine work: the `StepObserver` hooks it calls, and `RequestTrace`, the one observer the
product itself uses (the per-request forward trace `generate(trace=True)` returns, checked against the
original's in the parity tests). Timing and other measurement observers live with the benchmarks and tests.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

__all__ = ["StepObserver", "RequestTrace"]

T = TypeVar("T")


class StepObserver:
    """Hooks the engine calls while it steps; override the ones you need (each default does nothing).

    `record_logits = True` asks for each row's logits in `on_request_forward`, which makes every step score
    the whole vocabulary (the choice is the same, the step a little slower).
    """

    record_logits: bool = False

    def on_forward(self, kind: str, rows: int, q_len: int, run: Callable[[], T]) -> T:
        """Wraps each model call of a step: `kind` "backbone", "mtp<k>[,<k>...]" (the modules in it), "prefill"
        (pieces of long prompts), "prefill-mtp<k>[,...]" (pieces of the modules' catch-up over them) or "lm_head"
        (none in a step where only pieces ran); `rows` requests, `q_len` the longest query. Must return `run()`."""
        return run()

    def on_request_forward(self, request_id: str, producer: str, q_len: int, pos_first: int,
                           logits: torch.Tensor | None) -> None:
        """One request's part of a forward: its producer ("backbone" | "mtp<k>"), query length and first rotary
        position; `logits` (one row, float32) when `record_logits` and the request does not verify drafts (None
        for a piece of a long prompt or catch-up, which chooses no token)."""

    def on_step(self, events: list) -> None:
        """The end of a step, with the events it produced."""

    def on_finish(self, request_id: str, hidden_state_lengths: list[int]) -> None:
        """A request ended (stop or length): rows of its backbone and of each module's outputs."""

    def on_abort(self, request_id: str) -> None:
        """A request was aborted."""


class RequestTrace(StepObserver):
    """Every forward of every request: producer, q_len, first and last rotary position (and logits if asked).

    A finished request's trace is kept until read with `pop` (the keys of `GenerationResult.trace`)."""

    def __init__(self, logits: bool = False):
        self.record_logits = logits
        self.running: dict[str, dict] = {}
        self.finished: dict[str, dict] = {}

    def on_request_forward(self, request_id, producer, q_len, pos_first, logits) -> None:
        trace = self.running.get(request_id)
        if trace is None:
            trace = self.running[request_id] = {"producer": [], "q_len": [], "pos_first": [], "pos_last": []}
            if self.record_logits:
                trace["logits"] = []
        trace["producer"].append(producer)
        trace["q_len"].append(q_len)
        trace["pos_first"].append(pos_first)
        trace["pos_last"].append(pos_first + q_len - 1)
        if self.record_logits and logits is not None:
            trace["logits"].append(logits.detach().float().cpu())

    def on_finish(self, request_id, hidden_state_lengths) -> None:
        trace = self.running.pop(request_id, None)
        if trace is not None:
            trace["hidden_state_lengths"] = list(hidden_state_lengths)
            self.finished[request_id] = trace

    def on_abort(self, request_id) -> None:
        self.running.pop(request_id, None)

    def pop(self, request_id: str) -> dict | None:
        """The trace of a finished request, removed once read (None if it did not finish)."""
        return self.finished.pop(request_id, None)
