"""One typed config for the staged pipeline: where each stage runs (resources) and how it behaves.

Deployment settings only; the topology (encoder -> LLM -> decoder) stays in code. The same dataclasses
serve the CLI, the benchmark and (later) Ray Serve, so a layout is written once:

    PipelineConfig.from_models_dir("models/")            # llm/, encoder/, decoder/ folders
    PipelineConfig(..., placement_strategy="SPREAD")     # one stage per node when the cluster allows
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
STAGES = ("encoder", "llm", "decoder")


@dataclass
class StageResources:
    """What one stage actor asks Ray for. Fractional GPUs are allowed (two stages may then share a card)."""

    num_gpus: float = 1.0  # one GPU per stage is the reference layout (DESIGN.md)
    num_cpus: float = 0.0  # Ray's own running default for actors; raise it to reserve cores
    memory: int | None = None  # bytes of heap to reserve (Ray's logical `memory` resource), None = no claim
    max_restarts: int = 3  # a dead stage is restarted this often; requests in flight end with an error event
    torch_threads: int | None = None  # torch.set_num_threads inside the actor (None: leave torch's default)

    def __post_init__(self):
        if self.num_gpus < 0 or (self.num_gpus > 1 and self.num_gpus != int(self.num_gpus)):
            raise ValueError(f"num_gpus={self.num_gpus!r} must be >= 0 and a whole number when above 1")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus={self.num_cpus!r} must be >= 0")
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"memory={self.memory!r} must be a positive number of bytes or None")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts={self.max_restarts!r} must be >= -1 (-1 = restart forever)")

    def bundle(self) -> dict[str, float]:
        """The placement-group bundle this stage occupies (Ray rejects empty bundles, so CPU-only gets a sliver)."""
        bundle = {}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        if self.num_cpus:
            bundle["CPU"] = self.num_cpus
        if self.memory:
            bundle["memory"] = self.memory
        return bundle or {"CPU": 0.01}


@dataclass
class EncoderStageConfig:
    path: str = ""  # glm-4-voice-tokenizer folder
    resources: StageResources = field(default_factory=StageResources)
    max_batch_size: int = 8  # waveforms encoded in one forward (concurrent requests are batched)


@dataclass
class LLMStageConfig:
    path: str = ""  # VITA-Audio LLM folder (config.json + safetensors + tokenizer)
    resources: StageResources = field(default_factory=StageResources)
    max_batch_size: int = 16  # requests sharing one decode step (continuous batching)
    # a new request may wait up to this many steps to join in phase with the running ones (one forward per
    # step instead of two; costs at most one schedule period of time to first token, only under load). 0 = off
    align_steps: int = 16
    # an idle engine starts once no new request came for this long (at most 4x this): a burst starts together
    admission_wait_s: float = 0.003
    engine_thread: bool | None = None  # steps on a worker thread (True) or inline (False); None = by step time
    queue_size: int = 4  # per-request output items buffered before the engine waits for that consumer
    stall_timeout_s: float = 30.0  # a consumer that takes nothing for this long is aborted (frees its KV cache)
    # output is sent at most this often, merged into fewer items; a stream's first item, its first audio chunk
    # and its end go at once. 0 = every step's output at once. 50 ms is also Ray Serve LLM's default response
    # batching (RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS): each item costs a Ray report beside the decode steps
    stream_interval_s: float = 0.05

    def __post_init__(self):
        if not isinstance(self.align_steps, int) or self.align_steps < 0:
            raise ValueError(f"align_steps={self.align_steps!r} must be an integer >= 0")
        for name in ("admission_wait_s", "stream_interval_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")


@dataclass
class DecoderStageConfig:
    path: str = ""  # glm-4-voice-decoder folder
    resources: StageResources = field(default_factory=StageResources)
    max_batch_size: int = 8  # chunks of different streams decoded in one forward
    n_steps: int = 10  # flow-matching ODE steps per chunk
    seed: int = 42  # noise seed of each stream (same seed -> same audio)
    stream_kind: str = "incremental"  # incremental | glm4voice | vita_prefix (pipeline.decoder streams)
    idle_timeout_s: float = 300.0  # a stream nobody pushes to for this long is freed
    # a chunk waiting this long for the stream's earlier ones fails (a lost stream; senders never let a chunk pass
    # an earlier one that is only queued or refused at capacity: actors.orchestration.ChunkGate)
    chunk_wait_s: float = 10.0


@dataclass
class PipelineConfig:
    encoder: EncoderStageConfig = field(default_factory=EncoderStageConfig)
    llm: LLMStageConfig = field(default_factory=LLMStageConfig)
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    placement_strategy: str = "PACK"  # PACK: one node if it fits; SPREAD: stages on different nodes if possible
    placement_timeout_s: float = 60.0  # waiting for the placement group (too few GPUs -> a clear error)
    request_timeout_s: float = 600.0  # a whole request (all stages) must finish within this
    stage_timeout_s: float = 60.0  # no progress from a stage for this long ends the request with an error
    # audio chunks sent to the decoder and not yet taken, per request (exactly: the decoder's caps are sized on it)
    max_inflight_chunks: int = 2
    name_prefix: str = ""  # actor names ("" = anonymous actors)

    def __post_init__(self):
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy={self.placement_strategy!r}; expected one of {PLACEMENT_STRATEGIES}")
        for name in ("request_timeout_s", "stage_timeout_s", "placement_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive")
        if self.max_inflight_chunks < 1:
            raise ValueError(f"max_inflight_chunks={self.max_inflight_chunks!r} must be >= 1")

    @classmethod
    def from_models_dir(cls, root: str | os.PathLike, **overrides) -> "PipelineConfig":
        """Stage paths from a folder holding llm/, encoder/, decoder/ (the tiny set's and the README's layout)."""
        root = Path(root)
        missing = [name for name in STAGES if not (root / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"models folder {str(root)!r} lacks {', '.join(m + '/' for m in missing)}")
        config = cls(**overrides)
        config.encoder.path = str(root / "encoder")
        config.llm.path = str(root / "llm")
        config.decoder.path = str(root / "decoder")
        return config

    def stage(self, name: str):
        if name not in STAGES:
            raise ValueError(f"stage={name!r}; expected one of {STAGES}")
        return getattr(self, name)

    def with_resources(self, **fields) -> "PipelineConfig":
        """A copy with the same StageResources fields changed on every stage (e.g. num_gpus=0 for CPU-only)."""
        config = dataclasses.replace(self)
        for name in STAGES:
            stage = dataclasses.replace(self.stage(name), resources=dataclasses.replace(self.stage(name).resources, **fields))
            setattr(config, name, stage)
        return config
