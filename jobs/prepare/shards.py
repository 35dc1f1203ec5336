"""What a preparation folder holds, by name: block b's shard, error rows and marker, and the samples read back.
Used by the job (which writes the blocks) and the report (which reads them); see `jobs.prepare` for the layout."""
from __future__ import annotations

import pyarrow as pa

from jobs.prepare.samples import SAMPLE_SCHEMA
from jobs.run_folder import block_file
from jobs.storage import location, read_table

# everything the job writes in DIR (a restart clears these, and nothing else)
OUTPUTS = ("shards", ".blocks", "errors.parquet", "manifest.json", "report.md", "runs.jsonl")


def shard_path(out, block: int):
    return block_file(location(out) / "shards", block)


def errors_path(out, block: int):
    return block_file(location(out) / ".blocks", block, stem="errors")


def done_path(out, block: int):
    return block_file(location(out) / ".blocks", block, stem="done", suffix=".json")


def read_shards(out) -> pa.Table:
    """Every sample row of DIR (a local path or a URL), in input order."""
    files = sorted((location(out) / "shards").glob("part-*.parquet"), key=str)
    return pa.concat_tables([read_table(f, schema=SAMPLE_SCHEMA) for f in files]) if files \
        else SAMPLE_SCHEMA.empty_table()
