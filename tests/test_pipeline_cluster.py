"""The pipeline across simulated nodes (`ray.cluster_utils.Cluster`): SPREAD puts each stage on its own node
and a request still streams end to end.

Runs in a subprocess with its own Ray cluster, so it never collides with the session Ray of other tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import ray
    from ray.cluster_utils import Cluster
    from actors.config import PipelineConfig
    from actors.staged_pipeline import StagedPipeline, collect

    models = sys.argv[1]
    node = dict(num_cpus=1, num_gpus=2, object_store_memory=128 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
    for _ in range(2):
        cluster.add_node(**node)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    cluster.wait_for_nodes()
    try:
        config = PipelineConfig.from_models_dir(models, placement_strategy="SPREAD", stage_timeout_s=60)
        config.decoder.n_steps = 2
        pipe = StagedPipeline.start(config)
        try:
            placement = {stage: p.to_dict() for stage, p in pipe.placement().items()}
            result = collect(pipe.tts("Across the cluster.", max_new_tokens=24))
            report = {
                "placement": placement,
                "nodes": len(ray.nodes()),
                "ok": result.ok,
                "error": None if result.error is None else result.error.message,
                "samples": int(len(result.pcm)),
                "chunks": len(result.chunks),
            }
        finally:
            pipe.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_spread_places_each_stage_on_its_own_node(tiny_models):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_models)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 3
    placement = report["placement"]
    assert len({p["node_id"] for p in placement.values()}) == 3  # SPREAD: one stage per node
    assert all(len(p["gpu_ids"]) == 1 for p in placement.values())
    assert report["ok"], report["error"]
    assert report["samples"] > 0 and report["chunks"] >= 1
