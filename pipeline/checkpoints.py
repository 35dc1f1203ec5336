"""Weight files of a released model folder: safetensors or `pytorch_model.bin`, single or sharded + index.

Hub checkpoints come both ways (VITA-Audio's download instructions fetch `pytorch_model.bin` files), so
every loader reads them through here: the same strict key and shape checks apply to both, and `.bin`
files are read with `torch.load(weights_only=True)` (tensors only, no pickled code).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# (index file, single file) per format, in the order a folder is searched.
FORMATS = {
    "safetensors": ("model.safetensors.index.json", "model.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model.bin"),
}


class CheckpointError(ValueError):
    """A model folder whose weight files are missing, unreadable or do not match its config."""


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of `folder`: an index's shards, else the single file (safetensors first)."""
    root = Path(os.fspath(folder))
    for index_name, single in FORMATS.values():
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a weight index ({type(err).__name__}: {err})") from None
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists {', '.join(missing[:3])}, which {root} does not hold")
            return [root / n for n in names]
        if (root / single).is_file():
            return [root / single]
    raise CheckpointError(f"no weights in {str(root)!r}: expected model.safetensors or pytorch_model.bin "
                          "(or their .index.json with shards)")


def tensor_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's weight files, read without loading the data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as err:  # truncated or not a safetensors file
                raise CheckpointError(f"cannot read {file.name!r} in {str(file.parent)!r}: {err}") from None
        else:
            shapes.update({k: tuple(v.shape) for k, v in _load_bin(file, mmap=True).items()})
    return shapes


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files (on CPU)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state.update(load_file(str(file)))
            except Exception as err:
                raise CheckpointError(f"cannot read {file}: {err}") from None
        else:
            state.update(_load_bin(file))
    return state


def _load_bin(file: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # the legacy (non-zip) format cannot be memory-mapped
            return _load_bin(file, mmap=False)
        raise CheckpointError(f"cannot read {file}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    except Exception as err:  # truncated, not a torch file, or pickled objects other than tensors
        raise CheckpointError(f"cannot read {file}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return state


def convert_to_bin(folder: str | os.PathLike, shards: int = 1) -> list[Path]:
    """Rewrite a safetensors folder as `pytorch_model.bin` (shards > 1: `pytorch_model-0000i-of-0000n.bin` +
    index), the layout many hub checkpoints still ship; the safetensors files are removed."""
    root = Path(os.fspath(folder))
    old = weight_files(root)
    state = load_state_dict(root)
    keys = sorted(state)
    if shards <= 1:
        files = {"pytorch_model.bin": keys}
    else:
        per = -(-len(keys) // shards)
        files = {f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin": keys[i * per:(i + 1) * per] for i in range(shards)}
    for name, part in files.items():
        torch.save({k: state[k].contiguous() for k in part}, root / name)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: name for name, part in files.items() for k in part}
        (root / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for file in old:
        file.unlink()
    (root / FORMATS["safetensors"][0]).unlink(missing_ok=True)
    return [root / name for name in files]
