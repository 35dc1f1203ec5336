"""The preparation job: recipes -> Ray Data (read + check tasks, then a speech-encoder actor pool) -> shards.

    manifest = run_prepare(PrepareConfig(sources=["librispeech:/data/LibriSpeech", "vita-jsonl:/data/x.jsonl"],
                                         out="prepared/"))

Resumable and idempotent by deterministic keys, as the batch job is. The recipes list every input in a fixed
order (sources in the order given, each recipe's own sorted order, tasks in TASKS order); input k belongs to
block k // block_size. The driver writes block b once every input of it has its row: its samples to
`shards/part-<b>.parquet`, its rejects to `.blocks/errors-<b>.parquet`, then the marker `.blocks/done-<b>.json`
(each under a temporary name, then renamed). A rerun skips blocks with a marker and clears the leftovers of
the others; an input belongs to one block and a block is written once, so no sample is ever written twice.
Deduplication by audio content runs when every block is written: of the samples with the same task and the
same 16 kHz audio, the first in input order stays and the others become `duplicate` error rows (their shard
is rewritten). Then `errors.parquet`, `manifest.json` and `report.md` are written from the blocks. A finished
run rerun only rereads the folder: nothing is processed or rewritten. `plan.json` pins what the keys mean
(sources, tasks, input ids, block size, models, ratio, checks); a rerun with other settings is refused.
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

from jobs.pools import PoolConfig
from jobs.run_folder import check_run_plan, lock_run_folder
from jobs.prepare.checks import AudioChecks
from jobs.prepare.recipes import RECIPES
from jobs.prepare.samples import ERROR_SCHEMA, SAMPLE_SCHEMA, TASKS, PlannedInput, plan_inputs
from pipeline.tokens.chat import BOOST_RATIO, check_ratio

PLAN_VERSION = 1


@dataclass(frozen=True)
class SourceSpec:
    """`KIND:PATH` or `KIND:PATH@PART,PART` (a recipe of RECIPES, a corpus folder or file, optional splits)."""

    kind: str
    path: str
    parts: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError(f"--source {text!r}: expected KIND:PATH with KIND one of {', '.join(RECIPES)}")
        kind = kind.strip().lower().replace("_", "-")
        if kind not in RECIPES:
            raise ValueError(f"--source {text!r}: unknown kind {kind!r} (use {', '.join(RECIPES)})")
        path, at, parts = rest.rpartition("@") if "@" in rest else (rest, "", "")
        names = tuple(p.strip() for p in parts.split(",") if p.strip()) if at else None
        if at and not names:
            raise ValueError(f"--source {text!r}: name parts after '@', e.g. {kind}:{path}@dev-clean")
        if not Path(path).exists():
            raise FileNotFoundError(f"--source {text!r}: {path} does not exist")
        return cls(kind, str(Path(path).resolve()), names)


@dataclass
class PrepareConfig:
    sources: list  # "KIND:PATH[@PARTS]" strings or SourceSpec
    out: str
    tasks: tuple[str, ...] = ("asr", "tts", "sqa")
    models: str | None = None  # folder with llm/ (tokenizer) and encoder/ (None: $VITA_AUDIO_MODELS or tiny)
    encoder: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=16))
    read_cpus: float = 0.25  # logical CPUs per read-and-check task
    read_tasks: int = 2  # read-and-check tasks at once (0: the encoder actors read their rows themselves)
    read_rows: int = 8  # rows per read-and-check task
    block_size: int = 64  # inputs per shard (the unit of resumption)
    ratio: tuple[int, ...] | None = BOOST_RATIO  # text-audio interval ratio of assistant turns (None: as is)
    checks: AudioChecks = field(default_factory=AudioChecks)
    torch_threads: int | None = 1  # per encoder actor
    address: str | None = None  # join this Ray cluster (None: the running one, else a local Ray)
    progress: bool = True  # Ray Data's progress bars

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec.parse(s) for s in self.sources]
        if not self.sources:
            raise ValueError("give at least one --source KIND:PATH")
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks {list(self.tasks)}: choose from {', '.join(TASKS)}")
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        for name in ("block_size", "read_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not isinstance(self.read_tasks, int) or self.read_tasks < 0:
            raise ValueError(f"read_tasks={self.read_tasks!r} must be an integer >= 0")


def enumerate_inputs(config: PrepareConfig) -> tuple[list[PlannedInput], list[dict]]:
    """Every input of every source, keyed in order, and a description of each source."""
    inputs, described, labels = [], [], {}
    for spec in config.sources:
        labels[spec.kind] = labels.get(spec.kind, 0) + 1
        label = spec.kind if labels[spec.kind] == 1 else f"{spec.kind}-{labels[spec.kind]}"
        parts = RECIPES[spec.kind](spec.path, parts=list(spec.parts) if spec.parts else None)
        planned = plan_inputs(label, (u for items in parts.values() for u in items), config.tasks, len(inputs))
        described.append({"source": label, "kind": spec.kind, "path": spec.path, "parts": sorted(parts),
                          "utterances": sum(map(len, parts.values())), "inputs": len(planned)})
        inputs += planned
    seen = {}
    for item in inputs:
        if item.id in seen:
            raise ValueError(f"input id {item.id!r} appears twice (keys {seen[item.id]} and {item.key}): "
                             "the corpus lists one utterance twice")
        seen[item.id] = item.key
    if not inputs:
        raise ValueError(f"no inputs for tasks {','.join(config.tasks)} in {', '.join(s.path for s in config.sources)}")
    return inputs, described


def run_prepare(config: PrepareConfig) -> dict:
    """Run (or resume) the job; returns the manifest (also DIR/manifest.json, with DIR/report.md)."""
    from actors.models import resolve_models_dir
    from jobs.prepare.report import finalize

    out = Path(config.out)
    models = resolve_models_dir(config.models)
    inputs, sources = enumerate_inputs(config)
    blocks = [inputs[i : i + config.block_size] for i in range(0, len(inputs), config.block_size)]
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / ".blocks").mkdir(exist_ok=True)
    with lock_run_folder(out, "prepare"):
        check_run_plan(out, _plan(config, models, inputs))
        pending = [b for b in range(len(blocks)) if not done_path(out, b).exists()]
        for b in pending:  # leftovers of a killed run: redone whole
            for stale in (shard_path(out, b), errors_path(out, b)):
                stale.unlink(missing_ok=True)
        for stale in list((out / "shards").glob(".*.tmp")) + list((out / ".blocks").glob(".*.tmp")):
            stale.unlink()
        if pending:
            started, t0 = time.time(), time.perf_counter()
            stream = _run_pipeline(config, models, out, {b: blocks[b] for b in pending})
            run = {"started_at": started, "wall_s": time.perf_counter() - t0, "blocks": len(pending),
                   "inputs": sum(len(blocks[b]) for b in pending), **stream}
            run["audio_s_per_s"] = run["audio_seconds"] / run["wall_s"] if run["wall_s"] > 0 else None
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(run) + "\n")
        return finalize(out, config, len(blocks), len(inputs), sources, changed=bool(pending))


def shard_path(out: Path, block: int) -> Path:
    return Path(out) / "shards" / f"part-{block:06d}.parquet"


def errors_path(out: Path, block: int) -> Path:
    return Path(out) / ".blocks" / f"errors-{block:06d}.parquet"


def done_path(out: Path, block: int) -> Path:
    return Path(out) / ".blocks" / f"done-{block:06d}.json"


def read_shards(out) -> pa.Table:
    """Every sample row of DIR, in input order."""
    files = sorted((Path(out) / "shards").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f, schema=SAMPLE_SCHEMA) for f in files]) if files \
        else SAMPLE_SCHEMA.empty_table()


def write_atomic(table: pa.Table, path: Path) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temp)
    os.replace(temp, path)


# ---------------------------------------------------------------------------------------------------------
# the Ray Data pipeline


def _run_pipeline(config: PrepareConfig, models: Path, out: Path, blocks: dict[int, list[PlannedInput]]) -> dict:
    import ray

    from actors.ray_runtime import start_ray
    from jobs.prepare.stages import SampleBuilder, read_and_check

    started = start_ray(config.address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = config.progress
        ctx.enable_operator_progress_bars = config.progress
        rows = [dataclasses.asdict(item) for b in sorted(blocks) for item in blocks[b]]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // config.read_rows, 4 * len(blocks))))
        if config.read_tasks:
            ds = ds.map_batches(read_and_check, fn_kwargs={"checks": config.checks}, batch_size=config.read_rows,
                                num_cpus=config.read_cpus, compute=ray.data.TaskPoolStrategy(size=config.read_tasks),
                                batch_format="pyarrow")
        pool = config.encoder
        ds = ds.map_batches(SampleBuilder, fn_constructor_kwargs={
            "encoder_dir": str(models / "encoder"), "llm_dir": str(models / "llm"), "ratio": config.ratio,
            "torch_threads": config.torch_threads, "read": None if config.read_tasks else config.checks},
            compute=ray.data.ActorPoolStrategy(size=pool.size),
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, batch_size=pool.batch_size, batch_format="pyarrow")
        collector = _Collector(out, blocks)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(batch)
        missing = collector.missing()
        if missing:  # a step dropped rows (a bug): fail loudly; the next run redoes those blocks
            raise RuntimeError(f"{len(missing)} input(s) got no row, e.g. {missing[:3]}")
        return collector.stats()
    finally:
        if started:
            ray.shutdown()


class _Collector:
    """Gathers rows by block; writes a block's shard, its errors and its marker once all its inputs have a row."""

    def __init__(self, out: Path, blocks: dict[int, list[PlannedInput]]):
        self.out = out
        self.block_of = {item.key: b for b, items in blocks.items() for item in items}
        self.expected = {b: len(items) for b, items in blocks.items()}
        self.rows: dict[int, dict[int, dict]] = {b: {} for b in blocks}
        self.written: set[int] = set()
        self.audio_seconds = self.audio_after_first = 0.0  # of each utterance read, once
        self.utterances: set[tuple[str, str]] = set()
        self.t0 = time.perf_counter()
        self.first = self.last = None  # perf_counter of the first and the latest batch

    def add(self, batch: pa.Table) -> None:
        now = time.perf_counter()
        later = self.first is not None
        self.first = self.first or now
        self.last = now
        for row in batch.to_pylist():
            b = self.block_of.get(row["key"])
            if b is None or b in self.written or row["key"] in self.rows[b]:
                continue  # not ours, or a repeat (the first row of a key is kept)
            self.rows[b][row["key"]] = row
            utterance = (row["source"], row["utterance"])
            if row["status"] == "ok" and utterance not in self.utterances:  # its ASR and TTS samples: once
                self.utterances.add(utterance)
                self.audio_seconds += row["audio_seconds"] or 0.0
                self.audio_after_first += (row["audio_seconds"] or 0.0) if later else 0.0
            if len(self.rows[b]) == self.expected[b]:
                self._write(b)

    def _write(self, b: int) -> None:
        by_key = self.rows.pop(b)
        rows = [by_key[k] for k in sorted(by_key)]
        samples = [r for r in rows if r["status"] == "ok"]
        errors = [r for r in rows if r["status"] != "ok"]
        if samples:
            write_atomic(pa.Table.from_pylist([{k: r[k] for k in SAMPLE_SCHEMA.names} for r in samples],
                                              schema=SAMPLE_SCHEMA), shard_path(self.out, b))
        write_atomic(pa.Table.from_pylist([{k: r.get(k) for k in ERROR_SCHEMA.names} for r in errors],
                                          schema=ERROR_SCHEMA), errors_path(self.out, b))
        marker = done_path(self.out, b)
        temp = marker.with_name(f".{marker.name}.tmp")
        temp.write_text(json.dumps({"inputs": len(rows), "samples": len(samples), "errors": len(errors)}))
        os.replace(temp, marker)
        self.written.add(b)

    def missing(self) -> list[int]:
        return [k for k, b in self.block_of.items() if b not in self.written and k not in self.rows.get(b, {})]

    def stats(self) -> dict:
        """Audio seconds of the samples built; start-up (Ray Data, actors, model loads) = time to the first
        rows; the rate after it = audio of the rows after the first batch over the time they took."""
        if self.first is None:
            return {"audio_seconds": 0.0, "startup_s": None, "steady_audio_s_per_s": None}
        steady = self.last - self.first
        return {"audio_seconds": self.audio_seconds, "startup_s": self.first - self.t0,
                "steady_audio_s_per_s": self.audio_after_first / steady if steady > 0 else None}


# ---------------------------------------------------------------------------------------------------------
# what an output folder holds


def _plan(config: PrepareConfig, models: Path, inputs: list[PlannedInput]) -> dict:
    ids = hashlib.sha256("\n".join(item.id for item in inputs).encode()).hexdigest()
    return {"version": PLAN_VERSION, "sources": [dataclasses.asdict(s) for s in config.sources],
            "tasks": list(config.tasks), "inputs": len(inputs), "ids_sha256": ids, "block_size": config.block_size,
            "models": str(Path(models).resolve()), "ratio": list(config.ratio) if config.ratio else None,
            "checks": dataclasses.asdict(config.checks)}


def log(message: str) -> None:
    print(f"vita-audio prepare: {message}", file=sys.stderr)
