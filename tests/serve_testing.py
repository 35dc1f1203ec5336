"""Helpers of the Serve API tests (tests/test_serve*.py): one app per module on 127.0.0.1, the in-process
reference pipeline on the stages' torch thread count, and small clips to upload."""
from __future__ import annotations

import contextlib
import io
import tempfile

import numpy as np
import soundfile

from actors.ray_runtime import free_port

API_KEY = "test-key"
CAPS = {"api_key": API_KEY, "max_text_chars": 200, "max_tokens": 512, "max_body_bytes": 400_000,
        "max_audio_seconds": 6.0}


@contextlib.contextmanager
def serve_app(tiny_models, **args):
    """The app on a free loopback port for one module; Serve is shut down after it."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vita-state-") as state:  # a fresh state store per module
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_app({"models": str(tiny_models), **CAPS, "state": state, **args}), name="vita",
                      route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()


@contextlib.contextmanager
def local_pipeline(tiny_models):
    """LocalPipeline on one torch thread (the Serve stages' torch_threads=1: float sums in the same order)."""
    import torch

    from actors.config import PipelineConfig
    from actors.local import LocalPipeline

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = LocalPipeline(PipelineConfig.from_models_dir(tiny_models))
    try:
        yield pipe
    finally:
        pipe.bridge.stop()
        torch.set_num_threads(previous)


@contextlib.contextmanager
def local_ingress(models, pipe=None, **args):
    """The ingress' FastAPI app in this process, no Ray and no Serve: the `Ingress` class (its routes, checks
    and request policy as deployed) over a LocalPipeline's stage clients, behind a Starlette TestClient (HTTP
    and the realtime WebSocket). `pipe`: a LocalPipeline of `models` to reuse; `args`: Serve app args (`state`:
    this process' memory unless given, so a test leaves nothing behind)."""
    from types import SimpleNamespace
    from unittest import mock

    from fastapi.testclient import TestClient
    from ray import serve

    from actors.orchestration import Limits
    from serve.app import Args
    from serve.http import app
    from serve.ingress import Ingress

    # TestClient's Host; and no resumable realtime sessions: the TestClient cancels a socket's task right after its
    # close frame, so a closed socket could read as a dropped one and be kept for the grace period
    args = Args.model_validate({"models": str(models), **CAPS, "allowed_hosts": ["testserver"],
                                "realtime_resume_grace_s": 0, **args})
    with contextlib.ExitStack() as stack:
        if pipe is None:
            pipe = stack.enter_context(local_pipeline(models))
        config = args.pipeline_config()
        ingress = Ingress.__mro__[1](None, None, None, args.caps(), args.api_key, Limits.of(config), config.llm.path,
                                     api_keys_file=args.api_keys_file, state=args.state or "memory",
                                     batch=args.batch_settings())  # the class under @serve.ingress, as serve.app builds it
        ingress.clients = pipe.clients
        replica = SimpleNamespace(servable_object=ingress)  # what Serve's route dependency asks for
        stack.enter_context(mock.patch.object(serve, "get_replica_context", lambda: replica))
        client = stack.enter_context(TestClient(app))
        client.headers["authorization"] = f"Bearer {args.api_key}"
        yield client


def clip(seconds: float = 1.0, rate: int = 16000, fmt: str = "WAV", seed: int = 0) -> bytes:
    """A deterministic speech-like clip (a gliding tone with noise) as file bytes."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    pcm = 0.3 * np.sin(2 * np.pi * (180 + 60 * t) * t) + 0.02 * rng.standard_normal(len(t))
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm.astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def int16(pcm) -> np.ndarray:
    """The pipeline's float PCM as 16-bit samples, rounded (what every response format carries)."""
    return np.round(np.clip(pcm, -1, 1) * 32767.0).astype("<i2")


def text_ids(events) -> tuple[str, list[int], object]:
    """Text, text-delta ids and the Done of a stream of pipeline events."""
    from actors.payloads import Done, TextDelta

    text, ids, done = "", [], None
    for event in events:
        if isinstance(event, TextDelta):
            text += event.text
            ids += event.token_ids
        elif isinstance(event, Done):
            done = event
    return text, ids, done
