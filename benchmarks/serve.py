"""`vita-audio bench serve`: the HTTP endpoint's time to first audio and audio real-time factor vs concurrency,
and HTTP vs the in-process `StagedPipeline` in the same run.

On the tiny set unless --models is given, with a local Ray started here (or --address):
1. The Serve app (serve.app.build_app, the stages as deployments) on 127.0.0.1: 1, 4 and 16 concurrent clients,
   each streaming raw PCM speech (`/v1/audio/speech`, response_format=pcm) for --requests requests.
   Time to first audio = request sent -> first PCM bytes received; RTF = request wall time / seconds of audio.
   Playback underrun (serve.metrics.StreamClock) = seconds a client that starts playing at the first bytes and plays
   at real time would have waited for audio; continuous = the share of streams with no stall over 0.1 s; chunk
   interval = time between the pieces of the body as they arrive. p50 / p99 per level.
2. One client (one keep-alive connection) and the same request through `actors.staged_pipeline.StagedPipeline` (the same stage
   classes as Ray actors, driven from this process, no HTTP): the ratio HTTP / StagedPipeline of the median time to
   first audio. Target <= 1.15x. The two run in separate phases, each alone on the machine (with both apps up,
   two sets of stage processes share the 2 cores and the first measured is slowed by the other's background
   work), repeated for --rounds rounds (HTTP, StagedPipeline, HTTP, StagedPipeline, ...) so that drift in the machine's
   load falls on both.
--serve-mode throughput runs the app in Ray Serve's throughput-optimized mode (Ray's documented
RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between deployments, user code and routers on each replica's event loop;
its direct ingress stays off, so the proxy and port are the same as in the default mode). It is read when Ray's
processes start, so it needs the local Ray this bench starts.
3. 1 vs 2 ingress replicas (the same app scaled in place: only the ingress changes) at --ingress-clients clients,
   each round in the other order: throughput (audio seconds per second) of 2 replicas / 1 (no loss from spreading
   the requests over replicas: >= 1; on one machine the stages, not the ingress, bound it).
Writes serve.json, serve.md and serve.png. On a shared machine the numbers move with the neighbours' load.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from benchmarks.report import int_list, markdown_table, write_report

SAMPLE_RATE = 22050
TEXT = "Hello there, this is a short test of the speech endpoint."
TARGET_RATIO = 1.15
SERVE_MODES = {"default": {}, "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--models", type=Path, default=None, help="folder with llm/, encoder/, decoder/ (default: tiny)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=24, help="requests per level (at least one per client)")
    parser.add_argument("--pairs", type=int, default=10, help="HTTP and StagedPipeline requests per round for the ratio")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (HTTP phase, StagedPipeline phase)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ingress-clients", type=int, default=16,
                        help="clients for the 1 vs 2 ingress replicas comparison (0: skip it)")
    parser.add_argument("--serve-mode", choices=sorted(SERVE_MODES), default="default",
                        help="Ray Serve's default data path, or its throughput-optimized mode (needs the local Ray)")


def run(args: argparse.Namespace) -> dict:
    import httpx
    import ray
    from ray import serve

    from actors.config import PipelineConfig
    from actors.staged_pipeline import StagedPipeline
    from actors.ray_runtime import free_port, start_ray
    from actors.models import resolve_models_dir
    from serve.proxy_errors import use_in_local_ray

    levels = int_list(args.concurrency, "--concurrency")
    if min(args.requests, args.pairs, args.max_new_tokens, args.rounds) < 1:
        raise ValueError("--requests, --pairs, --rounds and --max-new-tokens must be >= 1")
    if args.ingress_clients < 0:
        raise ValueError("--ingress-clients must be >= 0")
    models = resolve_models_dir(args.models)
    if args.serve_mode != "default":
        if args.address or ray.is_initialized():
            raise ValueError(f"--serve-mode {args.serve_mode} is read when Ray's processes start: use the local Ray")
        os.environ.update(SERVE_MODES[args.serve_mode])  # inherited by the Ray processes started below
    use_in_local_ray()
    started = start_ray(args.address)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/audio/speech"
    body = {"model": "vita-audio", "input": TEXT, "response_format": "pcm", "max_new_tokens": args.max_new_tokens}
    rows, http, local, ingress = [], [], [], []
    try:
        for round_ in range(args.rounds):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                app_args = {"models": str(models), "max_tokens": 4096,
                            "llm": {"max_ongoing_requests": 64, "max_queued_requests": -1}}
                serve.run(bench_app(app_args), name="bench", route_prefix="/")
                asyncio.run(_level(url, body, 1, 2))  # warm-up (first-call costs of every stage)
                for clients in levels if round_ == 0 else ():
                    requests = max(args.requests, clients)
                    t0 = time.perf_counter()
                    samples = asyncio.run(_level(url, body, clients, requests))
                    rows.append(_summary(clients, samples, time.perf_counter() - t0))
                with httpx.Client(timeout=600) as client:  # one keep-alive connection, as a client's SDK holds
                    _http_ttfa(client, url, body)
                    http.append([_http_ttfa(client, url, body) for _ in range(args.pairs)])
                for replicas in ((1, 2) if round_ % 2 else (2, 1)) if args.ingress_clients else ():
                    serve.run(bench_app(app_args, replicas), name="bench", route_prefix="/")  # scaled in place
                    asyncio.run(_level(url, body, 2 * replicas, 2 * replicas))  # warm every ingress replica
                    requests = max(args.requests, args.ingress_clients)
                    t0 = time.perf_counter()
                    samples = asyncio.run(_level(url, body, args.ingress_clients, requests))
                    ingress.append({"round": round_, "ingress_replicas": replicas,
                                    **_summary(args.ingress_clients, samples, time.perf_counter() - t0)})
            finally:
                serve.shutdown()
            pipe = StagedPipeline.start(PipelineConfig.from_models_dir(models).with_resources(num_gpus=0.0, torch_threads=1))
            try:
                _pipeline_ttfa(pipe, args.max_new_tokens)  # warm-up
                local.append([_pipeline_ttfa(pipe, args.max_new_tokens) for _ in range(args.pairs)])
            finally:
                pipe.shutdown()
    finally:
        if started:
            ray.shutdown()
    flat_http, flat_local = [x for r in http for x in r], [x for r in local for x in r]
    ratio = statistics.median(flat_http) / statistics.median(flat_local)
    comparison = {"http_ttfa_p50_s": statistics.median(flat_http), "pipeline_ttfa_p50_s": statistics.median(flat_local),
                  "ratio": ratio, "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO, "rounds": args.rounds,
                  "requests_per_round": args.pairs,
                  "ratio_per_round": [statistics.median(h) / statistics.median(p) for h, p in zip(http, local)],
                  "http_ttfa_s": http, "pipeline_ttfa_s": local}
    load = os.getloadavg()
    spread = _ingress_comparison(ingress)
    results = {"levels": rows, "http_vs_pipeline": comparison, "ingress_replicas": spread, "max_new_tokens": args.max_new_tokens,
               "serve_mode": args.serve_mode, "serve_env": SERVE_MODES[args.serve_mode],
               "models": str(models), "load_average": [round(x, 2) for x in load]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "serve.png")
    md = (f"Ray Serve mode: {args.serve_mode} {SERVE_MODES[args.serve_mode] or ''}\n\n"
          "## HTTP speech endpoint vs concurrent clients (raw PCM stream)\n\n" + markdown_table(rows) +
          "\n## HTTP vs in-process StagedPipeline, one client, each in its own phase\n\n" +
          markdown_table([{k: v for k, v in comparison.items() if not isinstance(v, list)}]) +
          "\nRatio per round: " + ", ".join(f"{r:.2f}x" for r in comparison["ratio_per_round"]) + ".\n" +
          _ingress_markdown(spread) +
          f"\nLoad average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"({os.cpu_count()} cores, shared machine).\n\n![serve](serve.png)\n")
    write_report("serve", results, md, out)
    return results


async def _level(url: str, body: dict, clients: int, requests: int) -> list[dict]:
    """`requests` streamed speech requests from `clients` concurrent clients: TTFA, wall time, audio seconds."""
    import httpx

    queue = list(range(requests))

    async def client(http):
        out = []
        while queue:
            queue.pop()
            out.append(await _one(http, url, body))
        return out

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        done = await asyncio.gather(*(client(http) for _ in range(clients)))
    return [s for per_client in done for s in per_client]


async def _one(http, url: str, body: dict) -> dict:
    from serve.metrics import StreamClock

    start = time.perf_counter()
    ttfa, size, clock = None, 0, StreamClock()
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"speech request failed: {response.status_code} {response.text[:200]}")
        async for chunk in response.aiter_raw():
            if chunk and ttfa is None:
                ttfa = time.perf_counter() - start
            if chunk:
                clock.chunk(len(chunk) / 2 / SAMPLE_RATE)
            size += len(chunk)
    wall = time.perf_counter() - start
    audio_s = size / 2 / SAMPLE_RATE
    return {"ttfa_s": ttfa if ttfa is not None else wall, "wall_s": wall, "audio_s": audio_s,
            "rtf": wall / audio_s if audio_s else float("inf"), "underrun_s": clock.underrun_s,
            "continuous": clock.continuous, "intervals": clock.intervals}


def _http_ttfa(client, url: str, body: dict) -> float:
    start = time.perf_counter()
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"speech request failed: {response.status_code} {response.read()[:200]!r}")
        first = None
        for chunk in response.iter_raw():
            if chunk and first is None:
                first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


def _pipeline_ttfa(pipe, max_new_tokens: int) -> float:
    from actors.payloads import AudioChunk

    start = time.perf_counter()
    first = None
    for event in pipe.tts(TEXT, max_new_tokens=max_new_tokens):
        if first is None and isinstance(event, AudioChunk) and len(event.pcm):
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


def _summary(clients: int, samples: list[dict], wall_s: float) -> dict:
    ttfa = [s["ttfa_s"] for s in samples]
    rtf = [s["rtf"] for s in samples]
    underrun = [s["underrun_s"] for s in samples]
    intervals = [x for s in samples for x in s["intervals"]] or [0.0]
    return {"clients": clients, "requests": len(samples), "ttfa_p50_s": _pct(ttfa, 50), "ttfa_p99_s": _pct(ttfa, 99),
            "rtf_p50": _pct(rtf, 50), "rtf_p99": _pct(rtf, 99),
            "underrun_p50_s": _pct(underrun, 50), "underrun_p99_s": _pct(underrun, 99),
            "continuous": sum(s["continuous"] for s in samples) / len(samples),
            "chunk_interval_p50_s": _pct(intervals, 50), "chunk_interval_p99_s": _pct(intervals, 99),
            "audio_s_per_s": sum(s["audio_s"] for s in samples) / wall_s, "wall_s": wall_s}


def bench_app(args: dict, ingress_replicas: int = 1):
    """The Serve app of `args` with `ingress_replicas` ingress replicas (the app's ingress scaling, min = max)."""
    from serve.app import build_app

    return build_app({**args, "ingress": {"min_replicas": ingress_replicas, "max_replicas": ingress_replicas}})


def _ingress_comparison(rows: list[dict]) -> dict:
    """Throughput of 2 ingress replicas / 1 at the same clients, per round and over all rounds (sums)."""
    if not rows:
        return {"rows": [], "throughput_ratio": None}
    total = {n: sum(r["audio_s_per_s"] for r in rows if r["ingress_replicas"] == n) for n in (1, 2)}
    per_round = [next(r["audio_s_per_s"] for r in rows if r["round"] == k and r["ingress_replicas"] == 2) /
                 next(r["audio_s_per_s"] for r in rows if r["round"] == k and r["ingress_replicas"] == 1)
                 for k in sorted({r["round"] for r in rows})]
    ratio = total[2] / total[1]
    return {"rows": rows, "throughput_ratio": ratio, "ratio_per_round": per_round, "met": ratio >= 1.0}


def _ingress_markdown(spread: dict) -> str:
    if not spread["rows"]:
        return ""
    columns = ["round", "ingress_replicas", "clients", "requests", "audio_s_per_s", "ttfa_p50_s", "ttfa_p99_s",
               "underrun_p50_s", "underrun_p99_s", "continuous", "chunk_interval_p50_s", "chunk_interval_p99_s"]
    return ("\n## 1 vs 2 ingress replicas (same app, scaled in place)\n\n" + markdown_table(spread["rows"], columns) +
            f"\nThroughput 2 / 1 replicas: {spread['throughput_ratio']:.2f}x (per round: " +
            ", ".join(f"{r:.2f}x" for r in spread["ratio_per_round"]) + ").\n")


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["levels"]
    clients = [r["clients"] for r in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    left.plot(clients, [r["ttfa_p50_s"] for r in rows], marker="o", label="p50")
    left.plot(clients, [r["ttfa_p99_s"] for r in rows], marker="o", label="p99")
    middle.plot(clients, [r["rtf_p50"] for r in rows], marker="o", label="p50")
    middle.plot(clients, [r["rtf_p99"] for r in rows], marker="o", label="p99")
    middle.axhline(1.0, color="gray", linestyle="--", label="real time")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="seconds", title="HTTP time to first audio")
    middle.set(xscale="log", xlabel="concurrent clients", ylabel="wall s / audio s", title="audio real-time factor")
    comparison = results["http_vs_pipeline"]
    right.bar(["HTTP (Serve)", "StagedPipeline (in-process)"],
              [comparison["http_ttfa_p50_s"], comparison["pipeline_ttfa_p50_s"]], color=["C0", "C2"])
    right.set(ylabel="seconds", title=f"time to first audio, 1 client: {comparison['ratio']:.2f}x")
    for ax in (left, middle):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
