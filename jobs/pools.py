"""One Ray Data actor pool of a job: its size, resources and rows per call."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolConfig:
    """One Ray Data actor pool of a job (batch stages, the preparation's speech encoder)."""

    size: int = 1  # actors (each loads its model once)
    num_gpus: float = 0.0  # per actor
    num_cpus: float = 0.5  # per actor (Ray's logical CPUs: a fraction lets pools share a small machine)
    batch_size: int = 8  # rows per call of the actor

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"actors per pool={self.size!r} must be an integer >= 1")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"GPUs ({self.num_gpus!r}) and CPUs ({self.num_cpus!r}) per actor must be >= 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"rows per call={self.batch_size!r} must be an integer >= 1")
