"""Operating the endpoint: the shipped Serve config builds the same app as `vita-audio serve` and the RayService,
`vita-audio serve` refuses bad flags before Ray, and (slow) serves /health and speech on 127.0.0.1 and stops
cleanly on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serve_testing import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "serve" / "config.yaml"


def _app_entry() -> dict:
    """The speech app's entry (beside it: the /health application, serve.health)."""
    apps = yaml.safe_load(CONFIG.read_text())["applications"]
    (app,) = [a for a in apps if a["import_path"] == "serve.app:build_app"]
    assert [a["import_path"] for a in apps if a is not app] == ["serve.health:build_health"]
    return app


def test_shipped_config_is_one_app_of_build_app():
    from serve.app import Args

    app = _app_entry()
    assert app["import_path"] == "serve.app:build_app" and app["route_prefix"] == "/"
    args = Args.model_validate(app["args"])  # every key is an Args field (extra=forbid)
    assert args.llm.max_replicas > 1 and args.decoder.max_replicas > 1
    llm = args.stage_scaling("llm").options("vita-llm")
    assert llm["autoscaling_config"]["max_replicas"] == args.llm.max_replicas
    assert llm["ray_actor_options"]["num_gpus"] == args.llm.num_gpus
    assert llm["max_queued_requests"] == args.llm.max_queued_requests


def test_build_app_from_the_config_and_from_key_values_is_the_same_app(tiny_models):
    """`serve run serve/config.yaml` passes the config's args to build_app; `serve run serve.app:build_app k=v`
    passes strings; vita-audio serve passes Args: the same deployments with the same options."""
    from serve.app import Args, build_app

    values = {**_app_entry()["args"], "models": str(tiny_models)}
    one = _deployments(build_app(values))
    two = _deployments(build_app(Args.model_validate(values)))
    three = _deployments(build_app({k: str(v) if isinstance(v, (int, float)) else v for k, v in values.items()}))
    assert one == two == three
    assert set(one) == {"vita-ingress", "vita-encoder", "vita-llm", "vita-decoder"}
    assert one["vita-llm"]["max_replicas"] == values["llm"]["max_replicas"]
    assert one["vita-ingress"]["max_queued_requests"] == values["max_waiting_requests"]


def _deployments(app) -> dict:
    """name -> the options that matter, for a bound application (the ingress and the stages bound to it)."""
    out = {}

    def walk(node):
        if not hasattr(node, "_bound_deployment"):
            return
        deployment = node._bound_deployment
        config = deployment._deployment_config
        auto = config.autoscaling_config
        out[deployment.name] = {"max_replicas": auto.max_replicas if auto else None,
                                "max_queued_requests": config.max_queued_requests,
                                "max_ongoing_requests": config.max_ongoing_requests,
                                "actor": deployment.ray_actor_options}
        for arg in deployment.init_args:
            walk(arg)

    walk(app)
    return out


def test_rayservice_serves_the_shipped_config():
    """The RayService's serveConfigV2 is serve/config.yaml verbatim, and its worker groups hold the stages'
    GPUs at the config's max replicas."""
    service = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    assert service["spec"]["serveConfigV2"] == CONFIG.read_text()
    assert service["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    args = _app_entry()["args"]
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}

    def gpus(group) -> int:
        (container,) = group["template"]["spec"]["containers"]
        assert "readinessProbe" in container and "livenessProbe" in container
        return int(container["resources"]["limits"]["nvidia.com/gpu"]) * group["maxReplicas"]

    assert gpus(groups["llm"]) >= args["llm"]["num_gpus"] * args["llm"]["max_replicas"]
    assert gpus(groups["codec"]) >= sum(args[s]["num_gpus"] * args[s]["max_replicas"] for s in ("encoder", "decoder"))
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"]["path"] == "/health"


