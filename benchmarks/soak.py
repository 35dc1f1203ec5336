"""`vita-audio bench soak`: the endpoint under --minutes of constant mixed load on loopback, with one LLM replica
and one ingress replica killed part-way; does it stay correct, flat in memory and steady in latency?

On the tiny set unless --models is given, with a local Ray started here (closed: loopback + token auth). The app
runs 2 ingress replicas and 2 LLM replicas (so a kill leaves one serving); --clients clients loop over the six
kinds of request, each client starting at a different kind:
    speech         POST /v1/audio/speech, wav, whole body
    speech_stream  the same, streamed as SSE pcm (time to first audio and playback underrun, client side)
    transcription  POST /v1/audio/transcriptions of a 1 s clip
    chat           POST /v1/chat/completions, text in, text + wav audio out
    realtime       one /v1/realtime turn over a WebSocket: 1 s of pcm16 in, audio out (TTFA and underrun)
    voice          POST /v1/audio/voices (a 1 s clip), then DELETE it
At --kill-llm-at and --kill-ingress-at (fractions of the run) one replica of that deployment is killed with
`ray.kill` (Serve starts a replacement). Every 10 s the RSS of every Serve process (the replicas, the
controller, the proxy: this driver's Ray's processes, found with psutil) is sampled.

Per minute: requests, p50 / p99 time to first audio (streamed kinds), playback underrun (serve.metrics.StreamClock:
seconds a client playing from the first chunk at real time would have waited), errors by status. Criteria:
  - no 5xx (or stream that ends in an error) except requests in flight when a replica was killed;
  - RSS of every Serve process within 10 % of its value after warm-up (a replacement: one minute after it appears);
  - p99 time to first audio in the last 5 minutes <= 1.2x the first 5 (halves of the run when shorter than 10 min).
Writes soak.json, soak.md and soak.png. On a shared machine the numbers move with the neighbours' load.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.report import markdown_table, write_report

KINDS = ("speech", "speech_stream", "transcription", "chat", "realtime", "voice")
STREAMED = ("speech_stream", "realtime")
TEXT = "Hello there, this is a short soak test of the speech endpoint."
API_KEY = "soak-key"
RSS_EVERY_S = 10.0
RSS_TOLERANCE = 0.10
TTFA_TOLERANCE = 1.2
REALTIME_RATE = 24000


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--models", type=Path, default=None, help="folder with llm/, encoder/, decoder/ (default: tiny)")
    parser.add_argument("--minutes", type=float, default=20.0, help="minutes of load after the warm-up")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--kill-llm-at", type=float, default=0.4, help="fraction of the run: kill an LLM replica")
    parser.add_argument("--kill-ingress-at", type=float, default=0.6, help="fraction of the run: kill an ingress replica")


@dataclass
class Sample:
    kind: str
    start_s: float  # since the load started
    end_s: float
    status: str  # the HTTP status, "stream_error" (an error event after 200), "ws_error" (the server's error event),
    # "ws_refused:CODE" (an error event refusing the client), or the exception's name (a dropped connection)
    ttfa_s: float | None = None
    underrun_s: float | None = None
    audio_s: float = 0.0
    error: str = ""


@dataclass
class Soak:
    url: str
    max_new_tokens: int
    t0: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    kills: list[dict] = field(default_factory=list)
    rss: list[dict] = field(default_factory=list)  # {"t_s", "pid", "process", "rss_mb"}

    def now(self) -> float:
        return time.perf_counter() - self.t0


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from actors.models import resolve_models_dir
    from actors.ray_runtime import free_port, start_ray
    from benchmarks.serve import bench_app
    from serve.proxy_errors import use_in_local_ray

    if args.minutes <= 0 or args.clients < 1 or args.max_new_tokens < 1:
        raise ValueError("--minutes must be > 0, --clients and --max-new-tokens >= 1")
    if not (0 < args.kill_llm_at < 1 and 0 < args.kill_ingress_at < 1):
        raise ValueError("--kill-llm-at and --kill-ingress-at are fractions of the run, between 0 and 1")
    models = resolve_models_dir(args.models)
    use_in_local_ray()
    started = start_ray(None, num_cpus=2)
    port = free_port()
    soak = Soak(f"http://127.0.0.1:{port}", args.max_new_tokens)
    llm = {"min_replicas": 2, "max_replicas": 2, "max_ongoing_requests": 16, "max_queued_requests": -1,
           "health_check_period_s": 1, "graceful_shutdown_timeout_s": 1}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bench_app({"models": str(models), "api_key": API_KEY, "max_tokens": 4096, "llm": llm},
                            ingress_replicas=2), name="soak", route_prefix="/")
        asyncio.run(_warm_up(soak))
        soak.t0 = time.perf_counter()
        asyncio.run(_load(soak, args))
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    results = _results(soak, args, str(models))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "soak.png")
    write_report("soak", results, _markdown(results), out)
    return results


# -- load ---------------------------------------------------------------------------------------------------------
async def _warm_up(soak: Soak) -> None:
    """Every kind twice, one at a time (first-call costs of every stage and route), before the clock starts."""
    import httpx

    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for kind in KINDS * 2:
            sample = await _request(soak, http, kind, 0)
            if not _ok(sample):
                raise RuntimeError(f"warm-up {kind} failed: {sample.status} {sample.error}")


async def _load(soak: Soak, args: argparse.Namespace) -> None:
    import httpx

    end = args.minutes * 60
    kills = [(args.kill_llm_at * end, "vita-llm"), (args.kill_ingress_at * end, "vita-ingress")]

    async def client(i: int, http) -> None:
        for n in itertools.count():
            if soak.now() >= end:
                return
            soak.samples.append(await _request(soak, http, KINDS[(i + n) % len(KINDS)], i * 100000 + n))

    async def killer() -> None:
        for at, deployment in sorted(kills):
            await asyncio.sleep(max(0.0, at - soak.now()))
            name = await asyncio.to_thread(_kill_one_replica, deployment)
            soak.kills.append({"t_s": soak.now(), "deployment": deployment, "replica": name})

    async def sampler() -> None:
        while soak.now() < end:
            soak.rss.extend(await asyncio.to_thread(_serve_rss, soak.now()))
            await asyncio.sleep(RSS_EVERY_S)

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        await asyncio.gather(killer(), sampler(), *(client(i, http) for i in range(args.clients)))
    soak.rss.extend(_serve_rss(soak.now()))


async def _request(soak: Soak, http, kind: str, n: int) -> Sample:
    start = soak.now()
    sample = Sample(kind, start, start, "")
    try:
        await REQUESTS[kind](soak, http, sample, n)
    except Exception as err:  # a broken connection (the ingress replica killed under it) is an outcome too
        sample.status, sample.error = type(err).__name__, str(err)[:200]
    sample.end_s = soak.now()
    return sample


def _ok(sample: Sample) -> bool:
    return sample.status.startswith("2") or sample.status == "101"  # 101: the realtime WebSocket's upgrade


def _set(sample: Sample, response) -> bool:
    sample.status = str(response.status_code)
    if response.status_code >= 400:
        sample.error = response.text[:200]
    return response.status_code < 400


async def _speech(soak: Soak, http, sample: Sample, n: int) -> None:
    body = {"model": "vita-audio", "input": TEXT, "response_format": "wav", "max_new_tokens": soak.max_new_tokens}
    _set(sample, await http.post(f"{soak.url}/v1/audio/speech", json=body))


async def _speech_stream(soak: Soak, http, sample: Sample, n: int) -> None:
    from serve.metrics import StreamClock

    body = {"model": "vita-audio", "input": TEXT, "response_format": "pcm", "stream_format": "sse",
            "max_new_tokens": soak.max_new_tokens}
    clock = StreamClock()
    async with http.stream("POST", f"{soak.url}/v1/audio/speech", json=body) as response:
        if not _set(sample, response if response.status_code < 400 else await _read(response)):
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "speech.audio.delta":
                _audio(soak, sample, clock, len(base64.b64decode(event["audio"])) / 2 / 22050)
            elif event["type"] == "error":
                sample.status, sample.error = "stream_error", event["error"]["message"][:200]
    sample.underrun_s = clock.underrun_s if clock.first_at is not None else None


async def _read(response):
    await response.aread()
    return response


def _audio(soak: Soak, sample: Sample, clock, seconds: float) -> None:
    if sample.ttfa_s is None:
        sample.ttfa_s = soak.now() - sample.start_s
    clock.chunk(seconds)
    sample.audio_s += seconds


async def _transcription(soak: Soak, http, sample: Sample, n: int) -> None:
    files = {"file": ("clip.wav", _clip(16000), "audio/wav")}
    data = {"model": "vita-audio", "max_new_tokens": str(soak.max_new_tokens)}
    _set(sample, await http.post(f"{soak.url}/v1/audio/transcriptions", files=files, data=data))


async def _chat(soak: Soak, http, sample: Sample, n: int) -> None:
    body = {"model": "vita-audio", "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
            "messages": [{"role": "user", "content": TEXT}], "max_completion_tokens": soak.max_new_tokens}
    _set(sample, await http.post(f"{soak.url}/v1/chat/completions", json=body))


async def _voice(soak: Soak, http, sample: Sample, n: int) -> None:
    files = {"audio_sample": ("voice.wav", _clip(16000, seed=n % 7), "audio/wav")}
    response = await http.post(f"{soak.url}/v1/audio/voices", files=files,
                               data={"name": f"soak-{os.getpid()}-{n}", "consent": "soak test voice"})
    if _set(sample, response):
        _set(sample, await http.delete(f"{soak.url}/v1/audio/voices/{response.json()['id']}"))


async def _realtime(soak: Soak, http, sample: Sample, n: int) -> None:
    import websockets

    from serve.metrics import StreamClock

    url = soak.url.replace("http://", "ws://") + "/v1/realtime?model=vita-audio"
    clock = StreamClock()
    pcm = _pcm16(_clip(REALTIME_RATE))
    async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"],
                                  max_size=None, open_timeout=120) as ws:
        session = {"type": "realtime", "output_modalities": ["audio"], "max_output_tokens": soak.max_new_tokens,
                   "audio": {"input": {"format": {"type": "audio/pcm", "rate": REALTIME_RATE}, "turn_detection": None},
                             "output": {"voice": "alloy"}}}
        for event in ({"type": "session.update", "session": session},
                      {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()},
                      {"type": "input_audio_buffer.commit"}, {"type": "response.create"}):
            await ws.send(json.dumps(event))
        sample.status = "101"
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 600))
            if event["type"] == "response.output_audio.delta":
                _audio(soak, sample, clock, len(base64.b64decode(event["delta"])) / 2 / REALTIME_RATE)
            elif event["type"] == "error":  # the server's failure, or a refusal of this client (a 4xx in kind)
                error = event["error"]
                server = error.get("type") == "server_error"
                sample.status = "ws_error" if server else f"ws_refused:{error.get('code') or error.get('type')}"
                sample.error = error["message"][:200]
                return
            elif event["type"] == "response.done":
                if event["response"]["status"] not in ("completed", "incomplete"):
                    sample.status, sample.error = "ws_error", json.dumps(event["response"].get("status_details"))[:200]
                break
    sample.underrun_s = clock.underrun_s if clock.first_at is not None else None


REQUESTS = {"speech": _speech, "speech_stream": _speech_stream, "transcription": _transcription, "chat": _chat,
            "realtime": _realtime, "voice": _voice}


def _clip(rate: int, seconds: float = 1.0, seed: int = 0) -> bytes:
    """A speech-like clip (a gliding tone with noise) as WAV bytes."""
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    pcm = 0.3 * np.sin(2 * np.pi * (180 + 60 * t) * t) + 0.02 * np.random.default_rng(seed).standard_normal(len(t))
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _pcm16(wav: bytes) -> bytes:
    import soundfile

    samples, _ = soundfile.read(io.BytesIO(wav), dtype="int16")
    return samples.tobytes()


# -- replicas and processes ---------------------------------------------------------------------------------------
def _kill_one_replica(deployment: str) -> str:
    """Kill one replica actor of `deployment` (Serve notices and starts a replacement); its actor name."""
    import ray

    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and f"#{deployment}#" in a["name"])
    if not names:
        raise RuntimeError(f"no replica of {deployment} to kill")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def _serve_rss(t_s: float) -> list[dict]:
    """RSS of every Serve process of the Ray this driver started (its descendants titled ray::Serve*/ProxyActor)."""
    import psutil

    rows = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if title.startswith(("ray::ServeReplica", "ray::ServeController", "ray::ProxyActor")):
                name = title.split()[0].removeprefix("ray::").split(".")[0]  # (Ray appends the running method)
                rows.append({"t_s": round(t_s, 1), "pid": proc.pid, "process": name,
                             "rss_mb": proc.memory_info().rss / 2**20})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rows


# -- results ------------------------------------------------------------------------------------------------------
def _results(soak: Soak, args: argparse.Namespace, models: str) -> dict:
    samples = soak.samples
    minutes = [_minute(m, [s for s in samples if int(s.start_s // 60) == m]) for m in range(int(args.minutes * 60 - 1e-9) // 60 + 1)]
    window = min(5.0, args.minutes / 2) * 60
    first = [s.ttfa_s for s in samples if s.ttfa_s is not None and s.start_s < window]
    last = [s.ttfa_s for s in samples if s.ttfa_s is not None and s.start_s >= args.minutes * 60 - window]
    ttfa = {"window_min": window / 60, "first_p99_s": _pct(first, 99), "last_p99_s": _pct(last, 99)}
    ttfa["ratio"] = ttfa["last_p99_s"] / ttfa["first_p99_s"] if first and last else None
    ttfa["met"] = ttfa["ratio"] is not None and ttfa["ratio"] <= TTFA_TOLERANCE
    errors = _errors(samples, soak.kills)
    rss = _rss_growth(soak.rss, soak.kills)
    criteria = {"no_5xx_beyond_killed_in_flight": not errors["unexplained"], "rss_within_10pct": rss["met"],
                "p99_ttfa_last_le_1.2x_first": ttfa["met"]}
    return {"minutes": args.minutes, "clients": args.clients, "max_new_tokens": args.max_new_tokens, "models": models,
            "ingress_replicas": 2, "llm_replicas": 2, "kills": soak.kills, "per_minute": minutes,
            "per_kind": _per_kind(samples), "ttfa_drift": ttfa, "errors": errors, "rss": rss, "criteria": criteria,
            "requests": len(samples), "samples": [asdict(s) for s in samples], "rss_samples": soak.rss}


def _minute(m: int, samples: list[Sample]) -> dict:
    ttfa = [s.ttfa_s for s in samples if s.ttfa_s is not None]
    underrun = [s.underrun_s for s in samples if s.underrun_s is not None]
    statuses: dict[str, int] = {}
    for s in samples:
        if not _ok(s):
            statuses[s.status] = statuses.get(s.status, 0) + 1
    return {"minute": m, "requests": len(samples), "ttfa_p50_s": _pct(ttfa, 50), "ttfa_p99_s": _pct(ttfa, 99),
            "underrun_p50_s": _pct(underrun, 50), "underrun_p99_s": _pct(underrun, 99),
            "errors": sum(statuses.values()), "errors_by_status": statuses}


def _per_kind(samples: list[Sample]) -> list[dict]:
    rows = []
    for kind in KINDS:
        own = [s for s in samples if s.kind == kind]
        ok = [s for s in own if _ok(s)]
        rows.append({"kind": kind, "requests": len(own), "ok": len(ok),
                     "latency_p50_s": _pct([s.end_s - s.start_s for s in ok], 50),
                     "latency_p99_s": _pct([s.end_s - s.start_s for s in ok], 99)})
    return rows


def _errors(samples: list[Sample], kills: list[dict]) -> dict:
    """Server-side failures (5xx, an error after a 200, a dropped connection), split by whether the request was in
    flight when a replica was killed (started before, ended after)."""
    failed = [s for s in samples if s.status.startswith("5") or s.status in ("stream_error", "ws_error")
              or not (s.status[:1].isdigit() or s.status.startswith("ws_refused"))]
    in_flight = [s for s in failed if any(s.start_s <= k["t_s"] <= s.end_s for k in kills)]
    unexplained = [s for s in failed if s not in in_flight]
    client = [s for s in samples if s.status.startswith(("4", "ws_refused"))]
    return {"server_errors": len(failed), "in_flight_at_kill": len(in_flight),
            "unexplained": [asdict(s) for s in unexplained], "client_errors_4xx": [asdict(s) for s in client],
            "in_flight_messages": sorted({f"{s.status}: {s.error[:120]}" for s in in_flight})}


def _rss_growth(rows: list[dict], kills: list[dict]) -> dict:
    """Per process: RSS at its baseline (the first sample after the warm-up; a replacement started later: one minute
    after it appeared) and at the end; met when no process ended more than 10 % above its baseline."""
    by_pid: dict[int, list[dict]] = {}
    for row in rows:
        by_pid.setdefault(row["pid"], []).append(row)
    end = max((row["t_s"] for row in rows), default=0.0)
    processes = []
    for pid, own in by_pid.items():
        first_seen = own[0]["t_s"]
        settle = first_seen + 60 if first_seen > RSS_EVERY_S else first_seen
        base = next((r for r in own if r["t_s"] >= settle), None)
        if base is None:
            continue  # killed, or appeared too late for a baseline
        last = own[-1]
        processes.append({"process": own[0]["process"], "pid": pid, "baseline_t_s": base["t_s"],
                          "baseline_mb": base["rss_mb"], "last_t_s": last["t_s"], "last_mb": last["rss_mb"],
                          "max_mb": max(r["rss_mb"] for r in own), "growth": last["rss_mb"] / base["rss_mb"] - 1,
                          "at_end": "running" if last["t_s"] == end else "gone (killed)"})
    return {"processes": processes, "met": bool(processes) and all(p["growth"] <= RSS_TOLERANCE for p in processes),
            "tolerance": RSS_TOLERANCE}


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def _markdown(results: dict) -> str:
    c, t, e = results["criteria"], results["ttfa_drift"], results["errors"]
    minutes = [{k: v for k, v in row.items() if k != "errors_by_status"} | {"by_status": json.dumps(row["errors_by_status"])}
               for row in results["per_minute"]]
    kills = ", ".join(f"{k['deployment']} at {k['t_s']:.0f} s" for k in results["kills"]) or "none"
    ratio = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "n/a"
    return (f"{results['minutes']:g} minutes, {results['clients']} clients, {results['requests']} requests "
            f"(speech, streamed speech, transcriptions, chat, realtime turns, voice uploads), 2 ingress + 2 LLM replicas; "
            f"killed: {kills}.\n\n## Criteria\n\n"
            f"- no 5xx except requests in flight at a kill: **{c['no_5xx_beyond_killed_in_flight']}** "
            f"({e['server_errors']} server errors, {e['in_flight_at_kill']} in flight at a kill, "
            f"{len(e['unexplained'])} others)\n"
            f"- RSS of every Serve process within 10 % of after warm-up: **{c['rss_within_10pct']}**\n"
            f"- p99 time to first audio, last {t['window_min']:g} min vs first: {ratio} (<= 1.2x): "
            f"**{c['p99_ttfa_last_le_1.2x_first']}**\n\n"
            "Errors of requests in flight at a kill: " + ("; ".join(e["in_flight_messages"]) or "none") + "\n\n"
            "## Per minute (TTFA and underrun: streamed speech and realtime turns)\n\n" + markdown_table(minutes) +
            "\n## Per kind\n\n" + markdown_table(results["per_kind"]) +
            "\n## RSS per Serve process (MB)\n\n" + markdown_table(results["rss"]["processes"]) +
            "\n![soak](soak.png)\n")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["per_minute"]
    x = [r["minute"] for r in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("ttfa_p50_s", "TTFA p50"), ("ttfa_p99_s", "TTFA p99"), ("underrun_p99_s", "underrun p99")):
        left.plot(x, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=label)
    left.set(xlabel="minute", ylabel="seconds", title="time to first audio, underrun")
    middle.bar(x, [r["requests"] for r in rows], label="requests")
    middle.bar(x, [r["errors"] for r in rows], color="C3", label="errors")
    middle.set(xlabel="minute", title="requests and errors per minute")
    by_pid: dict[int, list] = {}
    for row in results["rss_samples"]:
        by_pid.setdefault(row["pid"], []).append(row)
    for pid, own in by_pid.items():
        right.plot([r["t_s"] / 60 for r in own], [r["rss_mb"] for r in own], label=f"{own[0]['process']} {pid}")
    right.set(xlabel="minute", ylabel="MB", title="RSS of each Serve process")
    right.legend(fontsize=6)
    for ax in (left, middle, right):
        for kill in results["kills"]:
            ax.axvline(kill["t_s"] / 60 if ax is not middle else kill["t_s"] // 60, color="gray", linestyle="--")
        ax.grid(alpha=0.3)
    left.legend()
    middle.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
