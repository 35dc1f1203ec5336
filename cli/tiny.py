"""`vita-audio tiny DIR [--seed N] [--llm-size NAME] [--force] [--format safetensors|bin]`: write the tiny random
model set in the released on-disk formats (`--llm-size small`: a deeper LLM beside the same tokenizer, encoder and
decoder, as the training acceptance starts from).

Never destroys anything: DIR must be new, empty, or (with --force) hold only a previous tiny set, file for
file. The set is written to a sibling temporary folder first and moved into place when complete.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from actors.errors import InputError
from cli import checks

PARTS = ("llm", "encoder", "decoder")
RANDOM_LLM_SIZES = ("tiny", "small", "bench")  # pipeline.sizes worth writing at random (not the 7B's 30 GB)
# The weight files of a tiny set in either --format (so --force may switch formats).
WEIGHT_NAMES = {"llm/model.safetensors", "encoder/model.safetensors", "encoder/pytorch_model.bin",
                "llm/pytorch_model.bin.index.json", "llm/pytorch_model-00001-of-00002.bin",
                "llm/pytorch_model-00002-of-00002.bin"}


def add_arguments(p, name: str) -> None:
    p.add_argument("dir", type=Path, help="output folder (new or empty); gets llm/, encoder/, decoder/")
    p.add_argument("--seed", type=checks.seed, default=0)
    p.add_argument("--llm-size", default="tiny", choices=RANDOM_LLM_SIZES,
                   help="LLM shape (pipeline.sizes); the tokenizer, encoder and decoder stay tiny")
    p.add_argument("--force", action="store_true", help="replace a previous tiny set in DIR (nothing else)")
    p.add_argument("--format", choices=("safetensors", "bin"), default="safetensors",
                   help="weight files: safetensors (the releases), or pytorch_model.bin as many hub checkpoints "
                        "ship them (llm/ sharded in 2 with an index, encoder/ one file)")
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    out = Path(os.fspath(args.dir))
    existing = _check_target(out, args.force)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        parent.mkdir(parents=True)
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: cannot write into {parent}")
    from pipeline.tiny import TINY_MARKER, write_tiny_set

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tiny-", dir=parent))
    try:
        write_tiny_set(tmp, seed=args.seed, llm=args.llm_size)
        if args.format == "bin":
            from pipeline.checkpoints import convert_to_bin

            convert_to_bin(tmp / "llm", shards=2)
            convert_to_bin(tmp / "encoder", shards=1)
        fresh = _files(tmp)
        foreign = sorted(existing - fresh - WEIGHT_NAMES - {".completed"})
        if foreign:  # a folder that looked like a tiny set but holds other files: keep it untouched
            raise InputError(f"{out}: holds files a tiny set does not have ({', '.join(foreign[:3])}); "
                           "not replacing it — choose an empty folder")
        out.mkdir(exist_ok=True)
        for name in (*PARTS, TINY_MARKER):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)  # only a previous tiny part, checked file for file above
            elif target.exists():
                target.unlink()
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    paths = {name: str(out / name) for name in PARTS}
    if not args.json:
        counts = ", ".join(f"{n}/ ({sum(1 for f in (out / n).rglob('*') if f.is_file())} files)" for n in PARTS)
        print(f"wrote the tiny random model set (seed {args.seed}, LLM {args.llm_size}) to {out}: {counts}")
    print(f"note: {out} holds random weights ({TINY_MARKER}); it is for tests, not a checkpoint", file=sys.stderr)
    return {**paths, "dir": str(out), "seed": args.seed, "llm_size": args.llm_size, "format": args.format,
            "replaced": bool(existing)}


def _check_target(out: Path, force: bool) -> set[str]:
    """The relative files already in `out` (empty set for a new/empty folder); InputError if we may not write."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not out.exists():
        return set()
    existing = _files(out)
    if not existing and not any(out.iterdir()):
        return set()
    from pipeline.tiny import is_tiny_set

    if not is_tiny_set(out):
        raise InputError(f"{out}: not empty and not a tiny set; refusing to write into it (choose a new folder)")
    if not force:
        raise InputError(f"{out}: already holds a tiny set; pass --force to replace it")
    return existing


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}
