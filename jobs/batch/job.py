"""The batch job: inputs -> Ray Data (a pool of actors per stage) -> one Parquet file per block of inputs.

    summary = run_batch(BatchConfig(task="asr", input="corpus/", out="run/"))

Exactly once, resumable. The inputs are listed in a fixed order (`jobs.batch.inputs`) and cut into blocks
of `block_size`; block b's rows go to `DIR/results/part-<b>.parquet`, written by the driver once every
input of the block has its row, under a temporary name and renamed (a result file is always whole). So:
- a rerun after a crash skips the blocks whose file exists and processes only the others;
- an id belongs to one block and a block is written once: no id is ever written twice;
- a finished run rerun is a no-op (it only rewrites the summary and the report);
- a row whose stage crashed or ran out of memory (`jobs.batch.results.transient`) leaves the job incomplete:
  a rerun processes those rows again and rewrites their blocks (`retry_errors` retries every error row);
- more than `max_error_share` of the rows in error ends the job with `TooManyErrors` (the report is written);
- `DIR/cancel` (`request_cancel`; `vita-audio batch cancel --out DIR`) stops the job at its next block boundary:
  the blocks written stay and the summary's `state` says "cancelled". A rerun (or the Batch API's restarted
  driver) starts nothing while it is there, unless `resume_cancelled` (the CLI's reruns): a cancel written before
  that run started is then withdrawn and the run resumes, while one written after it started still stops it;
- `DIR/progress.json` counts the rows written so far (ok / error), rewritten after each block.
`DIR/plan.json` pins what the blocks mean (task, the input ids, block size, models and decoding settings); a
rerun with other settings is refused naming the setting rather than mixing two runs' results in one folder,
unless `restart` (the CLI's `--restart`) clears the job's files first. Lock, plan, block writer:
`jobs.run_folder`, shared with prepare/train.

Input and output may live on an object store (`s3://bucket/...`, any filesystem pyarrow / fsspec knows:
`jobs.storage`): the inputs are read in place by the stage actors (tar members and Parquet rows by ranged
reads, `jobs.archives`), each block's result file is one whole object (a PUT is atomic), the folder's lock is
a lease object (`jobs.run_folder.LeaseLock`), and the actors get the driver's storage variables
(`AWS_ENDPOINT_URL`, credentials, ...) in their runtime env. The decoder actors write each audio file whole
through `jobs.storage` (one object each on a store).

ASR: SpeechEncoder pool -> SpeechLLM pool. TTS: SpeechLLM pool -> AudioDecoder pool (FLAC under DIR/audio/).
Requests (the OpenAI Batch API's lines, `jobs.batch.lines`; `jobs.batch.openai_batch` runs them): SpeechEncoder
pool (a line's clips) -> SpeechLLM pool (each line's own request and options) -> AudioDecoder pool (spoken
answers as .npy under DIR/audio/); a line without audio in or out passes the encoder or the decoder untouched.
Ray Data streams batches between the pools; each pool's size, GPUs, CPUs and batch size come from `PoolConfig`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from actors.models import resolve_models_dir
from jobs.batch.callables import DecodeOptions
from jobs.batch.inputs import TASKS, BatchInput, enumerate_inputs
from jobs.batch.report import write_report
from jobs.batch.results import (
    CANCEL,
    OUTPUTS,
    PROGRESS,
    RESULT_SCHEMA,
    block_path,
    read_results,
    result_schema,
    to_retry,
)
from jobs.batch.segments import WindowConfig
from jobs.pools import PoolConfig
from jobs.run_folder import (
    BlockWriter,
    RunFolder,
    clear_temporaries,
    out_location,
    write_atomic,
)
from jobs.storage import (
    append_line,
    is_remote,
    location,
    ray_remote_args,
    read_metadata,
    read_table,
)

PLAN_VERSION = 1
__all__ = ["BatchConfig", "TooManyErrors", "block_path", "cancel_requested", "read_results", "request_cancel",
           "run_batch"]


class TooManyErrors(RuntimeError):
    """The job ran to its end (results, summary and report written) but more than `max_error_share` of its rows
    are errors; `summary` is the job's summary. Not a bad input: the CLI exits non-zero with this one line."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass
