"""The batch job: inputs -> Ray Data (a pool of actors per stage) -> one Parquet file per block of inputs.

    summary = run_batch(BatchConfig(task="asr", input="corpus/", out="run/"))

Exactly once, resumable. The inputs are listed in a fixed order (`jobs.batch.inputs`) and cut into blocks
of `block_size`; block b's rows go to `DIR/results/part-<b>.parquet`, written by the driver once every
input of the block has its row, under a temporary name and renamed (a result file is always whole). So:
- a rerun after a crash skips the blocks whose file exists and processes only the others;
- an id belongs to one block and a block is written once: no id is ever written twice;
- a finished run rerun is a no-op (it only rewrites the summary and the report).
`DIR/plan.json` pins what the blocks mean (task, the input ids, block size, models and decoding settings); a
rerun with other settings is refused rather than mixing two runs' results in one folder.

ASR: SpeechEncoder pool -> SpeechLLM pool. TTS: SpeechLLM pool -> AudioDecoder pool (FLAC under DIR/audio/).
Ray Data streams batches between the pools; each pool's size, GPUs, CPUs and batch size come from `PoolConfig`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.batch.inputs import BatchInput, enumerate_inputs
from jobs.batch.segments import WindowConfig
from jobs.batch.stages import IN_FLIGHT, ROW_SCHEMA, DecodeOptions
from jobs.pools import PoolConfig
from jobs.run_folder import check_run_plan, lock_run_folder

RESULT_SCHEMA = pa.schema([f for f in ROW_SCHEMA if f.name not in IN_FLIGHT])
PLAN_VERSION = 1


@dataclass
class BatchConfig:
    task: str  # "asr" | "tts"
    input: str  # folder, JSONL / CSV manifest, .tar shard (asr); JSONL / CSV / TXT of texts (tts)
    out: str
    models: str | None = None  # folder with llm/, encoder/, decoder/ (None: $VITA_AUDIO_MODELS or the tiny set)
    encoder: PoolConfig = field(default_factory=PoolConfig)
    llm: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=16))
    decoder: PoolConfig = field(default_factory=PoolConfig)
    llm_max_batch_size: int = 16  # requests sharing one engine step inside an LLM actor
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    windows: WindowConfig = field(default_factory=WindowConfig)
    block_size: int = 64  # inputs per result file (the unit of resumption)
    max_audio_seconds: float | None = 4 * 3600.0
    torch_threads: int | None = 1  # per actor (tiny models on a shared CPU run fastest on one thread)
    address: str | None = None  # join this Ray cluster (None: the running one, else a local Ray)
    progress: bool = True  # Ray Data's progress bars

    def __post_init__(self):
        if self.task not in ("asr", "tts"):
            raise ValueError(f"task={self.task!r}; expected 'asr' or 'tts'")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be an integer >= 1")


def run_batch(config: BatchConfig) -> dict:
    """Run (or resume) the job; returns the summary (also written to DIR/summary.json with DIR/report.md)."""
    from jobs.batch.report import write_report
    from actors.models import resolve_models_dir

    out = Path(config.out)
    models = resolve_models_dir(config.models)
    items = enumerate_inputs(config.input, config.task)
    blocks = [items[i : i + config.block_size] for i in range(0, len(items), config.block_size)]
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    with lock_run_folder(out, "batch"):  # held until the run ends (or its process dies)
        check_run_plan(out, _plan(config, models, items))
        for stale in results.glob(".part-*"):  # a crash mid-write leaves only a temporary file
            stale.unlink()
        pending = [b for b, block in enumerate(blocks) if not _complete(block_path(out, b), len(block))]
        started, t0 = time.time(), time.perf_counter()
        stream = _run_pipeline(config, models, out, blocks, pending, t0) if pending else {}
        run = {"started_at": started, "wall_s": time.perf_counter() - t0,
               "inputs": sum(len(blocks[b]) for b in pending), "blocks": len(pending), **stream}
        if pending:
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(run) + "\n")
        return write_report(out, config.task, len(items), this_run=run)


def block_path(out: Path, block: int) -> Path:
    return Path(out) / "results" / f"part-{block:06d}.parquet"


def read_results(out: str | os.PathLike) -> pa.Table:
    """Every result row of DIR, ordered by result file (= input order)."""
    files = sorted((Path(out) / "results").glob("part-*.parquet"))
    if not files:
        return RESULT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=RESULT_SCHEMA) for f in files])


# ---------------------------------------------------------------------------------------------------------
# the Ray Data pipeline


def _run_pipeline(config: BatchConfig, models: Path, out: Path, blocks: list[list[BatchInput]],
                   pending: list[int], t0: float) -> dict:
    """Stream the pending blocks through the stage pools; returns when the first rows arrived (start-up:
    Ray, actors, model loads) and the rate after that (`steady_audio_s_per_s`, audio seconds of the rows
    that came after the first batch over the time they took)."""
    import ray

    from actors.ray_runtime import start_ray

    started = start_ray(config.address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = config.progress
        ctx.enable_operator_progress_bars = config.progress
        rows = [_input_row(item, config.task) for b in pending for item in blocks[b]]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(len(pending), 1) * 2))
        for stage in _stages(config, models, out):
            ds = stage(ds)
        collector = _Collector(out, {b: blocks[b] for b in pending})
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(batch)
        missing = collector.missing()
        if missing:  # a stage dropped rows (a bug): fail loudly; the next run redoes those blocks
            raise RuntimeError(f"{len(missing)} input(s) got no result row, e.g. {missing[:3]}")
        return collector.timing(t0)
    finally:
        if started:
            ray.shutdown()


def _stages(config: BatchConfig, models: Path, out: Path) -> list:
    """The map_batches steps of the task, each an actor pool over a stage class of jobs.batch.stages."""
    from actors.config import PipelineConfig
    from jobs.batch.stages import AudioDecoder, SpeechEncoder, SpeechLLM, with_threads

    stages = PipelineConfig.from_models_dir(models).with_resources(num_gpus=0.0)
    stages.llm.max_batch_size = config.llm_max_batch_size

    def pool(cls, pool_config: PoolConfig, **kwargs):
        import ray

        return lambda ds: ds.map_batches(
            cls, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=pool_config.size),
            num_cpus=pool_config.num_cpus, num_gpus=pool_config.num_gpus, batch_size=pool_config.batch_size,
            batch_format="pyarrow")

    threads = config.torch_threads
    llm = pool(SpeechLLM, config.llm, config=with_threads(stages.llm, threads), task=config.task,
               options=config.decode)
    if config.task == "asr":
        return [pool(SpeechEncoder, config.encoder, config=with_threads(stages.encoder, threads),
                     windows=config.windows, max_audio_seconds=config.max_audio_seconds), llm]
    return [llm, pool(AudioDecoder, config.decoder, config=with_threads(stages.decoder, threads),
                      audio_dir=str(out / "audio"))]


def _input_row(item: BatchInput, task: str) -> dict:
    if task == "asr":
        return {"id": item.id, "path": item.path, "reference": item.text}
    return {"id": item.id, "text": item.text}


class _Collector:
    """Gathers result rows by block and writes a block's file once all its inputs have a row."""

    def __init__(self, out: Path, blocks: dict[int, list[BatchInput]]):
        self.out = out
        self.block_of = {item.id: b for b, items in blocks.items() for item in items}
        self.expected = {b: len(items) for b, items in blocks.items()}
        self.order = {item.id: i for items in blocks.values() for i, item in enumerate(items)}
        self.rows: dict[int, dict[str, dict]] = {b: {} for b in blocks}
        self.written: set[int] = set()
        self.first = self.last = None  # perf_counter of the first and the latest batch
        self.audio_after_first = 0.0

    def add(self, batch: pa.Table) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        elif "audio_seconds" in batch.column_names:
            self.audio_after_first += sum(s or 0.0 for s in batch.column("audio_seconds").to_pylist())
        self.last = now
        keep = [c for c in RESULT_SCHEMA.names if c in batch.column_names]
        for row in batch.select(keep).to_pylist():
            b = self.block_of.get(row["id"])
            if b is None or b in self.written or row["id"] in self.rows[b]:
                continue  # not ours, or a repeat (the first row of an id is the one kept)
            self.rows[b][row["id"]] = row
            if len(self.rows[b]) == self.expected[b]:
                self._write(b)

    def _write(self, b: int) -> None:
        rows = sorted(self.rows.pop(b).values(), key=lambda r: self.order[r["id"]])
        table = pa.Table.from_pylist([{k: r.get(k) for k in RESULT_SCHEMA.names} for r in rows],
                                     schema=RESULT_SCHEMA)
        final = block_path(self.out, b)
        temp = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, temp)
        os.replace(temp, final)
        self.written.add(b)

    def timing(self, t0: float) -> dict:
        if self.first is None:
            return {}
        steady = self.last - self.first
        return {"startup_s": self.first - t0,
                "steady_audio_s_per_s": self.audio_after_first / steady if steady > 0 else None}

    def missing(self) -> list[str]:
        return [i for i, b in self.block_of.items() if b not in self.written and i not in self.rows.get(b, {})]


# ---------------------------------------------------------------------------------------------------------
# what a results folder holds


def _plan(config: BatchConfig, models: Path, items: list[BatchInput]) -> dict:
    ids = hashlib.sha256("\n".join(item.id for item in items).encode()).hexdigest()
    return {"version": PLAN_VERSION, "task": config.task, "input": str(Path(config.input).resolve()),
            "inputs": len(items), "ids_sha256": ids, "block_size": config.block_size,
            "models": str(Path(models).resolve()), "decode": dataclasses.asdict(config.decode),
            "windows": dataclasses.asdict(config.windows), "max_audio_seconds": config.max_audio_seconds}


def _complete(path: Path, n_rows: int) -> bool:
    """A result file exists and holds its block's rows (renamed into place whole, so only a foreign or
    hand-edited file can fail this; it is then redone)."""
    if not path.exists():
        return False
    try:
        if pq.read_metadata(path).num_rows == n_rows:
            return True
    except (OSError, pa.ArrowInvalid):
        pass
    print(f"vita-audio batch: {path} is incomplete; redoing its block", file=sys.stderr)
    path.unlink()
    return False
