"""What a batch results folder holds, by name: block b's result file, the rows read back, and which error rows a
rerun retries. Used by the job (which writes the blocks) and the report (which reads them)."""
from __future__ import annotations

import os
import re

import pyarrow as pa

from jobs.batch.callables import IN_FLIGHT, REQUEST_COLUMNS, ROW_SCHEMA
from jobs.run_folder import block_file
from jobs.storage import location, read_table

RESULT_SCHEMA = pa.schema([f for f in ROW_SCHEMA if f.name not in IN_FLIGHT + REQUEST_COLUMNS])  # asr, tts
REQUESTS_SCHEMA = pa.schema([f for f in ROW_SCHEMA if f.name not in IN_FLIGHT])  # request lines: + REQUEST_COLUMNS
PROGRESS = "progress.json"  # the rows written so far: {"completed": ok rows, "failed": error rows}
CANCEL = "cancel"  # present: the job stops at its next block boundary (written by whoever cancels)
# everything the job writes in DIR (a restart clears these, and nothing else)
OUTPUTS = ("results", "audio", "summary.json", "report.md", "runs.jsonl", PROGRESS)
STAGES = ("encoder", "llm", "decoder")
# A stage that crashed or ran out of memory on a row: not the row's fault, so the job is not complete and a
# rerun retries the row. Other error rows (unreadable audio, too long, empty text, ...) stay unless
# `retry_errors` is set.
_TRANSIENT = re.compile(r"out of memory|OutOfMemoryError|MemoryError|can't allocate memory|CUDA error|RuntimeError|"
                        r"RequestAborted|StageRestarting|StageBusy|TimeoutError|CancelledError|RayActorError|"
                        r"ActorDiedError|ActorUnavailableError|WorkerCrashedError|ObjectLostError|NodeDiedError")


def block_path(out, block: int):
    """Block b's result file (a Path, or an ObjectPath on an object store)."""
    return block_file(location(out) / "results", block)


def result_schema(task: str) -> pa.Schema:
    return REQUESTS_SCHEMA if task == "requests" else RESULT_SCHEMA


def read_results(out: str | os.PathLike, task: str = "asr") -> pa.Table:
    """Every result row of DIR (a local path or a URL), ordered by result file (= input order)."""
    schema = result_schema(task)
    files = sorted((location(out) / "results").glob("part-*.parquet"), key=str)
    if not files:
        return schema.empty_table()
    return pa.concat_tables([read_table(f, schema=schema) for f in files])


def transient(row: dict) -> bool:
    """An error row whose stage crashed or ran out of memory (`stage: ExceptionName: ...`): retried on rerun."""
    error = row.get("error") or ""
    stage = error.partition(":")[0]
    return row.get("status") == "error" and stage in STAGES and bool(_TRANSIENT.search(error))


def to_retry(row: dict, retry_errors: bool) -> bool:
    """Whether a rerun processes this existing row again."""
    return row.get("status") != "ok" and (retry_errors or transient(row))