class BatchConfig:
    task: str  # "asr" | "tts" | "requests"
    input: str  # folder, JSONL / CSV manifest, .tar shard (asr); JSONL / CSV / TXT of texts (tts); specs (requests)
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
    retry_errors: bool = False  # a rerun also redoes the error rows that are not transient (bad input, too long)
    max_error_share: float = 0.5  # more error rows than this share of the inputs: TooManyErrors (non-zero exit)
    restart: bool = False  # clear the job's files in `out` and start over (else a rerun with other settings is refused)
    resume_cancelled: bool = False  # withdraw a cancel written before this run started (the CLI: a rerun resumes)
    max_new_tokens_cap: int | None = None  # an operator's caps on every request (the endpoint's max_tokens and
    max_text_chars: int | None = None  # max_text_chars for the batch API's lines)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}; expected one of {TASKS}")
        out_location(self.input, "--input")  # an unknown scheme is refused by name before anything starts
        out_location(self.out, "--out")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be an integer >= 1")
        share = self.max_error_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"max_error_share={share!r} must be a number from 0 to 1")
        seconds = self.max_audio_seconds
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not math.isfinite(seconds) or seconds <= 0):
            raise ValueError(f"max_audio_seconds={seconds!r} must be a number > 0")


def run_batch(config: BatchConfig) -> dict:
    """Run (or resume) the job; returns the summary (also written to DIR/summary.json with DIR/report.md).
    Raises TooManyErrors (after writing them) when more than `max_error_share` of the rows are errors."""
    called = time.time()  # a cancel written from now on is for this run
    out = out_location(config.out, "--out")
    models = resolve_models_dir(config.models)
    items = enumerate_inputs(config.input, config.task)
    blocks = [items[i : i + config.block_size] for i in range(0, len(items), config.block_size)]
    folder = RunFolder(out, "batch", OUTPUTS)
    with folder.open(_plan(config, models, items), restart=config.restart):  # locked until the run ends
        if config.resume_cancelled:
            _withdraw_cancel(out, before=called)
        folder.mkdir(out / "results")
        clear_temporaries(out / "results", out / "audio")  # a crash mid-write leaves only a temporary file
        redo, counts = _pending(out, blocks, config.retry_errors)
        started, t0 = time.time(), time.perf_counter()
        ran = bool(redo) and not cancel_requested(out)
        stream = _run_pipeline(config, models, folder, blocks, redo, counts, t0) if ran else {}
        run = {"started_at": started, "wall_s": time.perf_counter() - t0,
               "inputs": sum(map(len, redo.values())), "blocks": len(redo), **stream}
        folder.commit()
        _write_progress(out, counts)
        if ran:
            append_line(out / "runs.jsonl", json.dumps(run))
        summary = write_report(out, config.task, len(items), this_run=run)
        whole = all(b in counts for b in range(len(blocks)))
        summary["state"] = "completed" if whole or not cancel_requested(out) else "cancelled"
    if summary["inputs"] and summary["errors"] > config.max_error_share * summary["inputs"]:
        raise TooManyErrors(
            f"batch {config.task}: {summary['errors']} of {summary['inputs']} rows are errors (more than "
            f"max_error_share {config.max_error_share:g}); see {out / 'report.md'}", summary)
    return summary


def request_cancel(out) -> None:
    """Ask the job writing DIR to stop at its next block boundary (a file: it holds across driver restarts)."""
    write_atomic(location(out) / CANCEL, f"{time.time()}\n")


def cancel_requested(out) -> bool:
    return (location(out) / CANCEL).exists()


def _withdraw_cancel(out, before: float) -> None:
    """Remove DIR/cancel if it was written before `before` (its time, as `request_cancel` wrote it): the cancel
    that stopped an earlier run, not one meant for the run starting now."""
    path = location(out) / CANCEL
    try:
        written = float(path.read_text().strip() or 0)
    except FileNotFoundError:
        return
    except ValueError:  # not request_cancel's: as old
        written = 0.0
    if written < before:
        path.unlink(missing_ok=True)


