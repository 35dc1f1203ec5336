"""The models folder (llm/, encoder/, decoder/): found from `--models`, $VITA_AUDIO_MODELS or the cached tiny set,
and checked from its files alone (no torch, no Ray), so a truncated or foreign checkpoint is refused before start-up."""
from __future__ import annotations

import json
import os
from pathlib import Path

from actors.errors import InputError


def resolve_models_dir(models=None) -> Path:
    """`--models`, else $VITA_AUDIO_MODELS, else the cached tiny set; a missing or partial folder is a InputError."""
    chosen = models or os.environ.get("VITA_AUDIO_MODELS")
    if chosen is None:
        from pipeline.tiny import default_models_dir

        return default_models_dir()
    root = Path(os.fspath(chosen))
    if not root.is_dir():
        raise InputError(f"--models {root}: not a folder (it must hold llm/, encoder/, decoder/)")
    missing = [part for part in ("llm", "encoder", "decoder") if not (root / part).is_dir()]
    if missing:
        raise InputError(f"--models {root}: missing {', '.join(p + '/' for p in missing)}")
    for part in ("llm", "encoder", "decoder"):
        check_weight_files(root / part)
    return root


def check_weight_files(folder: Path) -> None:
    """InputError naming a truncated or foreign weight file, found from file headers alone (no torch, no Ray).

    safetensors: the header's last data offset must end where the file ends; .bin / .pt (torch's zip
    format): the zip directory at the end of the file must read. A stage would otherwise find out only
    after Ray and the other stages started.
    """
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            problem = _torch_zip_problem(path)
        else:
            continue
        if problem:
            raise InputError(f"{path}: {problem}")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"not a safetensors file ({size} bytes)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"truncated or not a safetensors file (header of {n} bytes, file of {size})"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "not a safetensors file (unreadable header)"
    if 8 + n + end != size:
        return f"truncated: its header needs {8 + n + end} bytes, the file has {size}"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x80\x02" or magic[:1] == b"\x80":  # torch's legacy pickle format: no cheap check
        return None
    if magic != b"PK\x03\x04":
        return "not a torch checkpoint (neither its zip nor its legacy format)"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"truncated or damaged torch checkpoint ({err})"
    return None
