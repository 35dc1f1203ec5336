"""`vita-audio serve`: the OpenAI-compatible speech endpoint on Ray Serve, until Ctrl-C / SIGTERM.

    vita-audio serve                                   # tiny models, http://127.0.0.1:8000/v1
    vita-audio serve --models /models --port 8080 --api-key KEY
    vita-audio serve --config serve/config.yaml --address auto
    vita-audio serve --api-keys-file keys.txt --state-dir /var/lib/vita-audio/state

The app is the one of the Serve config (default: the project's serve/config.yaml), the same that
`serve run serve/config.yaml` and the RayService start; the flags override its args (`--models`, `--api-key`,
`--api-keys-file`, `--state-dir` / `--state`). What the endpoint remembers (uploaded voices, chat answers' audio
ids) is kept in the state store (serve.state): by default an SQLite file in a state folder, so a restart on the
same folder keeps it; the store and the keys file are checked before Ray starts.
Without --address a local Ray is started; on a machine without CUDA it declares as many logical GPUs as the
config's stages ask for (they then run on CPU).
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path

from actors.ray_runtime import REPO
from actors.errors import InputError
from cli import checks

DEFAULT_CONFIG = REPO / "serve" / "config.yaml"
SIGINT_STOPS = True  # Ctrl-C is how the endpoint is stopped: a clean stop exits 0 (cli.main)


def add_arguments(p, name: str) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=checks.port, default=8000)
    p.add_argument("--models", type=Path, default=None,
                   help="folder with llm/, encoder/, decoder/ (default: the config's, $VITA_AUDIO_MODELS, "
                        "else the tiny set)")
    p.add_argument("--llm", type=Path, default=None,
                   help="LLM folder to serve instead of the models folder's llm/ (e.g. a trained RUN_DIR/stage4), with "
                        "the encoder/ and decoder/ of --models")
    p.add_argument("--config", type=Path, default=None, help=f"Serve config YAML (default: {DEFAULT_CONFIG.relative_to(REPO)})")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every API request")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="more keys, one a line (`KEY [label]`, `sha256:HEX`, `!KEY` revokes; re-read when it "
                        "changes): each key owns its voices and audio ids")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--state-dir", type=Path, default=None,
                       help="folder of the embedded state store (uploaded voices, audio ids; kept across restarts; "
                            "default: the config's state, $VITA_AUDIO_STATE, else $VITA_AUDIO_CACHE/state)")
    state.add_argument("--state", default=None, metavar="URL",
                       help="the state store: redis://host:port/db (shared by a cluster), sqlite:///folder, memory")
    p.add_argument("--files", default=None, metavar="DIR_OR_URL",
                   help="where the batch API keeps its files and batch run folders: a folder, or s3://bucket/prefix "
                        "(any store pyarrow/fsspec knows) that every node running a batch driver reaches (default: "
                        "the config's files, else $VITA_AUDIO_CACHE/files)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--ready-timeout", type=checks.positive_float, default=600.0, help="seconds to wait for the app to be up")


def load_app_config(path: Path | None) -> dict:
    """The one application of a Serve config file (name, route_prefix, import_path, args)."""
    import yaml

    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if isinstance(apps, list):  # the /health application beside it (serve.health) is deployed by `run` itself
        apps = [a for a in apps if not (isinstance(a, dict) and a.get("import_path") == "serve.health:build_health")]
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise InputError(f"--config {path}: expected a Serve config with one entry under `applications:`")
    app = apps[0]
    if app.get("import_path", "serve.app:build_app") != "serve.app:build_app":
        raise InputError(f"--config {path}: import_path must be serve.app:build_app, got {app['import_path']!r}")
    if app.get("deployments"):
        raise InputError(f"--config {path}: per-deployment overrides are not supported; set each stage's options "
                       "under args: encoder / llm / decoder")
    return {"name": app.get("name", "vita"), "route_prefix": app.get("route_prefix", "/"),
            "args": dict(app.get("args") or {}), "path": str(path)}


def app_args(args, app: dict):
    """serve.app.Args of the config with the flags applied (a bad value is a InputError naming it)."""
    from pydantic import ValidationError

    from actors.models import resolve_models_dir
    from serve.app import Args

    values = dict(app["args"])
    values["models"] = str(resolve_models_dir(args.models or values.get("models"), getattr(args, "llm", None)))
    if args.api_key is not None:
        if not args.api_key.strip():
            raise InputError("--api-key must not be empty")
        values["api_key"] = args.api_key
    if getattr(args, "api_keys_file", None) is not None:
        values["api_keys_file"] = str(args.api_keys_file.expanduser().resolve())
    if getattr(args, "state_dir", None) is not None:
        values["state"] = str(args.state_dir.expanduser().resolve())
    elif getattr(args, "state", None) is not None:
        values["state"] = args.state
    if getattr(args, "files", None) is not None:
        from jobs.storage import is_remote, location

        where = location(args.files, "--files")  # an unknown scheme is refused here, by name
        values["files"] = args.files if is_remote(args.files) else str(where.expanduser().resolve())
    try:
        config_args = Args.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "args"
        raise InputError(f"{app['path']}: args.{where}: {first['msg']}") from None
    check_keys(config_args)
    check_state(config_args)
    return config_args


def check_keys(config_args) -> None:
    """The keys file reads, and some key is accepted when keys are asked for (else every request is a 401)."""
    from serve.keys import KeyFileError, KeySet

    path = config_args.api_keys_file
    if path is not None and not Path(path).is_file():
        raise InputError(f"--api-keys-file {path}: no such file")
    try:
        keys = KeySet(config_args.api_key, keys_file=path)
    except (KeyFileError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"--api-keys-file: {err}") from None
    if not keys.open and not keys.accepts_any():
        raise InputError(f"--api-keys-file {path}: no key is accepted (every request would be a 401)")


def check_state(config_args) -> None:
    """The state store opens and answers (a folder that can be written, a Redis that answers) before Ray starts."""
    from serve.state import StateError, open_store

    url = config_args.state_url()
    try:
        with open_store(url) as store:
            store.check()
    except (StateError, ValueError) as err:
        flag = "--state-dir" if "://" not in url and url != "memory" else "--state"
        raise InputError(f"{flag} {url}: {err}") from None
    except ImportError as err:
        raise InputError(f"--state {url}: {err} (pip install redis)") from None


def logical_gpus(config_args) -> int:
    """GPUs the app's stages ask for at most (every stage at max_replicas), rounded up."""
    stages = (config_args.encoder, config_args.llm, config_args.decoder)
    return math.ceil(sum(s.num_gpus * s.max_replicas for s in stages) - 1e-9)