def _pending(out, blocks: list[list[BatchInput]], retry_errors: bool) -> tuple[dict, dict]:
    """(block -> the ids this run processes: every id of a block without a whole result file, else the ids of
    its error rows to retry (transient ones; every error row with `retry_errors`); block -> its rows' statuses
    for the blocks with a result file)."""
    redo, counts = {}, {}
    for b, block in enumerate(blocks):
        path = block_path(out, b)
        if not _complete(path, len(block)):
            redo[b] = [item.id for item in block]
            continue
        rows = read_table(path, columns=["id", "status", "error"]).to_pylist()
        counts[b] = [r["status"] for r in rows]
        retry = [r["id"] for r in rows if to_retry(r, retry_errors)]
        if retry:
            redo[b] = retry
    return redo, counts


def _write_progress(out, counts: dict[int, list[str]]) -> None:
    statuses = [s for block in counts.values() for s in block]
    ok = statuses.count("ok")
    write_atomic(out / PROGRESS, json.dumps({"completed": ok, "failed": len(statuses) - ok}) + "\n")


# ---------------------------------------------------------------------------------------------------------
# the Ray Data pipeline


def _run_pipeline(config: BatchConfig, models: Path, folder: RunFolder, blocks: list[list[BatchInput]],
                  redo: dict[int, list[str]], counts: dict[int, list[str]], t0: float) -> dict:
    """Stream the pending blocks through the stage pools (until the last, or a cancel seen after a block);
    returns when the first rows arrived (start-up: Ray, actors, model loads) and the rate after that
    (`steady_audio_s_per_s`, audio seconds of the rows that came after the first batch over the time they
    took). `counts` (each written block's statuses) and DIR/progress.json follow every block written."""
    import ray

    from actors.ray_runtime import start_ray

    started = start_ray(config.address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = config.progress
        ctx.enable_operator_progress_bars = config.progress
        wanted = {b: set(ids) for b, ids in redo.items()}
        rows = [_input_row(item, config.task) for b in sorted(redo) for item in blocks[b] if item.id in wanted[b]]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(len(redo), 1) * 2))
        for stage in _stages(config, models, folder.out, ray_remote_args(config.input, config.out), _needs(rows)):
            ds = stage(ds)
        schema = result_schema(config.task)

        def write(b: int, rows: list[dict]) -> None:
            counts[b] = [r["status"] for r in write_block(folder.out, b, rows, schema)]
            _write_progress(folder.out, counts)

        writer = BlockWriter(folder, redo, key="id", write=write)
        audio_after_first = 0.0
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            before = len(writer.written)
            taken = writer.add(batch.select([c for c in schema.names if c in batch.column_names]))
            if writer.batches > 1:
                audio_after_first += sum(r.get("audio_seconds") or 0.0 for r in taken)
            if len(writer.written) > before and cancel_requested(folder.out):
                break  # a block boundary: what is written stays, nothing more is written
        else:
            missing = writer.missing()
            if missing:  # a stage dropped rows (a bug): fail loudly; the next run redoes those blocks
                raise RuntimeError(f"{len(missing)} input(s) got no result row, e.g. {missing[:3]}")
        if writer.first is None:
            return {}
        steady = writer.last - writer.first
        return {"startup_s": writer.first - t0,
                "steady_audio_s_per_s": audio_after_first / steady if steady > 0 else None}
    finally:
        if started:
            ray.shutdown()


def _needs(rows: list[dict]) -> set[str] | None:
    """The stages request lines need (None: every stage of the task): the encoder only if a line holds audio,
    the decoder only if a line's answer may speak, so a batch of transcriptions loads no decoder and one of speech
    no encoder."""
    specs = [json.loads(row["spec"]) for row in rows if row.get("spec")]
    if not specs:
        return None
    needs = {"llm"}
    if any(s.get("audio") or any(h.get("audios") for h in s.get("history") or []) for s in specs):
        needs.add("encoder")
    if any(s["task"] == "tts" or (s["task"] == "chat" and s["options"].get("layout") != "text") for s in specs):
        needs.add("decoder")
    return needs


