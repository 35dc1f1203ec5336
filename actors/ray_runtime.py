"""Starting or joining Ray for a command, a job or a test: a local Ray closed to the network, or a cluster checked
to answer within seconds. `ray` is imported inside the functions, so importing this module stays light.

A local Ray is closed by default: every process it starts (GCS, raylet, workers, the dashboard agent and its
job-submission route, the runtime-env agent) listens on loopback only, and Ray's token authentication (on by default
since Ray 2.60; the first start writes ~/.ray/auth_token) stays on, so nobody who reaches the machine can submit a
job. `insecure=True` (the CLI's `--insecure-ray`) switches the token off for that local Ray only.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from actors.errors import InputError

REPO = Path(__file__).resolve().parents[1]


LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes the loopback address as the node's


def close_local_ray(insecure: bool = False) -> None:
    """Make the local Ray that this process starts next listen on loopback only, with token auth unless `insecure`.

    Ray picks a node's address (and with it every server's bind address) from `ray_constants.ENABLE_RAY_CLUSTER`:
    off, the node is 127.0.0.1 and nothing listens beyond it. The environment variable reaches the processes Ray
    spawns; the constant is set too when `ray` was imported before this call. Only for a local start: a driver
    that joins a cluster (`--address`) must keep its routable address.
    """
    os.environ[LOOPBACK_ONLY_ENV] = "0"
    if insecure:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    elif os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise InputError("RAY_AUTH_MODE=disabled is set: a local Ray without its token auth lets anyone who reaches "
                         "this machine run commands; unset it, or pass --insecure-ray to mean it")
    import sys

    if "ray" in sys.modules:
        from ray._private import ray_constants  # read when the node address is resolved, set at ray's import

        ray_constants.ENABLE_RAY_CLUSTER = False


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
              connect_timeout_s: float = 3.0, insecure: bool = False) -> bool:
    """Join `address` or start a local Ray closed to the network (`close_local_ray`); True if this call started it
    (so the caller shuts it down).

    A dead `host:port` or `auto` without a running cluster fails within seconds as an InputError naming the
    address; Ray itself would retry for a long time.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_address(address, connect_timeout_s)
        ray.init(address=address, log_to_driver=False)
        return True
    close_local_ray(insecure)
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


def assigned_gpu_ids() -> list[str]:
    """GPU ids Ray assigned the current worker ([] outside Ray or without GPUs)."""
    import ray

    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def ray_device():
    """The (torch device, dtype) a stage in this Ray worker computes on: cuda:0 in bf16 when Ray gave the worker
    a GPU and CUDA exists, else CPU in fp32 (`actors.placement.device_for`)."""
    from actors.placement import device_for

    return device_for(assigned_gpu_ids())


def ray_where():
    """This worker's node, IP, assigned GPU ids and actor id (`actors.placement.Where`)."""
    import ray

    from actors.placement import Where

    if not ray.is_initialized():
        return Where()
    context = ray.get_runtime_context()
    return Where(node_id=context.get_node_id(), ip=ray.util.get_node_ip_address(), gpu_ids=assigned_gpu_ids(),
                 actor_id=context.get_actor_id() or "")
