"""Helpers every `vita-audio` command shares: the user-error type, the models folder, starting or joining Ray.

Kept free of torch and ray at import time so `--help` and argument errors stay fast.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class CLIError(Exception):
    """A user-facing error: printed as one line naming the input, exit code 2."""


def resolve_models_dir(models=None) -> Path:
    """`--models`, else $VITA_AUDIO_MODELS, else the cached tiny set; a missing or partial folder is a CLIError."""
    chosen = models or os.environ.get("VITA_AUDIO_MODELS")
    if chosen is None:
        from pipeline.tiny import default_models_dir

        return default_models_dir()
    root = Path(os.fspath(chosen))
    if not root.is_dir():
        raise CLIError(f"--models {root}: not a folder (it must hold llm/, encoder/, decoder/)")
    missing = [part for part in ("llm", "encoder", "decoder") if not (root / part).is_dir()]
    if missing:
        raise CLIError(f"--models {root}: missing {', '.join(p + '/' for p in missing)}")
    for part in ("llm", "encoder", "decoder"):
        check_weight_files(root / part)
    return root


def check_weight_files(folder: Path) -> None:
    """CLIError naming a truncated or foreign weight file, found from file headers alone (no torch, no Ray).

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
            raise CLIError(f"{path}: {problem}")


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


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
              connect_timeout_s: float = 3.0) -> bool:
    """Join `address` or start a local Ray; True if this call started it (so the caller shuts it down).

    A dead `host:port` or `auto` without a running cluster fails within seconds as a CLIError naming the
    address; Ray itself would retry for a long time.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_address(address, connect_timeout_s)
        ray.init(address=address, log_to_driver=False)
        return True
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(num_gpus=num_gpus, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return True


def free_port() -> int:
    """A free TCP port on the loopback address (for a local Serve app of a benchmark or test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """CLIError naming `address` unless a Ray cluster answers there (`auto`: the one this machine runs)."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env != "auto":
            return check_address(env, timeout_s)
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if not current.is_file():
            raise CLIError("--address auto: no running Ray cluster found on this machine (start one with "
                           "`ray start --head`, or leave --address out to start a local Ray)")
        address = current.read_text().strip()
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise CLIError(f"--address {address!r}: expected host:port or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise CLIError(f"--address {address}: no Ray cluster answering there ({err.strerror or err})") from None


# ---------------------------------------------------------------------------------------------------------
# Resumable job folders (batch, prepare): one driver at a time, and a rerun only with the same plan


def lock_run_folder(out: Path, job: str):
    """An exclusive lock on OUT/.lock, held while the returned handle is open (or its process lives): two
    drivers on one folder would each write the blocks they lack."""
    import fcntl

    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CLIError(f"--out {out}: another {job} run is writing there (wait for it, or choose a new --out)") from None
    return handle


def check_run_plan(out: Path, plan: dict) -> None:
    """Write OUT/plan.json on the first run; on a rerun refuse any difference (results would mix)."""
    path = out / "plan.json"
    if not path.exists():
        temp = path.with_name(".plan.json.tmp")
        temp.write_text(json.dumps(plan, indent=1) + "\n")
        os.replace(temp, path)
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(plan))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise CLIError(f"--out {out} holds a run with other settings ({', '.join(changed)} differ): rerun with "
                       "the same inputs and settings to resume it, or choose a new --out")


@dataclass
class PoolConfig:
    """One Ray Data actor pool of a job (batch stages, the preparation's speech encoder)."""

    size: int = 1  # actors (each loads its model once)
    num_gpus: float = 0.0  # per actor
    num_cpus: float = 0.5  # per actor (Ray's logical CPUs: a fraction lets pools share a small machine)
    batch_size: int = 8  # rows per call of the actor

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"actors per pool={self.size!r} must be an integer >= 1")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"GPUs ({self.num_gpus!r}) and CPUs ({self.num_cpus!r}) per actor must be >= 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"rows per call={self.batch_size!r} must be an integer >= 1")
