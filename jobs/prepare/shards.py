"""What a preparation folder holds, by name: block b's shard, error rows and marker, and the samples read back.
Used by the job (which writes the blocks) and the report (which reads them); see `jobs.prepare` for the layout."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.prepare.samples import SAMPLE_SCHEMA
from jobs.run_folder import block_file

# everything the job writes in DIR (a restart clears these, and nothing else)
OUTPUTS = ("shards", ".blocks", "errors.parquet", "manifest.json", "report.md", "runs.jsonl")


def shard_path(out: Path, block: int) -> Path:
    return block_file(Path(out) / "shards", block)


def errors_path(out: Path, block: int) -> Path:
    return block_file(Path(out) / ".blocks", block, stem="errors")


def done_path(out: Path, block: int) -> Path:
    return block_file(Path(out) / ".blocks", block, stem="done", suffix=".json")


def read_shards(out) -> pa.Table:
    """Every sample row of DIR, in input order."""
    files = sorted((Path(out) / "shards").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f, schema=SAMPLE_SCHEMA) for f in files]) if files \
        else SAMPLE_SCHEMA.empty_table()
