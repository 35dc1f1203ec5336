"""Shared fixtures: paths to ../shared, the tiny model set, and one Ray instance per test session.

Ray settings follow ../shared/research/environment.md §7 (short temp dir, small object store, no
dashboard) so the suite stays fast and two suites can run side by side.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITA_AUDIO_SHARED", REPO.parent / "shared"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_AUTH_MODE", None)  # Ray's token auth stays on, as for every local Ray the product starts
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # and its processes listen on loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared folder not found at {SHARED} (set VITA_AUDIO_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The built-in tiny set (llm/, encoder/, decoder/), written once per session in released formats."""
    from pipeline.tiny import write_tiny_set

    out = tmp_path_factory.mktemp("tiny-models")
    write_tiny_set(out, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per session with 3 logical GPUs (one per pipeline stage)."""
    import ray

    from actors.ray_runtime import close_local_ray
    from serve.proxy_errors import use_in_local_ray

    close_local_ray()  # loopback only, token auth on: as every local Ray the product starts
    use_in_local_ray()  # as `vita-audio serve` does: the Serve proxy's own errors in OpenAI's shape
    temp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    ray.init(
        num_cpus=2,
        num_gpus=3,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=False,
        _temp_dir=temp,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The modules on the shared Serve app (`serve_url`) run last, together: the app then starts once, and no
    other test starts or stops Serve while it is up (tests/test_serve_ops_cluster.py runs its own app)."""
    shared = {item.module for item in items if "serve_url" in getattr(item, "fixturenames", ())}
    items[:] = ([item for item in items if item.module not in shared]
                + [item for item in items if item.module in shared])


@pytest.fixture(scope="session")
def serve_url(ray_session, tiny_models):
    """The Serve app (tests/serve_testing.CAPS) on a free loopback port, shared by the Serve API test modules
    (one deployment instead of one per module); shut down at the end of the session."""
    from serve_testing import serve_app

    with serve_app(tiny_models) as url:
        yield url


@pytest.fixture(scope="module")
def local(tiny_models):
    """The in-process reference pipeline (LocalPipeline on the Serve stages' one torch thread) for one module."""
    from serve_testing import local_pipeline

    with local_pipeline(tiny_models) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (restored after): tiny models run fastest on one thread, and on
    a shared 2-core machine two OpenMP threads stall on other processes. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def llm_parity(shared_dir) -> dict:
    """../shared/parity/llm: its folder and files (inputs, generation runs, teacher-forced scalars, arrays)."""
    import json

    import numpy as np

    root = shared_dir / "parity" / "llm"
    return {
        "root": root,
        "inputs": json.loads((root / "inputs.json").read_text()),
        "gen": json.loads((root / "generation.json").read_text()),
        "tf": json.loads((root / "teacher_forced.json").read_text()),
        "npz": np.load(root / "expected.npz"),
    }