def test_bad_replica_counts_are_refused():
    from pydantic import ValidationError

    from serve.app import Args

    with pytest.raises(ValidationError, match="min_replicas=3 > max_replicas=2"):
        Args.model_validate({"llm": {"min_replicas": 3, "max_replicas": 2}})
    for bad in ({"max_waiting_requests": 0}, {"decoder": {"max_queued_requests": 0}}, {"max_waiting_requests": -2}):
        with pytest.raises(ValidationError, match="-1 \\(no cap\\) or at least 1"):  # Serve refuses 0 when deploying
            Args.model_validate(bad)
    assert Args.model_validate({"max_waiting_requests": -1, "llm": {"max_queued_requests": 1}}).max_waiting_requests == -1


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port must be >= 1 and <= 65535"),
    (["--port", "70000"], "--port must be >= 1 and <= 65535"),
    (["--config", "/nonexistent/serve.yaml"], "no such file"),
    (["--models", "/nonexistent/models"], "not a folder"),
    (["--api-key", " "], "--api-key must not be empty"),
    (["--address", "127.0.0.1:1"], "no Ray cluster answering"),
], ids=["port0", "port-big", "config", "models", "api-key", "address"])
def test_serve_flag_errors_are_one_line_before_ray(argv, message, capsys, monkeypatch):
    import ray

    from cli import main as cli

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for a bad flag"))
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vita-audio serve: error:") and message in err[0], err


