"""A local Ray that the product starts is closed to the network: every process of its session listens on loopback
only, and its job-submission route refuses a request without Ray's token (actors/ray_runtime.start_ray)."""
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
    import json, time, urllib.request, urllib.error
    import psutil, ray
    import ray._private.parameter as parameter
    from actors.ray_runtime import start_ray

    # Ray's dashboard agent serves the job route on a fixed port (52365) and runs without HTTP when that port is
    # taken, as it is by the test session's own Ray: this Ray's agent takes a free port instead (0: self-bound)
    ray_params_init = parameter.RayParams.__init__
    def with_free_agent_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        ray_params_init(self, *args, **kwargs)
    parameter.RayParams.__init__ = with_free_agent_port

    assert start_ray(num_cpus=1)

    @ray.remote
    def work():
        return 1

    assert ray.get(work.remote()) == 1  # a worker process is up too
    node = ray._private.worker._global_node
    session = node.get_session_dir_path()
    mine = {p.pid for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])}
    for pid in list(mine):
        mine |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    listening = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                        for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in mine})
    assert node.dashboard_agent_listen_port > 0, "the dashboard agent runs without its HTTP server (see its log)"
    request = urllib.request.Request(f"http://127.0.0.1:{node.dashboard_agent_listen_port}/api/job_agent/jobs/",
                                     data=json.dumps({"entrypoint": "touch /tmp/should-never-run"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    status, deadline = None, time.monotonic() + 30
    while status is None:  # the agent's HTTP server may still be starting
        try:
            status = urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as err:
            status = err.code
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    print(json.dumps({"listening": listening, "job_submission_status": status, "node_ip": node.node_ip_address}))
    ray.shutdown()
""")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    return {**env, **extra}


def test_a_local_ray_listens_on_loopback_only_and_refuses_unauthenticated_jobs():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=180,
                         env=_clean_env())
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print("listening sockets of the local Ray:", report["listening"])
    names = {name for _, _, name in report["listening"]}
    assert {"gcs_server", "raylet"} <= names, report  # the walk sees the real servers
    outside = [row for row in report["listening"] if row[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, f"listening beyond loopback: {outside}"
    assert report["node_ip"] == "127.0.0.1"
    assert report["job_submission_status"] == 401  # Ray's token auth is on: no job without the token


def test_switching_ray_auth_off_needs_the_explicit_flag():
    code = "from actors.ray_runtime import close_local_ray\ntry:\n    close_local_ray()\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=_clean_env(RAY_AUTH_MODE="disabled"))
    assert "--insecure-ray" in out.stdout, out.stdout + out.stderr
    code = ("import os\nfrom actors.ray_runtime import close_local_ray\nclose_local_ray(insecure=True)\n"
            "print(os.environ['RAY_AUTH_MODE'], os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=_clean_env())
    assert out.stdout.split() == ["disabled", "0"]  # still loopback only


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayservice.yaml", "rayjob-batch.yaml", "rayjob-prepare.yaml",
                                      "rayjob-train.yaml", "rayjob-tts.yaml"])
def test_the_kuberay_manifests_keep_ray_token_auth(manifest):
    text = (REPO / "cluster" / "kuberay" / manifest).read_text()
    assert "RAY_AUTH_MODE" not in text or "disabled" not in text.split("RAY_AUTH_MODE", 1)[1][:80]
    assert "authOptions" in text and "mode: token" in text, f"{manifest}: enable Ray's token auth (authOptions)"
