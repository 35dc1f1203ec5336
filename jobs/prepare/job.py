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
(sources, tasks, input ids, block size, models, ratio, checks); a rerun with other settings is refused naming
the setting, unless `restart` (the CLI's `--restart`) clears the job's files first. The lock, the plan, the
block writer and the atomic writes are `jobs.run_folder`'s, shared with the batch and training jobs. `--out`
may be an object-store prefix (`s3://...`: each block file one whole object, the lock a lease object), and
`parquet:` / `webdataset:` sources may live there too (read in place by the read tasks, `jobs.archives`).
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

from actors.models import resolve_models_dir
from jobs.pools import PoolConfig
from jobs.prepare.checks import AudioChecks
from jobs.prepare.recipes import ARCHIVE_KINDS, RECIPES
from jobs.prepare.report import finalize
from jobs.prepare.samples import ERROR_SCHEMA, SAMPLE_SCHEMA, TASKS, PlannedInput, plan_inputs
from jobs.prepare.shards import OUTPUTS, done_path, errors_path, shard_path
from jobs.run_folder import BlockWriter, RunFolder, RunFolderError, clear_temporaries, out_location, write_atomic
from jobs.storage import append_line, is_remote, ray_remote_args
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
        if is_remote(path):
            if kind not in ARCHIVE_KINDS:
                raise RunFolderError(f"--source {text!r}: the {kind} recipe reads a local folder; an object store "
                                     f"is read by {' and '.join(k + ':' for k in ARCHIVE_KINDS)} sources")
            where = out_location(path, "--source")
            if not where.exists():
                raise FileNotFoundError(f"--source {text!r}: {where} does not exist")
            return cls(kind, str(where), names)
        path = str(out_location(path, "--source"))
        if not Path(path).exists():
            raise FileNotFoundError(f"--source {text!r}: {path} does not exist")
        return cls(kind, os.path.abspath(path), names)  # absolute, links kept: the same path as a bare one reads


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
    restart: bool = False  # clear the job's files in `out` and start over (else a rerun with other settings is refused)

    def __post_init__(self):
        out_location(self.out, "--out")  # an unknown scheme is refused by name before anything starts
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
    out = out_location(config.out, "--out")
    models = resolve_models_dir(config.models)
    inputs, sources = enumerate_inputs(config)
    blocks = [inputs[i : i + config.block_size] for i in range(0, len(inputs), config.block_size)]
    folder = RunFolder(out, "prepare", OUTPUTS)
    with folder.open(_plan(config, models, inputs), restart=config.restart):
        folder.mkdir(out / "shards")
        folder.mkdir(out / ".blocks")
        pending = [b for b in range(len(blocks)) if not done_path(out, b).exists()]
        for b in pending:  # leftovers of a killed run: redone whole
            for stale in (shard_path(out, b), errors_path(out, b)):
                stale.unlink(missing_ok=True)
        clear_temporaries(out / "shards", out / ".blocks")
        if pending:
            started, t0 = time.time(), time.perf_counter()
            stream = _run_pipeline(config, models, folder, {b: blocks[b] for b in pending})
            run = {"started_at": started, "wall_s": time.perf_counter() - t0, "blocks": len(pending),
                   "inputs": sum(len(blocks[b]) for b in pending), **stream}
            run["audio_s_per_s"] = run["audio_seconds"] / run["wall_s"] if run["wall_s"] > 0 else None
            append_line(out / "runs.jsonl", json.dumps(run))
        folder.commit()
        return finalize(out, config, len(blocks), len(inputs), sources, changed=bool(pending))


# ---------------------------------------------------------------------------------------------------------
# the Ray Data pipeline


def _run_pipeline(config: PrepareConfig, models: Path, folder: RunFolder, blocks: dict[int, list[PlannedInput]]) -> dict:
    import ray

    from actors.ray_runtime import start_ray
    from jobs.prepare.steps import SampleBuilder, read_and_check

    started = start_ray(config.address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = config.progress
        ctx.enable_operator_progress_bars = config.progress
        rows = [dataclasses.asdict(item) for b in sorted(blocks) for item in blocks[b]]
        remote = ray_remote_args(config.out, *(s.path for s in config.sources))  # the store's variables
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // config.read_rows, 4 * len(blocks))))
        if config.read_tasks:
            ds = ds.map_batches(read_and_check, fn_kwargs={"checks": config.checks}, batch_size=config.read_rows,
                                num_cpus=config.read_cpus, compute=ray.data.TaskPoolStrategy(size=config.read_tasks),
                                batch_format="pyarrow", **remote)
        pool = config.encoder
        ds = ds.map_batches(SampleBuilder, fn_constructor_kwargs={
            "encoder_dir": str(models / "encoder"), "llm_dir": str(models / "llm"), "ratio": config.ratio,
            "torch_threads": config.torch_threads, "read": None if config.read_tasks else config.checks},
            compute=ray.data.ActorPoolStrategy(size=pool.size),
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, batch_size=pool.batch_size, batch_format="pyarrow",
            **remote)
        writer = BlockWriter(folder, {b: [item.key for item in items] for b, items in blocks.items()}, key="key",
                             write=lambda b, rows: write_block(folder.out, b, rows))
        stats = _Stats()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            stats.count(writer.add(batch), later=writer.batches > 1)
        missing = writer.missing()
        if missing:  # a step dropped rows (a bug): fail loudly; the next run redoes those blocks
            raise RuntimeError(f"{len(missing)} input(s) got no row, e.g. {missing[:3]}")
        return stats.result(writer)
    finally:
        if started:
            ray.shutdown()


def write_block(out, b: int, rows: list[dict]) -> None:
    """Block b of the preparation: its samples (shard), its error rows, then its marker (each atomically)."""
    samples = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] != "ok"]
    if samples:
        write_atomic(shard_path(out, b), pa.Table.from_pylist(
            [{k: r[k] for k in SAMPLE_SCHEMA.names} for r in samples], schema=SAMPLE_SCHEMA))
    write_atomic(errors_path(out, b), pa.Table.from_pylist(
        [{k: r.get(k) for k in ERROR_SCHEMA.names} for r in errors], schema=ERROR_SCHEMA))
    write_atomic(done_path(out, b), json.dumps({"inputs": len(rows), "samples": len(samples), "errors": len(errors)}))


class _Stats:
    """Audio seconds of the utterances read (each once: its ASR and TTS samples share it), and of those that
    came after the first batch."""

    def __init__(self):
        self.audio_seconds = self.audio_after_first = 0.0
        self.utterances: set[tuple[str, str]] = set()
        self.t0 = time.perf_counter()

    def count(self, rows: list[dict], later: bool) -> None:
        for row in rows:
            utterance = (row["source"], row["utterance"])
            if row["status"] == "ok" and utterance not in self.utterances:
                self.utterances.add(utterance)
                self.audio_seconds += row["audio_seconds"] or 0.0
                self.audio_after_first += (row["audio_seconds"] or 0.0) if later else 0.0

    def result(self, writer: BlockWriter) -> dict:
        """Start-up (Ray Data, actors, model loads) = time to the first rows; the rate after it = audio of the
        rows after the first batch over the time they took."""
        if writer.first is None:
            return {"audio_seconds": 0.0, "startup_s": None, "steady_audio_s_per_s": None}
        steady = writer.last - writer.first
        return {"audio_seconds": self.audio_seconds, "startup_s": writer.first - self.t0,
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
