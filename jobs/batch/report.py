"""DIR/summary.json and DIR/report.md of a batch job, computed from its result files (so a rerun that
processed nothing still reports the whole job).

Counts (inputs, rows, ok, errors, ids missing or repeated), audio hours (input audio for ASR, synthesised
audio for TTS), wall time of the runs that did work, real-time factor (wall / audio) and its inverse RTFx
(audio seconds per wall second), inputs per second, each stage's summed busy time, and for ASR rows with a
reference transcript the corpus word and character error rates (`jiwer`, after lower-casing and dropping
punctuation on both sides).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

from jobs.batch.results import read_results, transient
from jobs.storage import location, write_atomic

_NOT_WORD = re.compile(r"[^\w' ]+")


def normalise(text: str) -> str:
    """Lower case, punctuation and control characters dropped, whitespace collapsed (for WER / CER)."""
    return " ".join(_NOT_WORD.sub(" ", (text or "").lower()).split())


def error_rates(references: list[str], hypotheses: list[str]) -> dict | None:
    """Corpus WER / CER over the pairs whose reference is not empty (None if there is none)."""
    import jiwer

    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses) if normalise(r)]
    if not pairs:
        return None
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)), "scored": len(pairs)}


def summarise(out: str | os.PathLike, task: str, n_inputs: int, this_run: dict | None = None) -> dict:
    """The job's summary from its result files. `complete`: one row per input and none of them a transient
    error (a stage crash or out of memory, which a rerun retries)."""
    out = location(out)
    rows = read_results(out, task).to_pylist()
    ids = Counter(r["id"] for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    audio_s = sum(r["audio_seconds"] or 0.0 for r in (rows if task == "asr" else ok))
    runs = _runs(out)
    wall = sum(run["wall_s"] for run in runs)
    summary = {
        "task": task,
        "inputs": n_inputs,
        "rows": len(rows),
        "ok": len(ok),
        "errors": len(rows) - len(ok),
        "transient_errors": sum(transient(r) for r in rows),
        "repeated_ids": sorted(i for i, n in ids.items() if n > 1),
        "complete": len(rows) == n_inputs and len(ids) == n_inputs and not any(transient(r) for r in rows),
        "audio_hours": audio_s / 3600,
        "wall_s": wall,
        "runs": len(runs),
        "rtf": wall / audio_s if audio_s else None,
        "rtfx": audio_s / wall if wall else None,
        "inputs_per_s": sum(run["inputs"] for run in runs) / wall if wall else None,
        "stage_busy_s": {s: sum(r[f"{s}_s"] or 0.0 for r in rows) for s in ("encode", "llm", "decode")},
        "this_run": this_run,
    }
    if task == "asr":
        scored = [r for r in ok if r["reference"]]
        summary["error_rates"] = error_rates([r["reference"] for r in scored], [r["text"] for r in scored])
    summary["first_errors"] = [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] != "ok"][:20]
    return summary


def write_report(out: str | os.PathLike, task: str, n_inputs: int, this_run: dict | None = None) -> dict:
    out = location(out)
    summary = summarise(out, task, n_inputs, this_run)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_atomic(out / "report.md", markdown(summary))
    return summary


def markdown(s: dict) -> str:
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"# Batch {s['task'].upper()} report", "",
        f"{s['rows']} rows for {s['inputs']} inputs ({'complete' if s['complete'] else 'INCOMPLETE'}): "
        f"{s['ok']} ok, {s['errors']} errors"
        + (f" ({s['transient_errors']} transient: rerun to retry them)." if s.get("transient_errors") else ".")
        + "", "",
        "| metric | value |", "|---|---|",
        f"| audio | {s['audio_hours'] * 3600:.1f} s ({s['audio_hours']:.4f} h) |",
        f"| wall time (runs that did work: {s['runs']}) | {s['wall_s']:.1f} s |",
        f"| real-time factor (wall / audio) | {fmt(s['rtf'])} |",
        f"| RTFx (audio s per wall s) | {fmt(s['rtfx'], '.2f')} |",
        f"| inputs per second | {fmt(s['inputs_per_s'], '.2f')} |",
    ]
    lines += [f"| {stage} stage busy (summed over rows) | {busy:.1f} s |"
              for stage, busy in s["stage_busy_s"].items() if busy]
    rates = s.get("error_rates")
    if rates:
        lines += [f"| WER ({rates['scored']} rows with a reference) | {rates['wer']:.2%} |",
                  f"| CER | {rates['cer']:.2%} |"]
    if s["repeated_ids"]:
        lines += ["", f"**Ids with more than one row:** {', '.join(s['repeated_ids'][:20])}"]
    if s["first_errors"]:
        lines += ["", "## Errors (first 20)", "", "| id | error |", "|---|---|"]
        lines += [f"| {e['id']} | {e['error'].replace('|', '/')[:200]} |" for e in s["first_errors"]]
    return "\n".join(lines) + "\n"


def _runs(out) -> list[dict]:
    path = out / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

