"""Node autoscaling on Ray's own autoscaler: a head that holds one LLM replica (its one logical GPU), a burst that
makes Serve ask for a second, the autoscaler adding a GPU worker node for it, the new replica serving, and after
the burst the replica and then the node going away. Node and replica counts over time are printed.

The cluster is what `ray.cluster_utils.AutoscalingCluster` builds (Ray's fake multi-node provider: the real
autoscaler launches each worker node as a raylet process on this machine), started here rather than through that
class: in Ray 2.60 it reads an example config its wheel does not ship, and its start and shutdown run
`ray stop --force`, which would end every Ray on the machine. This one stays closed like every local Ray of the
project (loopback only, token auth on) and is stopped by the process ids it started.

The scenario runs in a driver of its own (this file as a script): a pytest process holds at most one Ray
connection, and other modules' session Ray may be it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
APP = "vita"
# Serve's load metrics every 0.5 s (read at process start: set for the whole cluster and the app's replicas)
PUSH = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
# one GPU on the head: one LLM replica; a second needs the worker node
LLM = {"num_gpus": 1, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
       "downscale_delay_s": 6, "look_back_period_s": 5, "metrics_interval_s": 0.5, "max_ongoing_requests": 8,
       "max_queued_requests": -1, "health_check_period_s": 1, "graceful_shutdown_timeout_s": 1}
HEAD = {"CPU": 2, "GPU": 1}
WORKER_TYPE = "gpu.worker"
WORKER = {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 128 * 2**20}, "node_config": {},
          "min_workers": 0, "max_workers": 1}
TOKEN = {"RAY_AUTH_MODE": "token"}  # the cluster and every process that joins it: Ray's token (~/.ray/auth_token)
IDLE_TIMEOUT_MIN = 0.1  # an idle worker node is removed after 6 s
BURST_CLIENTS = 4
WAIT_S = 420.0


def cluster_config(gcs_address: str) -> dict:
    """The fake multi-node autoscaling config (the fields of Ray's fake_multi_node/example.yaml)."""
    return {"cluster_name": "vita-node-autoscaling", "max_workers": 1, "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
            "upscaling_speed": 1.0, "head_node_type": "ray.head.default",
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": {"ray.head.default": {"resources": HEAD, "node_config": {}, "max_workers": 0},
                                     WORKER_TYPE: WORKER},
            "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


@contextlib.contextmanager
def autoscaling_cluster(folder: Path):
    """`ray start --head --autoscaling-config` on loopback ports with the fake provider; yields the address and
    Ray's temp folder.
    Stopped by pid: the `ray start --block` process and everything it started (GCS, raylet, the autoscaler and the
    worker nodes the autoscaler launched), snapshotted before any is signalled."""
    import psutil

    from actors.ray_runtime import LOOPBACK_ONLY_ENV, free_port

    port, client_port, autoscaler_metrics = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    config = folder / "autoscaling.json"
    config.write_text(json.dumps(cluster_config(address)))
    temp = tempfile.mkdtemp(prefix="vn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **PUSH, **TOKEN, LOOPBACK_ONLY_ENV: "0", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", f"--ray-client-server-port={client_port}",
         f"--autoscaling-config={config}", f"--num-cpus={HEAD['CPU']}", f"--num-gpus={HEAD['GPU']}",
         f"--object-store-memory={256 * 2**20}", "--include-dashboard=false", "--dashboard-agent-listen-port=0",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=open(folder / "ray-start.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: head.poll() is not None or (folder / "ray-start.log").read_text().count("Ray runtime started"),
              120, "the head started")
        assert head.poll() is None, (folder / "ray-start.log").read_text()[-3000:]
        yield address, temp
    finally:
        children = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.send_signal(signal.SIGTERM)
        for proc in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(children, timeout=20)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(10)
        if head.poll() is None:
            head.kill()
        for log in [*Path(temp).glob("session_latest/logs/monitor.*"), *Path(temp).glob("session_latest/logs/serve/*")]:
            shutil.copy(log, folder)  # the autoscaler's and Serve's logs stay with the test's tmp_path
        shutil.rmtree(temp, ignore_errors=True)


def _wait(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"not within {timeout_s:g} s: {what}")


def test_the_rayservice_lets_ray_add_and_remove_gpu_nodes(shared_dir):
    """On KubeRay the same scaling is Ray's in-tree autoscaler: enabled, an idle timeout, and GPU worker groups
    whose min/max bound the nodes it may add; the LLM group holds as many nodes as the LLM has replicas (one GPU
    each). The manifest validates against KubeRay's CRD schema."""
    import jsonschema

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    crd = yaml.safe_load((shared_dir / "schemas" / "kuberay" / "ray.io_rayservices.yaml").read_text())
    jsonschema.validate(manifest, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    (app,) = [a for a in yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"] if a["name"] == APP]
    llm = app["args"]["llm"]
    assert groups["llm"]["maxReplicas"] >= llm["max_replicas"] * llm["num_gpus"] and groups["llm"]["minReplicas"] >= 1


@pytest.mark.slow
def test_a_burst_adds_a_gpu_node_whose_replica_serves_then_both_go_away(tmp_path, tiny_models):
    with autoscaling_cluster(tmp_path) as (address, temp):
        proc = subprocess.run([sys.executable, __file__, address, str(tiny_models), temp], cwd=REPO,
                              capture_output=True, text=True, timeout=3 * WAIT_S, env={**os.environ, **TOKEN})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the result's line (Ray's own log lines may still come after it, at the driver's exit)
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"timeline"')))
    timeline = result["timeline"]
    print("\n  t (s)  nodes  LLM replicas running (starting)  phase      [sampled each second; changes shown]")
    key = lambda row: (row["nodes"], row["running"], row["starting"], row["phase"])
    for before, row in zip([None, *timeline], timeline):
        if before is None or key(before) != key(row) or row is timeline[-1]:
            print(f"  {row['t']:5.0f}  {row['nodes']:5d}  {row['running']:12d} ({row['starting']})"
                  f"{'':17s}{row['phase']}")
    assert timeline[0]["nodes"] == 1 and timeline[0]["running"] == 1  # the head alone holds one replica
    peak = [row for row in timeline if row["nodes"] == 2 and row["running"] == 2]
    assert peak, "the burst never had a second node and a second running replica"
    assert result["gpus_at_peak"] == 2  # the head's GPU + the new node's: the second replica is on the new node
    assert result["burst_errors"] == [], result["burst_errors"]
    served = result["llm_calls_per_replica"]
    assert sum(n > 0 for n in served.values()) >= 2, served  # the new replica served requests too
    after = [row for row in timeline if row["t"] > peak[-1]["t"]]
    replica_gone = next(row["t"] for row in after if row["running"] == 1)
    node_gone = next(row["t"] for row in after if row["nodes"] == 1)
    assert replica_gone <= node_gone  # the replica goes first, then its idle node
    assert timeline[-1]["nodes"] == 1 and timeline[-1]["running"] == 1
    assert result["after"] == 200  # and the endpoint still answers


# -- the scenario's driver (this file run as a script) -----------------------------------------------------------
def scenario(address: str, models: str, temp: str) -> dict:
    import threading

    import httpx
    import ray
    from ray import serve

    from actors.ray_runtime import free_port
    from serve.app import build_app

    ray.init(address=address, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})  # one proxy: one port
    serve.run(build_app({"models": models, "llm": LLM, "env_vars": PUSH, "max_tokens": 4096}), name=APP,
              route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    timeline, phase, start, stop = [], ["steady"], time.monotonic(), threading.Event()

    def counts() -> dict:
        states = serve.status().applications[APP].deployments["vita-llm"].replica_states
        named = {str(k).rsplit(".", 1)[-1]: v for k, v in states.items()}
        return {"t": time.monotonic() - start, "nodes": sum(n["Alive"] for n in ray.nodes()),
                "running": named.get("RUNNING", 0), "starting": named.get("STARTING", 0) + named.get("PENDING_ALLOCATION", 0),
                "phase": phase[0]}

    def sample() -> None:
        while not stop.is_set():
            timeline.append(counts())
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(1.5)  # a steady sample or two first
    phase[0], errors, gpus_at_peak = "burst", [], []

    def client() -> None:
        # text answers: LLM work only, so the LLM's ongoing requests stay at the client count during the burst
        body = {"model": "vita-audio", "modalities": ["text"], "max_completion_tokens": 384,
                "messages": [{"role": "user", "content": "Tell me a long story, please."}]}
        with httpx.Client(timeout=300) as http:
            while phase[0] == "burst":
                r = http.post(f"{base}/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    clients = [threading.Thread(target=client) for _ in range(BURST_CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        two = _wait(lambda: next((c for c in [counts()] if c["running"] == 2 and c["nodes"] == 2), None), WAIT_S,
                    "a second node and replica")
        gpus_at_peak.append(ray.cluster_resources().get("GPU", 0))
        # the burst goes on over both replicas until each has answered LLM calls
        _wait(lambda: sum(n > 0 for n in _llm_calls_per_replica(Path(temp)).values()) >= 2, WAIT_S,
              "calls answered by both LLM replicas")
    finally:
        phase[0] = "quiet"
        for thread in clients:
            thread.join()
    _wait(lambda: (c := counts())["running"] == 1 and c["nodes"] == 1, WAIT_S, "back to one replica and one node")
    time.sleep(2)
    stop.set()
    sampler.join()
    after = httpx.post(f"{base}/v1/audio/speech", timeout=300, json={"model": "vita-audio", "input": "Still there?", "max_new_tokens": 16,
                                               "response_format": "wav"}).status_code
    serve.shutdown()
    return {"timeline": timeline, "burst_errors": errors, "gpus_at_peak": gpus_at_peak[0], "peak_at": two["t"],
            "llm_calls_per_replica": _llm_calls_per_replica(Path(temp)), "after": after}


def _llm_calls_per_replica(temp: Path) -> dict:
    """Calls each LLM replica answered, from Serve's access log of each replica (every node of this fake cluster
    writes into the head's session folder: one machine)."""
    calls = {}
    for log in (temp / "session_latest" / "logs" / "serve").glob(f"replica_{APP}_vita-llm_*.log"):
        lines = log.read_text(errors="replace").splitlines()
        calls[log.stem.rsplit("_", 1)[-1]] = sum("-- CALL generate OK" in line for line in lines)
    return calls


if __name__ == "__main__":
    print(json.dumps(scenario(*sys.argv[1:4])))
