"""Write a benchmark's results as JSON plus a markdown table, side by side in one folder."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def machine_info() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min: other work on a shared machine
    }


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts -> a GitHub markdown table (floats rounded to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(name: str, results: dict, markdown: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Save `<name>.json` (results + machine info) and `<name>.md`; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **results}
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=float))
    machine = payload["machine"]
    note = (f"{machine['cores']} cores, torch {machine['torch']}, {machine['date']}; load average "
            f"{machine['load_average'][1]} over the last 5 min (other processes share the machine)")
    md_path.write_text(f"# Benchmark `{name}`\n\n_{note}_\n\n{markdown}")
    return json_path, md_path


def int_list(text: str, flag: str) -> list[int]:
    """A benchmark flag like `--pool-sizes 1,2`: sorted distinct integers >= 1 (ValueError naming the flag)."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"{flag} must list integers >= 1, got {text!r}")
    return values