def _check_flags(args) -> None:
    if not args.host.strip():
        raise InputError("--host must not be empty")


def run(args) -> dict:
    _check_flags(args)
    app = load_app_config(args.config)
    config_args = app_args(args, app)
    if args.address:
        from actors.ray_runtime import check_address

        check_address(args.address)
    _port_free(args.host, args.port)

    import ray
    import torch
    from ray import serve

    from actors.ray_runtime import start_ray
    from serve.app import build_app
    from serve.health import APP_NAME as HEALTH_APP, ROUTE_PREFIX as HEALTH_PREFIX, build_health
    from serve.proxy_errors import use_in_local_ray

    stop = threading.Event()
    t0 = time.perf_counter()
    gpus = None if args.address or torch.cuda.is_available() else logical_gpus(config_args)
    use_in_local_ray()  # the proxy's own errors in OpenAI's shape (a cluster's image sets it for its Ray)
    started = start_ray(args.address, num_gpus=gpus)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        _progress(f"Ray ready in {time.perf_counter() - t0:.1f} s; starting the app of {app['path']}"
                  + (f" ({gpus} logical GPUs: no CUDA, the stages run on CPU)" if gpus else ""))
        serve.run(build_app(config_args), name=app["name"], route_prefix=app["route_prefix"], blocking=False)
        serve.run(build_health({"app": app["name"]}), name=HEALTH_APP, route_prefix=HEALTH_PREFIX, blocking=False)
        _wait_running(app["name"], args.ready_timeout, stop)
        url = f"http://{args.host}:{args.port}{app['route_prefix'].rstrip('/')}"
        print(f"vita-audio serve: ready in {time.perf_counter() - t0:.1f} s at {url}/v1 "
              f"(models {config_args.models}; live voice chat page: {url}/); Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):  # (a timed wait: signal handlers run between waits)
            pass
        _progress("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    _progress("stopped")
    return {"url": f"http://{args.host}:{args.port}", "app": app["name"], "models": config_args.models}


def _wait_running(name: str, timeout_s: float, stop: threading.Event) -> None:
    """Until the app is RUNNING (a deploy failure is a one-line error naming the deployment)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        status = serve.status().applications.get(name)
        state = str(getattr(status, "status", "")).rsplit(".", 1)[-1]
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED":
            failed = [f"{d}: {s.message.strip().splitlines()[-1] if s.message else s.status}"
                      for d, s in status.deployments.items() if "UNHEALTHY" in str(s.status)]
            raise RuntimeError(f"app {name!r} failed to start: {'; '.join(failed) or status.message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"app {name!r} not running after {timeout_s:g} s (state {state})")
        stop.wait(0.5)


def _port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def _progress(message: str) -> None:
    print(f"vita-audio serve: {message}", file=sys.stderr, flush=True)
