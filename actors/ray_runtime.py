"""Starting or joining Ray for a command, a job or a test: a local Ray on loopback, or a cluster checked to answer
within seconds. `ray` is imported inside the functions, so importing this module stays light."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from actors.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
              connect_timeout_s: float = 3.0) -> bool:
    """Join `address` or start a local Ray; True if this call started it (so the caller shuts it down).

    A dead `host:port` or `auto` without a running cluster fails within seconds as a InputError naming the
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
    """InputError naming `address` unless a Ray cluster answers there (`auto`: the one this machine runs)."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env != "auto":
            return check_address(env, timeout_s)
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if not current.is_file():
            raise InputError("--address auto: no running Ray cluster found on this machine (start one with "
                           "`ray start --head`, or leave --address out to start a local Ray)")
        address = current.read_text().strip()
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address {address!r}: expected host:port or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise InputError(f"--address {address}: no Ray cluster answering there ({err.strerror or err})") from None