def test_serve_config_errors_name_the_problem(tmp_path, capsys, tiny_models):
    from cli import main as cli

    cases = {
        "notyaml.yaml": ("applications: [", "not valid YAML"),
        "two.yaml": ("applications: [{name: a}, {name: b}]", "one entry under `applications:`"),
        "other.yaml": ("applications: [{import_path: 'x:y'}]", "import_path must be serve.app:build_app"),
        "deploy.yaml": ("applications: [{deployments: [{name: vita-llm}]}]", "per-deployment overrides"),
        "badarg.yaml": ("applications: [{args: {llm: {max_replicas: 0}}}]", "args.llm.max_replicas"),
        "unknown.yaml": ("applications: [{args: {bogus: 1}}]", "args.bogus"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        assert cli.main(["serve", "--config", str(tmp_path / name), "--models", str(tiny_models)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)


@pytest.mark.slow
def test_vita_audio_serve_answers_and_stops_on_sigterm(tiny_models, tmp_path):
    """The command as a user runs it: a local Ray, the shipped config, the URL printed, /health and a speech
    request answered, and SIGTERM (to the command only) shuts Serve and Ray down with exit code 0."""
    import httpx
    import soundfile
    import io

    import shutil
    import tempfile

    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="vs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    out, err = open(tmp_path / "out.txt", "w+"), open(tmp_path / "err.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--models",
                             str(tiny_models)], cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        url = _wait_for_url(proc, tmp_path / "out.txt", tmp_path / "err.txt", timeout_s=300)
        assert url == f"http://127.0.0.1:{port}/v1"
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        r = httpx.post(f"{url}/audio/speech", timeout=120,
                       json={"model": "vita-audio", "input": "Hello there.", "max_new_tokens": 48})
        assert r.status_code == 200, r.text
        pcm, rate = soundfile.read(io.BytesIO(r.content), dtype="int16")
        assert rate == 22050 and len(pcm) > 0
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, (tmp_path / "err.txt").read_text()[-2000:]
        stopped_s = time.monotonic() - t0
        print(f"vita-audio serve stopped {stopped_s:.1f} s after SIGTERM")
        assert "stopped" in (tmp_path / "err.txt").read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the command and the Ray it started
            proc.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for_url(proc, out_path: Path, err_path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = out_path.read_text()
        if " at http" in text:
            return text.split(" at ", 1)[1].split()[0]
        if proc.poll() is not None:
            pytest.fail(f"vita-audio serve exited with {proc.returncode}: {err_path.read_text()[-2000:]}")
        time.sleep(0.5)
    pytest.fail(f"vita-audio serve not ready after {timeout_s:g} s: {err_path.read_text()[-2000:]}")



def test_the_proxys_plain_text_errors_become_openai_errors():
    """The proxy callback's middleware: Serve's own plain-text 503 (beyond the ingress' queue) becomes OpenAI's
    error JSON with Retry-After kept; the ingress' JSON errors, text answers and streams pass untouched."""
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    from serve.proxy_errors import CALLBACK, OpenAIErrorBodies, proxy_middlewares

    async def full(request):
        return PlainTextResponse("Request dropped due to backpressure (num_queued_requests=64).", status_code=503,
                                 headers={"Retry-After": "1"})

    async def refused(request):
        return JSONResponse({"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}},
                            status_code=400)

    async def text(request):
        return PlainTextResponse("a transcript")

    async def lost(request):  # what the proxy answers when the ingress replica dies under a request
        return PlainTextResponse("Internal Server Error", status_code=500)

    async def stream(request):
        return StreamingResponse(iter([b"ab", b"cd"]), media_type="audio/pcm")

    app = Starlette(routes=[Route(p, f) for p, f in [("/full", full), ("/refused", refused), ("/text", text),
                                                     ("/stream", stream), ("/lost", lost)]])
    client = TestClient(OpenAIErrorBodies(app))
    r = client.get("/full")
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == {"message": "Request dropped due to backpressure (num_queued_requests=64).",
                                 "type": "server_error", "param": None, "code": "overloaded"}
    assert client.get("/refused").json()["error"]["param"] == "x"
    assert client.get("/text").text == "a transcript" and client.get("/stream").content == b"abcd"
    assert client.get("/nowhere").json()["error"]["message"] == "Not Found"  # Starlette's own plain 404
    r = client.get("/lost")  # names the stage that failed: the ingress
    assert r.status_code == 500 and r.json()["error"]["code"] == "ingress_failed" and "ingress" in r.json()["error"]["message"]
    assert CALLBACK == "serve.proxy_errors:proxy_middlewares" and proxy_middlewares()[0].cls is OpenAIErrorBodies


def test_stream_clock_counts_what_a_real_time_player_waits():
    """Playback underrun as a listener meets it: the player starts at the first chunk and plays at real time; a
    chunk arriving after the audio before it has played out costs the difference, an early one costs nothing."""
    from serve.metrics import CONTINUITY_S, StreamClock

    clock = StreamClock()
    clock.chunk(0.5, now=10.0)   # plays until 10.5
    clock.chunk(0.5, now=10.4)   # early: buffered, plays until 11.0
    assert clock.underrun_s == 0.0 and clock.continuous
    clock.chunk(0.5, now=11.3)   # 0.3 s late: the player waited, then plays until 11.8
    clock.chunk(1.0, now=11.85)  # 0.05 s late
    assert clock.underrun_s == pytest.approx(0.35) and clock.max_stall_s == pytest.approx(0.3)
    assert clock.intervals == pytest.approx([0.4, 0.9, 0.55]) and clock.audio_s == pytest.approx(2.5)
    assert not clock.continuous and 0.05 <= CONTINUITY_S < 0.3
    assert not StreamClock().streaming  # only serve.http.streamed marks a response as streamed


def test_observed_stream_feeds_its_clock_and_passes_events_unchanged():
    """`observed` (what the ingress wraps every run in) creates every metric, times each audio chunk into the
    run's clock and hands the events on as they came."""
    import asyncio

    import numpy as np

    from actors.payloads import AudioChunk, Done
    from serve.metrics import StreamClock, observed

    chunks = [AudioChunk(np.zeros(2205, np.float32), 22050, i) for i in range(3)]
    done = Done("stop", "", [1, 2], [3], {}, {})

    async def events():
        for event in (*chunks, done):
            yield event

    async def consume(clock):
        return [e async for e in observed("speech", events(), clock)]

    clock = StreamClock(streaming=True)
    assert asyncio.run(consume(clock)) == [*chunks, done]
    assert clock.audio_s == pytest.approx(0.3) and len(clock.intervals) == 2 and clock.underrun_s >= 0
