"""The end of a preparation run: deduplication over all blocks, then errors.parquet, manifest.json, report.md.

Every step is idempotent (a rerun after a crash in the middle finishes the job; a rerun of a finished job
changes no file): duplicates already moved to a block's errors are not added twice, and a file whose new
content equals the old is not rewritten.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from jobs.prepare.samples import ERROR_SCHEMA, SAMPLE_SCHEMA, SCHEMA_VERSION
from jobs.prepare.shards import done_path, errors_path, shard_path
from jobs.run_folder import write_atomic, write_if_changed
from jobs.storage import read_table

STAT_COLUMNS = ["id", "source", "task", "audio_seconds", "num_tokens", "num_scored", "audio_sha1", "converted",
                "audio_codes"]


def finalize(out, config, n_blocks: int, n_inputs: int, sources: list[dict], changed: bool) -> dict:
    """Dedup, then errors.parquet, manifest.json and report.md from the written blocks; returns the manifest."""
    if not all(done_path(out, b).exists() for b in range(n_blocks)):
        raise RuntimeError(f"{out}: not every block is written; rerun to finish")
    moved = _dedup(out, n_blocks)
    errors = pa.concat_tables([read_table(errors_path(out, b), schema=ERROR_SCHEMA) for b in range(n_blocks)])
    if changed or moved or not (out / "errors.parquet").exists():
        write_atomic(out / "errors.parquet", errors)
    stats = [read_table(shard_path(out, b), columns=STAT_COLUMNS) for b in range(n_blocks)
             if shard_path(out, b).exists()]
    samples = pa.concat_tables(stats) if stats else SAMPLE_SCHEMA.empty_table().select(STAT_COLUMNS)
    manifest = _manifest(out, config, n_inputs, sources, samples, errors)
    write_if_changed(out / "manifest.json", json.dumps(manifest, indent=1, default=str) + "\n")
    write_if_changed(out / "report.md", _report(manifest, errors))
    return manifest


def _dedup(out, n_blocks: int) -> int:
    """Keep the first sample of each (task, audio content) in input order; later ones become error rows."""
    first: dict[tuple[str, str], str] = {}
    moved = 0
    for b in range(n_blocks):
        path = shard_path(out, b)
        if not path.exists():
            continue
        keys = read_table(path, columns=["id", "source", "task", "audio_sha1", "paths", "utterance"]).to_pylist()
        dups = []
        for row in keys:
            key = (row["task"], row["audio_sha1"])
            if key in first:
                dups.append({"id": row["id"], "source": row["source"], "path": ";".join(row["paths"] or []),
                             "reason": "duplicate", "detail": f"same {row['task']} audio as {first[key]}",
                             "task": row["task"], "utterance": row["utterance"]})
            else:
                first[key] = row["id"]
        if not dups:
            continue
        errors = read_table(errors_path(out, b), schema=ERROR_SCHEMA)
        have = set(errors.column("id").to_pylist())
        new = [d for d in dups if d["id"] not in have]
        if new:  # first the error rows, then the shard without them: a crash between is finished by a rerun
            write_atomic(errors_path(out, b), pa.concat_tables([errors, pa.Table.from_pylist(new, schema=ERROR_SCHEMA)]))
        table = read_table(path, schema=SAMPLE_SCHEMA)
        drop = {d["id"] for d in dups}
        kept = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(drop)))))
        if kept.num_rows:
            write_atomic(path, kept)
        else:
            path.unlink()
        moved += len(dups)
    return moved


def _manifest(out, config, n_inputs: int, sources: list[dict], samples: pa.Table, errors: pa.Table) -> dict:
    rows = samples.drop_columns(["audio_codes"]).to_pylist()
    code_counts = pc.list_value_length(pc.list_flatten(samples.column("audio_codes"))).to_pylist() \
        if samples.num_rows else []
    audio_tokens = int(sum(code_counts))
    groups: dict[tuple[str, str], dict] = defaultdict(lambda: {"samples": 0, "hours": 0.0, "tokens": 0, "scored": 0})
    for row in rows:
        g = groups[row["source"], row["task"]]
        g["samples"] += 1
        g["hours"] += (row["audio_seconds"] or 0.0) / 3600
        g["tokens"] += row["num_tokens"]
        g["scored"] += row["num_scored"]
    rejects = Counter(errors.column("reason").to_pylist())
    audio = {row["audio_sha1"]: row["audio_seconds"] or 0.0 for row in rows if row["task"] != "text"}
    counts = {
        "inputs": n_inputs, "samples": len(rows), "errors": errors.num_rows,
        "hours": sum(audio.values()) / 3600,  # distinct audio (an utterance's ASR and TTS samples count once)
        "sample_hours": sum(g["hours"] for g in groups.values()), "tokens": sum(g["tokens"] for g in groups.values()),
        "scored_tokens": sum(g["scored"] for g in groups.values()), "audio_tokens": audio_tokens,
        "by_task": dict(sorted(Counter(r["task"] for r in rows).items())),
        "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
        "rejects": dict(sorted(rejects.items())),
        # what reading changed, per distinct audio: {"resampled 22050 Hz": n, "channel 0 of 2": n}
        "converted": dict(sorted(Counter(c for conv in {r["audio_sha1"]: r["converted"] or [] for r in rows
                                                        if r["task"] != "text"}.values() for c in conv).items())),
    }
    if counts["samples"] + counts["errors"] != n_inputs:  # every input is one row or one error row
        raise RuntimeError(f"{out}: {counts['samples']} rows + {counts['errors']} error rows != {n_inputs} inputs")
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()] \
        if (out / "runs.jsonl").exists() else []
    return {
        "schema_version": SCHEMA_VERSION, "counts": counts,
        "by_source_task": [{"source": s, "task": t, **g} for (s, t), g in sorted(groups.items())],
        "sources": sources, "shards": sorted(p.name for p in (out / "shards").glob("part-*.parquet")),
        "columns": {f.name: str(f.type) for f in SAMPLE_SCHEMA},
        "config": {"tasks": list(config.tasks), "ratio": list(config.ratio) if config.ratio else None,
                   "block_size": config.block_size, "checks": dataclasses.asdict(config.checks),
                   "encoder": dataclasses.asdict(config.encoder)},
        "runs": runs,
    }


def _report(manifest: dict, errors: pa.Table) -> str:
    c = manifest["counts"]
    lines = ["# Corpus preparation", "",
             f"{c['samples']} samples and {c['errors']} error rows from {c['inputs']} inputs; "
             f"{c['hours']:.3f} h of distinct audio ({c['sample_hours']:.3f} h over all samples), {c['tokens']} tokens ({c['scored_tokens']} scored, "
             f"{c['audio_tokens']} audio codes). Schema version {manifest['schema_version']}.", "",
             "## Per source and task", "", "| source | task | samples | hours | tokens | scored tokens |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {g['source']} | {g['task']} | {g['samples']} | {g['hours']:.4f} | {g['tokens']} | {g['scored']} |"
              for g in manifest["by_source_task"]]
    lines += ["", "## Rejects by reason", ""]
    if errors.num_rows:
        lines += ["| reason | inputs | example |", "|---|---|---|"]
        examples = {}
        for row in errors.to_pylist():
            examples.setdefault(row["reason"], f"{row['id']}: {row['detail']}")
        lines += [f"| {reason} | {n} | {examples[reason].replace('|', '/')[:160]} |"
                  for reason, n in c["rejects"].items()]
    else:
        lines.append("none")
    lines += ["", "## Converted on reading", ""]
    converted = c.get("converted") or {}
    lines += ["| conversion | audios |", "|---|---|", *(f"| {what} | {n} |" for what, n in converted.items())] \
        if converted else ["none (every audio was 16 kHz mono)"]
    lines += ["", "## Runs", "", "| started | inputs | wall s | start-up s | audio s per wall s |", "|---|---|---|---|---|"]
    for run in manifest["runs"]:
        rate = run.get("audio_s_per_s")
        lines.append(f"| {run['started_at']:.0f} | {run['inputs']} | {run['wall_s']:.1f} | "
                     f"{run.get('startup_s') or 0:.1f} | {rate:.2f} |" if rate else
                     f"| {run['started_at']:.0f} | {run['inputs']} | {run['wall_s']:.1f} | | |")
    return "\n".join(lines) + "\n"

