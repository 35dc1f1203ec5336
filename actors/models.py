"""The models folder (llm/, encoder/, decoder/): found from `--models`, $VITA_AUDIO_MODELS or the cached tiny set,
and checked from its files alone (no torch, no Ray), so a truncated, incomplete or foreign checkpoint — or a
folder of another kind (the speech encoder given as `--init`) — is refused before start-up."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from actors.errors import InputError

PARTS = ("llm", "encoder", "decoder")
KINDS = {
    "llm": "an LLM folder (config.json with model_type qwen2_mtp or qwen2, weights, tokenizer)",
    "encoder": "a speech-encoder folder (glm-4-voice-tokenizer: config.json of a WhisperVQ encoder, "
               "model.safetensors, preprocessor_config.json)",
    "decoder": "an audio-decoder folder (glm-4-voice-decoder: config.yaml, flow.pt, hift.pt)",
    "models": "a models folder (llm/, encoder/, decoder/)",
}
SHORT = {"llm": "LLM", "encoder": "speech-encoder", "decoder": "audio-decoder", "models": "models"}
LLM_TYPES = ("qwen2_mtp", "qwen2")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MCTP_FREE_MODES = ("vanilla",)  # the only named schedule that runs on a model without MCTP modules


def resolve_models_dir(models=None, llm=None) -> Path:
    """`--models`, else $VITA_AUDIO_MODELS, else the cached tiny set; a missing, partial or foreign folder is a
    InputError naming it. With `llm` (`--llm DIR`, e.g. a trained RUN/stage4), a models folder whose llm/ is
    that folder and whose encoder/ and decoder/ are the chosen set's (links in the cache, made once)."""
    chosen = models or os.environ.get("VITA_AUDIO_MODELS")
    flag = "--models" if models else "$VITA_AUDIO_MODELS"
    if chosen is None:
        from pipeline.tiny import default_models_dir

        root = default_models_dir()
    else:
        root = check_models_root(chosen, flag)
    if llm is None:
        return root
    return compose_models_dir(root, check_model_folder(llm, "llm", "--llm"))


def check_models_root(folder, flag: str = "--models") -> Path:
    """A folder holding llm/, encoder/, decoder/, each complete and of its kind (InputError otherwise)."""
    root = Path(os.fspath(folder))
    if not root.is_dir():
        raise InputError(f"{flag} {root}: not a folder (it must hold llm/, encoder/, decoder/)")
    missing = [part for part in PARTS if not (root / part).is_dir()]
    if missing:
        kind = folder_kind(root)
        what = f"; it is {KINDS[kind]}" if kind in PARTS else ""
        raise InputError(f"{flag} {root}: missing {', '.join(p + '/' for p in missing)}{what}")
    for part in PARTS:
        check_model_folder(root / part, part, f"{flag} {root}:", label=f"{part}/")
    return root


def check_model_folder(folder, kind: str, flag: str, label: str | None = None, tokenizer: bool = True) -> Path:
    """`folder` is a complete model folder of `kind` (llm, encoder, decoder), judged from its files alone:
    InputError naming the flag, what the folder is and what was expected. Returns the folder as a Path.
    `tokenizer=False`: an LLM folder used on token ids alone (`vita-audio generate`) needs none."""
    folder = Path(os.fspath(folder))
    where = f"{flag} {label or folder}"
    if not folder.exists():
        raise InputError(f"{where}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{where}: not a folder (expected {KINDS[kind]})")
    found = folder_kind(folder)
    if found == "models" and kind != "models":
        raise InputError(f"{where}: is {KINDS['models']}, expected {KINDS[kind]}: give its {kind}/")
    if found is not None and found != kind:
        raise InputError(f"{where}: is {KINDS[found]}, expected {KINDS[kind]}")
    config = _read_config(folder, where) if kind in ("llm", "encoder") else None
    if kind == "llm" and config is not None and config.get("model_type") not in LLM_TYPES:
        raise InputError(f"{where}: config.json has model_type {config.get('model_type')!r}, expected "
                         f"{KINDS['llm']}")
    missing = [name for name in _required(folder, kind) if not _present(folder, name)
               and (tokenizer or name != "tokenizer")]
    if missing:
        short = SHORT[kind]
        what = f"an incomplete {short}" if len(missing) < len(_required(folder, kind)) or found == kind \
            else f"not {'an' if short == 'LLM' else 'a'} {short}"
        raise InputError(f"{where}: {what} folder (no {', no '.join(missing)}; expected {KINDS[kind]})")
    _check_index(folder, where)
    check_weight_files(folder)
    return folder