def _stages(config: BatchConfig, models: Path, out, remote_args: dict | None = None,
            needs: set[str] | None = None) -> list:
    """The map_batches steps of the task, each an actor pool over a stage class of jobs.batch.callables
    (`remote_args`: the storage variables' runtime env when an object store is read or written; `needs`: the
    stages to keep, None: all of the task's)."""
    from actors.config import PipelineConfig
    from jobs.batch.callables import (
        AudioDecoder,
        SpeechEncoder,
        SpeechLLM,
        with_threads,
    )

    stages = PipelineConfig.from_models_dir(models).with_resources(num_gpus=0.0)
    stages.llm.max_batch_size = config.llm_max_batch_size

    def pool(cls, pool_config: PoolConfig, **kwargs):
        import ray

        return lambda ds: ds.map_batches(
            cls, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=pool_config.size),
            num_cpus=pool_config.num_cpus, num_gpus=pool_config.num_gpus, batch_size=pool_config.batch_size,
            batch_format="pyarrow", **(remote_args or {}))

    threads = config.torch_threads
    encoder = pool(SpeechEncoder, config.encoder, config=with_threads(stages.encoder, threads),
                   windows=config.windows, max_audio_seconds=config.max_audio_seconds)
    llm = pool(SpeechLLM, config.llm, config=with_threads(stages.llm, threads), task=config.task,
               options=config.decode, caps=_caps(config))
    decoder = pool(AudioDecoder, config.decoder, config=with_threads(stages.decoder, threads),
                   audio_dir=str(out / "audio"))
    steps = {"asr": [("encoder", encoder), ("llm", llm)], "tts": [("llm", llm), ("decoder", decoder)],
             "requests": [("encoder", encoder), ("llm", llm), ("decoder", decoder)]}[config.task]
    return [step for name, step in steps if needs is None or name in needs]


def _caps(config: BatchConfig) -> dict:
    return {"max_new_tokens": config.max_new_tokens_cap, "max_text_chars": config.max_text_chars}


def _input_row(item: BatchInput, task: str) -> dict:
    if task == "asr":
        return {"id": item.id, "path": item.path, "reference": item.text}
    if task == "requests":
        return {"id": item.id, "spec": item.spec}
    return {"id": item.id, "text": item.text}


def write_block(out, b: int, rows: list[dict], schema: pa.Schema = RESULT_SCHEMA) -> list[dict]:
    """Block b's result file: the new rows, merged by id into the rows the file already holds (a retry
    replaces only its own rows), in the file's order; written whole (`write_atomic`: under a temporary name,
    then moved into place). Returns the file's rows."""
    path = block_path(out, b)
    if path.exists():
        new = {r["id"]: r for r in rows}
        rows = [new.pop(r["id"], r) for r in read_table(path, schema=schema).to_pylist()] + list(new.values())
    rows = [{k: r.get(k) for k in schema.names} for r in rows]
    write_atomic(path, pa.Table.from_pylist(rows, schema=schema))
    return rows


# ---------------------------------------------------------------------------------------------------------
# what a results folder holds


def _plan(config: BatchConfig, models: Path, items: list[BatchInput]) -> dict:
    ids = hashlib.sha256("\n".join(item.id for item in items).encode()).hexdigest()
    source = location(config.input, "--input")
    return {"version": PLAN_VERSION, "task": config.task, "input": str(source if is_remote(source) else source.resolve()),
            "inputs": len(items), "ids_sha256": ids, "block_size": config.block_size,
            "models": str(Path(models).resolve()), "decode": dataclasses.asdict(config.decode),
            "windows": dataclasses.asdict(config.windows), "max_audio_seconds": config.max_audio_seconds,
            **({"caps": _caps(config)} if config.task == "requests" else {})}


def _complete(path, n_rows: int) -> bool:
    """A result file exists and holds its block's rows (renamed into place whole, so only a foreign or
    hand-edited file can fail this; it is then redone)."""
    if not path.exists():
        return False
    try:
        if read_metadata(path).num_rows == n_rows:
            return True
    except (OSError, pa.ArrowInvalid):
        pass
    print(f"vita-audio batch: {path} is incomplete; redoing its block", file=sys.stderr)
    path.unlink()
    return False
