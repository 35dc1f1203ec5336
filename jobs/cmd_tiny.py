"""`vita-audio tiny DIR [--seed N]`: write the tiny random model set in the released on-disk formats."""
from __future__ import annotations

from pathlib import Path


def add_arguments(p, name: str) -> None:
    p.add_argument("dir", type=Path, help="output folder; gets llm/, encoder/, decoder/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    from pipeline.tiny import write_tiny_set

    paths = write_tiny_set(args.dir, seed=args.seed)
    return {name: str(path) for name, path in paths.items()}