def folder_kind(folder: Path) -> str | None:
    """What a folder holds, from its files: models, llm, encoder, decoder, or None (unknown / empty)."""
    folder = Path(folder)
    if all((folder / part).is_dir() for part in PARTS):
        return "models"
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        archs = " ".join(map(str, data.get("architectures") or []))
        if data.get("model_type") in LLM_TYPES:
            return "llm"
        if data.get("model_type") == "whisper" or "Whisper" in archs:
            return "encoder"
        return None
    if any((folder / name).is_file() for name in ("config.yaml", "flow.pt", "hift.pt")):
        return "decoder"
    return None


def llm_config(llm_dir) -> dict:
    """The LLM folder's config.json as a dict (InputError naming it when unreadable)."""
    return _read_config(Path(llm_dir), str(llm_dir))


def mctp_modules(llm_dir) -> int:
    """MCTP modules of an LLM folder from its config.json: num_nextn_predict_layers (0 for a plain Qwen2)."""
    config = llm_config(llm_dir)
    if config.get("model_type") == "qwen2":
        return 0
    return int(config.get("num_nextn_predict_layers") or 0)


def mode_needs_mctp(mode) -> bool:
    """True for a schedule that runs MCTP modules: boost, balance, turbo, exact, or a list with an MCTP step."""
    if mode is None:
        return False
    if isinstance(mode, str):
        text = mode.strip().strip("[]() ").lower()
        if "," not in text:
            return text not in MCTP_FREE_MODES
        try:
            mode = [int(v) for v in text.split(",")]
        except ValueError:
            return False  # not a schedule at all: the mode parser names it
    return any(int(v) > 0 for v in list(mode)[1::2])


def check_mode_for_model(mode, text, llm_dir, flag: str = "--mode") -> None:
    """Refuse (never downgrade) a schedule with MCTP steps on a model without MCTP modules. `mode` is the
    parsed value (a name or a list), `text` what the user typed."""
    if mode_needs_mctp(mode) and mctp_modules(llm_dir) == 0:
        raise InputError(f"{flag} {text}: the model in {Path(llm_dir).resolve()} has no MCTP modules (config.json "
                         "num_nextn_predict_layers 0), so only --mode vanilla runs on it")


def compose_models_dir(root: Path, llm: Path) -> Path:
    """A models folder of links: llm/ -> `llm`, encoder/ and decoder/ -> `root`'s (made once per pair, under
    $VITA_AUDIO_CACHE/composed; the linked folders are never copied or changed)."""
    llm, root = Path(llm).resolve(), Path(root).resolve()
    key = hashlib.sha256(f"{llm}\n{root}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VITA_AUDIO_CACHE") or Path.home() / ".cache" / "vita-audio")
    target = cache / "composed" / key
    links = {"llm": llm, "encoder": root / "encoder", "decoder": root / "decoder"}
    if all((target / n).is_symlink() and (target / n).resolve() == p.resolve() for n, p in links.items()):
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name, path in links.items():
        link = target / name
        tmp = target / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path, target_is_directory=True)
        os.replace(tmp, link)
    return target


def _read_config(folder: Path, where: str) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None  # named by the missing-files check
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a valid model config ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a valid model config (a JSON object expected)")
    return data


def _required(folder: Path, kind: str) -> list[str]:
    if kind == "llm":
        return ["config.json", "weights", "tokenizer"]
    if kind == "encoder":
        return ["config.json", "weights", "preprocessor_config.json"]
    return ["config.yaml", "flow.pt", "hift.pt"]


def _present(folder: Path, name: str) -> bool:
    if name == "weights":
        return any((folder / w).is_file() for w in WEIGHTS) or any(folder.glob("*.safetensors"))
    if name == "tokenizer":
        return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))
    return (folder / name).is_file()


def _check_index(folder: Path, where: str) -> None:
    """A sharded checkpoint's index names shards that exist."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = folder / index
        if not path.is_file():
            continue
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{path}: not a valid shard index (needs a weight_map)") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise InputError(f"{where}: {index} names shards that are missing: {', '.join(missing[:3])}")


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
