"""The OpenAI Batch API's job: the batch job of `vita-audio batch` (`jobs.batch.job.run_batch`), task "requests".

    summary = run_openai_batch(OpenAIBatchConfig(folder="files/batches/batch_ab12"))

The endpoint (`serve.routes_batch`) writes the lines it accepts to `FOLDER/requests.jsonl`, one spec a line
(`jobs.batch.lines` documents them). This module only maps the endpoint's settings onto a `BatchConfig` and
reads the folder back in the endpoint's terms; the job itself is `run_batch`'s: the lines cut into blocks of
`block_size`, streamed through its stage pools (SpeechEncoder for the lines' clips, SpeechLLM building each
line's request with the one request builder from the line's own options, AudioDecoder for spoken answers),
block b's rows written whole to `FOLDER/results/part-<b>.parquet` once every line of the block has its row.
A greedy line gives what the same request sent online gives (`actors.orchestration.run_request` builds it the
same way). A line that fails (bad audio, a refused option, a stage failure) is an error row naming its stage;
it never fails the job.

- **Resume:** a driver that dies part-way leaves whole blocks only; the next run processes only the blocks
  without a file (a line written is never run again).
- **Cancel** (`request_cancel`: `FOLDER/cancel`) stops at a block boundary: the blocks written stay, the rest
  is never started.
- **Progress:** `FOLDER/progress.json` counts the lines written so far (the endpoint's `request_counts`).
- **Audio out:** each spoken answer is float32 PCM in one `.npy` file under `FOLDER/audio/`; a row's `audio` is
  its location, a local path or a URL when FOLDER is on an object store: `read_pcm(row["audio"])` opens either.

FOLDER may be a local path or a URL (`s3://bucket/batches/b1`, `jobs.storage`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from jobs.batch.job import BatchConfig, cancel_requested, request_cancel, run_batch
from jobs.batch.lines import (
    REQUESTS,
    RESULT_SCHEMA,
    LineError,
    admit_clip,
    read_pcm,
    read_ref,
    read_specs,
    result_row,
    write_specs,
)
from jobs.batch.results import PROGRESS
from jobs.batch.results import read_results as read_job_results
from jobs.pools import PoolConfig
from jobs.storage import location

__all__ = ["RESULT_SCHEMA", "LineError", "OpenAIBatchConfig", "admit_clip", "cancel_requested", "read_pcm",
           "read_progress", "read_ref", "read_results", "read_specs", "request_cancel", "run_openai_batch",
           "write_specs"]
STAGE_POOLS = 3  # the job's pools (encoder, LLM, decoder) share the endpoint's `pool` resources


@dataclass
class OpenAIBatchConfig:
    folder: str  # the batch's run folder (requests.jsonl in; results/, audio/, progress.json out)
    models: str | None = None  # folder with llm/, encoder/, decoder/ (None: $VITA_AUDIO_MODELS or the tiny set)
    max_new_tokens_cap: int | None = None  # the endpoint's caps (its max_tokens, max_text_chars, max_audio_seconds)
    max_text_chars: int | None = None
    max_audio_seconds: float = 60.0
    # each stage pool's actors and rows per call; its CPUs and GPUs are shared by the three stage pools (so a
    # runner GPU of the endpoint's settings holds the three stages' actors, as one online pipeline)
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(size=1, num_cpus=0.5, batch_size=8))
    block_size: int = 16  # lines per result file (the unit of resumption and of cancel)
    torch_threads: int | None = 1
    address: str | None = None  # the Ray cluster (None: the one this process is in, e.g. the driver actor's)

    def __post_init__(self):
        if isinstance(self.pool, dict):
            self.pool = PoolConfig(**self.pool)
        self.job()  # refuse bad settings now (block_size, locations), not in the driver

    def job(self) -> BatchConfig:
        """The batch job that runs the lines."""
        p = self.pool
        stage = PoolConfig(size=p.size, num_gpus=p.num_gpus / STAGE_POOLS, num_cpus=p.num_cpus / STAGE_POOLS,
                           batch_size=p.batch_size)
        return BatchConfig(task="requests", input=str(location(self.folder) / REQUESTS), out=self.folder,
                           models=self.models, encoder=stage, llm=stage, decoder=stage, block_size=self.block_size,
                           max_audio_seconds=self.max_audio_seconds, torch_threads=self.torch_threads,
                           address=self.address, progress=False, max_error_share=1.0,
                           max_new_tokens_cap=self.max_new_tokens_cap, max_text_chars=self.max_text_chars)


def run_openai_batch(config: OpenAIBatchConfig) -> dict:
    """Run (or resume) the batch's lines; returns {"state": "completed" | "cancelled", "lines", "completed",
    "failed"}. Lines already in a result file are never run again."""
    summary = run_batch(config.job())
    return {"state": summary["state"], "lines": summary["inputs"], **read_progress(config.folder)}


def read_results(folder) -> list[dict]:
    """Every result row written so far, in line order, as `RESULT_SCHEMA` rows."""
    return [result_row(r) for r in read_job_results(folder, "requests").to_pylist()]


def read_progress(folder) -> dict:
    try:
        return json.loads((location(folder) / PROGRESS).read_text())
    except (OSError, ValueError):
        return {"completed": 0, "failed": 0}
