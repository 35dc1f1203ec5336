"""The sampling settings of one request (HF generation semantics), torch-free: a front end builds them
(actors.requests) without importing torch; `pipeline.engine.sampling` applies them."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SamplingParams:
    """HF generation settings of one request. greedy=True ignores temperature / top_k / top_p."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; HF semantics (divide positive scores, multiply negative)
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self):
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be a bool, got {self.greedy!r}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        rp = self.repetition_penalty
        if not (isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
