"""`vita-audio bench pipeline`: the staged Ray pipeline versus the in-process composition of the same modules.

Part 1, latency (bench-sized models): time to first audio and total time of a TTS request, through the three
Ray stage actors (local Ray, 3 logical GPUs) and through `actors.local.LocalPipeline` in this process, side
by side in one run (1 warm-up each, then round robin; medians; overheads are medians of each round's
staged - in-process difference). Ray overhead = staged - in-process.
Models: the "bench" size of `pipeline.sizes` written with `pipeline.tiny.write_tiny_set` to a temp folder:
the LLM of the decode bench (28 backbone layers + 10 MCTP modules, hidden 256, intermediate 1376, 4 heads /
1 KV head; the tiny tokenizer, so its vocab is the tiny one) and the bench-sized decoder of
../shared/research/original-speed.md (flow encoder d 128 / FFN 512 x 6, estimator channels 64, 2 heads x 16,
4 blocks per level, 12 mid blocks; HiFT base 128), both random; the tiny encoder (TTS does not use it).

The in-process side runs the same stage objects on one event loop (`LocalPipeline`); for the comparison its LLM
engine is held by an observer (`HandOffGate`, a `StepObserver` as the engine's timers are): after a step that
closes an audio chunk, its next forward waits until the decoder returned that chunk's PCM, so the in-process
decoder computes alone. On one machine the staged stages share the CPU: while the decoder works on chunk 1 the
LLM goes on decoding, and on a 2-core VM any busy process slows the other core's work.
So the whole request's overhead mixes Ray with CPU sharing that separate GPUs would not have.
Ray's own overhead is measured on a control: the same request cut where its first audio chunk closes, so
both paths compute exactly the same things before the first audio and the LLM is idle meanwhile.

Part 2, throughput: aggregate LLM tokens/s of 8 concurrent TTS streams versus 1 stream on the tiny default
set, (0) on a DecodeEngine in this process (the ceiling, no Ray), (a) through the LLM stage alone (continuous
batching), (a) with phase-aware admission off
(align_steps=0), (b) through the whole staged pipeline, and (a) again on the bench-sized LLM. For (a) also
the median time from a call to its stream's first item, the price of waiting to join in phase. Beside them, where
an engine step's time goes at 1 and 8 requests (fixed cost and what each row adds: the ratio's ceiling on this
machine) and what one streamed item costs Ray in an actor that does nothing else.

Threads: one torch thread per process by default (in-process composition and each stage). On a shared
2-core machine two OpenMP threads per process oversubscribe the cores and runs slow down erratically
(up to 10x); one thread each keeps the comparison about the pipeline, not the scheduler.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from pipeline.engine.observe import StepObserver

TEXT = "The quick brown fox jumps over the lazy dog."
TEXTS = ["Hello there.", "How are you today?", "The cat sat on the mat.", "One two three.",
         "Good morning!", "A short test.", "Streaming speech.", "Last one here."]


def add_arguments(p, name: str) -> None:
    p.add_argument("--runs", type=int, default=3, help="timed rounds per side (after one warm-up each)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per latency request")
    p.add_argument("--n-steps", type=int, default=10, help="flow-matching ODE steps per chunk")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process composition")
    p.add_argument("--stage-threads", type=int, default=1,
                   help="torch threads per stage actor (1: the three stages do not oversubscribe 2 cores)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--throughput-tokens", type=int, default=256,
                   help="tokens per stream in the throughput part (256: ~15 s of speech in the interleaved layout)")
    p.add_argument("--stagger-s", type=float, default=0.01,
                   help="also measure streams arriving this far apart (0: skip); requests then meet mid-schedule")
    p.add_argument("--models", type=Path, default=None, help="tiny set for part 2 (default: the cached tiny set)")
    p.add_argument("--latency-models", type=Path, default=None,
                   help="models folder of the latency part (default: the bench-sized set, built in a temp folder)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma list of the parts to run, of {','.join(PARTS)} (engine: the in-process engine rows "
                        "and step costs; stages: the Ray throughput rows; item-cost: one streamed item's Ray cost)")
    p.add_argument("--skip-latency", action="store_true", help="leave out the latency part")
    p.add_argument("--skip-throughput", action="store_true", help="leave out engine, stages and item-cost")
    p.add_argument("--quick", action="store_true", help="1 round, 32 tokens, 4 ODE steps (a smoke run)")


PARTS = ("latency", "engine", "stages", "item-cost")


def chosen_parts(args) -> list[str]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"--parts {args.parts!r}: expected a comma list of {', '.join(PARTS)}")
    if args.skip_latency:
        parts = [p for p in parts if p != "latency"]
    if args.skip_throughput:
        parts = [p for p in parts if p == "latency"]
    return [p for p in PARTS if p in parts]


def build_bench_models(out_dir: Path, seed: int = 11) -> Path:
    """llm/ and decoder/ of the "bench" size (`pipeline.sizes`), encoder/ (tiny) under out_dir: a random set,
    marked as one (so its requests' layout "auto" is the task's, as on the tiny set)."""
    from pipeline.tiny import write_tiny_set

    write_tiny_set(out_dir, seed, llm="bench", decoder="bench")
    return out_dir


def run(args) -> dict:
    import ray
    import torch

    from benchmarks.report import markdown_table, write_report
    from actors.models import resolve_models_dir
    from actors.ray_runtime import start_ray

    parts = chosen_parts(args)
    if args.quick:
        args.runs, args.max_new_tokens, args.n_steps, args.throughput_tokens = 1, 32, 4, 48
    torch.set_num_threads(args.threads)
    started = False
    if set(parts) - {"engine"}:  # joins a running Ray, else starts a local one
        started = start_ray(num_cpus=os.cpu_count(), num_gpus=3)
    results, markdown = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                  if not k.startswith("_")}, "parts": parts}, ""
    tmp = Path(tempfile.mkdtemp(prefix="vita-bench-pipeline-"))
    try:
        bench_models = None
        if "stages" in parts or ("latency" in parts and args.latency_models is None):
            t0 = time.perf_counter()
            bench_models = build_bench_models(tmp / "models")
            results["build_bench_models_s"] = time.perf_counter() - t0
        if "latency" in parts:
            results["latency"] = latency(args, args.latency_models or bench_models)
            rows = results["latency"]["rows"]
            models = "bench-sized models" if args.latency_models is None else f"models {args.latency_models}"
            markdown += f"## Time to first audio, staged Ray vs in-process ({models}, TTS)\n\n"
            markdown += markdown_table(rows) + "\n" + _latency_summary(results["latency"]) + "\n"
        throughput_parts = [p for p in parts if p != "latency"]
        if throughput_parts:
            tiny = resolve_models_dir(args.models)
            results["throughput"] = out = {"target": f">= 4x at {args.concurrency} streams (tiny default)"}
            if "engine" in parts:
                out["engine"] = engine_throughput(args, tiny, "tiny set")
            if "stages" in parts:
                out["tiny"] = throughput(args, tiny, "tiny set", whole_pipeline=True)
                out["tiny_unaligned"] = throughput(args, tiny, "tiny set, align_steps=0", whole_pipeline=False,
                                                   align_steps=0)
                out["bench"] = throughput(args, bench_models, "bench-sized LLM", whole_pipeline=False, staggered=False)
            if "item-cost" in parts:
                out["ray_item_cost"] = ray_item_cost(args)
            markdown += _throughput_markdown(args, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
    json_path, md_path = write_report("pipeline", results, markdown, args.out)
    print(markdown)
    results["report"] = {"json": str(json_path), "markdown": str(md_path)}
    return results


def _throughput_markdown(args, out: dict) -> str:
    from benchmarks.report import markdown_table

    markdown, n = "", args.concurrency
    rows = [row for key in ("engine", "tiny", "tiny_unaligned", "bench") if key in out for row in out[key]["rows"]]
    if rows:
        markdown += f"## Aggregate tokens/s, {n} concurrent streams vs 1\n\n"
        columns = ["models", "path", "tokens_per_s_1_stream", f"tokens_per_s_{n}_streams", "speedup",
                   "speedup_range",
                   "first_item_s_1_stream", f"first_item_s_{n}_streams", "ms_per_step_1",
                   f"ms_per_step_{n}", "items_per_stream_1", f"items_per_stream_{n}",
                   "tokens", "error"]
        markdown += markdown_table(rows, columns) + "\n"
        markdown += (f"speedup: median over {args.runs} rounds of the {n}-stream run's tokens/s over the "
                     "1-stream run's just before it (speedup_range: lowest-highest round); tokens/s: medians; "
                     "items_per_stream: stream items a client received.\n")
    if "engine" in out:
        costs = out["engine"]["step_costs"]
        markdown += ("\n### Where a step's time goes (engine in process, tiny set; ms per step, medians of "
                     "profiled rounds)\n\n")
        step_rows = [{"requests": 1, **costs["ms_per_step_1"]}, {"requests": n, **costs[f"ms_per_step_{n}"]},
                     {"requests": "one more row adds", **costs["per_row_ms"]}]
        markdown += markdown_table(step_rows, ["requests", *STEP_PARTS, "total"]) + "\n"
        markdown += (f"A step costs about fixed + rows x per_row: fixed {costs['fixed_ms']:.3f} ms, per row "
                     f"{costs['per_row_ms']['total']:.3f} ms. {n} streams reach 4x one stream only if a row adds "
                     f"at most ({n} - 4) / (3 x {n}) of the fixed cost: {costs['per_row_ms_for_4x']:.3f} ms. "
                     "What a row adds is its own arithmetic (attention over its cached positions, the MCTP "
                     "catch-up, its lm_head scores) and its bookkeeping, on one core.\n")
    if "ray_item_cost" in out:
        cost = out["ray_item_cost"]
        markdown += (f"\nOne streamed item costs Ray {cost['producer_cpu_us_per_item']:.0f} µs of CPU in the producing "
                     f"actor and {cost['consumer_cpu_us_per_item']:.0f} µs in the consumer ({cost['items']} items of an "
                     f"actor that only streams them, medians of {cost['rounds']} rounds); in the LLM stage the "
                     "producer's share runs beside the decode steps, hence the output merged into fewer items.\n")
    return markdown


# ---------------------------------------------------------------------------------------------------------
# Part 1: latency


def latency(args, models: Path) -> dict:
    from actors.config import PipelineConfig
    from actors.local import LocalPipeline
    from actors.staged_pipeline import StagedPipeline
    from actors.results import collect

    config = PipelineConfig.from_models_dir(models, stage_timeout_s=300, request_timeout_s=1800)
    config.decoder.n_steps = args.n_steps
    # in process: the LLM steps on its engine thread, where the gate may hold it (never on the event loop)
    local = LocalPipeline(dataclasses.replace(config, llm=dataclasses.replace(config.llm, engine_thread=True)))
    gate = HandOffGate.install(local)
    config = config.with_resources(torch_threads=args.stage_threads)
    pipe = StagedPipeline.start(config)
    try:
        sides = {"staged (Ray)": pipe, "in-process": local}
        # The control: the same request cut where its first audio chunk closes, so the LLM has nothing left to
        # do while the decoder works on that chunk. Both paths then compute exactly what they computed before
        # the first audio, and only the staged one pays Ray; without the cut, the staged LLM stage keeps
        # decoding beside the decoder and both slow down on this shared CPU (separate GPUs would not).
        reference = collect(local.tts(TEXT, max_new_tokens=args.max_new_tokens))
        cut = _first_chunk_length(reference.token_ids, local.layout)
        requests = {"": args.max_new_tokens, ", request ends with its first audio chunk": cut}
        samples = {(name, suffix): [] for suffix in requests for name in sides}
        for round_index in range(args.runs + 1):  # round 0 warms both up
            for (name, suffix), runs in samples.items():
                result = collect(sides[name].tts(TEXT, max_new_tokens=requests[suffix]))
                if not result.ok:
                    raise RuntimeError(f"{name}{suffix}: {result.error}")
                if round_index:
                    runs.append(result)
        same_ids = all(r.token_ids == reference.token_ids[: len(r.token_ids)] for runs in samples.values() for r in runs)
        placement = {s: p.gpu_ids for s, p in pipe.placement().items()}
    finally:
        pipe.shutdown()

    rows = [_latency_row(name + suffix, results) for (name, suffix), results in samples.items()]
    ray_row, local_row, ray_cut, local_cut = rows
    runs = list(samples.values())
    overhead, overhead_fraction, _ = _paired_overhead(runs[0], runs[1])
    control, control_fraction, control_range = _paired_overhead(runs[2], runs[3])
    return {
        "rows": rows,
        "handoff_overhead_s": ray_row["handoff_s"] - local_row["handoff_s"],
        "llm_first_codes_overhead_s": ray_row["llm_first_audio_codes_s"] - local_row["llm_first_audio_codes_s"],
        "decoder_compute_slowdown_s": (ray_row["decoder_compute_to_first_audio_s"]
                                       - local_row["decoder_compute_to_first_audio_s"]),
        "ttfa_overhead_s": overhead,
        "ttfa_overhead_fraction": overhead_fraction,
        # the control: Ray's overhead measured directly, the LLM idle while the decoder works on chunk 1
        "cut_tokens": cut,
        "ray_overhead_s": control,
        "ray_overhead_fraction": control_fraction,
        "ray_overhead_fraction_range": control_range,
        "cut_decoder_compute_slowdown_s": (ray_cut["decoder_compute_to_first_audio_s"]
                                           - local_cut["decoder_compute_to_first_audio_s"]),
        "cut_handoff_overhead_s": ray_cut["handoff_s"] - local_cut["handoff_s"],
        "total_ratio": ray_row["total_s"] / local_row["total_s"],
        "same_ids": same_ids,
        "in_process_gate": {"held_steps": gate.held, "timeouts": gate.timeouts},
        "placement_gpu_ids": placement,
        "models": "llm 28+10 layers hidden 256 (tiny tokenizer), decoder original-speed.md bench size, random",
        "target": "Ray overhead <= 10% of time to first audio",
        "per_run": {f"{name}{suffix}": [r.done.timings for r in results] for (name, suffix), results in samples.items()},
    }


class HandOffGate(StepObserver):
    """The in-process side's fairness: after an engine step that closes audio chunks, the LLM's next forward
    waits until the decoder returned those chunks' PCM, so the in-process decoder computes alone (as the
    composition before the stage objects did, one stage at a time). The staged LLM keeps decoding beside its
    decoder; that overlap is what the whole-request rows show, and the control row (cut at the first chunk)
    leaves out.

    A `StepObserver` on the in-process LLM stage's engine, told of each returned chunk by `GatedClients`;
    it blocks the engine's thread, so the in-process LLM stage must step on its thread (`engine_thread=True`).
    """

    WAIT_S = 60.0  # a chunk whose PCM never comes back (a failed request) holds the engine no longer

    def __init__(self):
        self.owed = 0  # chunks closed by the engine whose PCM the decoder has not returned yet
        self.changed = threading.Condition()
        self.held = 0  # forwards that waited
        self.timeouts = 0

    @classmethod
    def install(cls, local) -> "HandOffGate":
        """Observe `local`'s engine and wrap its stage clients (a `LocalPipeline`)."""
        gate = cls()
        engine = local.stages.llm.engine
        if engine.observer is not None:
            raise RuntimeError("the in-process engine already has an observer")
        engine.observer = gate
        local.clients = GatedClients(local.clients, gate)
        return gate

    def on_step(self, events: list) -> None:
        from pipeline.engine.requests import AudioChunkEvent

        closed = sum(isinstance(event, AudioChunkEvent) for event in events)
        if closed:
            with self.changed:
                self.owed += closed

    def on_forward(self, kind, rows, q_len, run):
        with self.changed:
            if self.owed > 0:
                self.held += 1
                if not self.changed.wait_for(lambda: self.owed <= 0, self.WAIT_S):
                    self.timeouts += 1
                    self.owed = 0
        return run()

    def decoded(self) -> None:
        with self.changed:
            self.owed = max(self.owed - 1, 0)
            self.changed.notify_all()


class GatedClients:
    """A `LocalPipeline`'s stage clients, telling the gate each time the decoder returned a chunk's PCM."""

    def __init__(self, clients, gate: HandOffGate):
        self.clients, self.gate = clients, gate

    async def encode(self, audio):
        return await self.clients.encode(audio)

    def generate(self, request):
        return self.clients.generate(request)

    async def push(self, chunk):
        try:
            return await self.clients.push(chunk)
        finally:
            if not chunk.final:  # the flush at the end is no chunk the engine closed
                self.gate.decoded()

    def close(self, request_id: str) -> None:
        self.clients.close(request_id)

    def abort(self, request_id: str) -> None:
        self.clients.abort(request_id)


def _paired_overhead(staged: list, local: list) -> tuple[float, float, str]:
    """Staged - in-process time to first audio per round (the two ran back to back), median seconds, median
    fraction of the in-process time, and the fractions' range."""
    pairs = [(s.done.timings["time_to_first_audio"], l.done.timings["time_to_first_audio"]) for s, l in zip(staged, local)]
    fractions = [(s - l) / l for s, l in pairs]
    return (statistics.median(s - l for s, l in pairs), statistics.median(fractions),
            f"{min(fractions) * 100:+.1f} to {max(fractions) * 100:+.1f} %")


def _first_chunk_length(token_ids: list[int], layout) -> int:
    """Tokens up to and including the end-of-audio that closes the first audio chunk (all, if none closes)."""
    seen_audio = False
    for i, token in enumerate(token_ids):
        seen_audio = seen_audio or layout.is_audio(token)
        if seen_audio and token == layout.eoa:
            return i + 1
    return len(token_ids)


def _latency_row(path: str, results: list) -> dict:
    timings = [r.done.timings for r in results]
    return {
        "path": path,
        "time_to_first_audio_s": statistics.median(t["time_to_first_audio"] for t in timings),
        "llm_first_audio_codes_s": statistics.median(t["first_audio_codes"] for t in timings),
        "decoder_compute_to_first_audio_s": statistics.median(t["first_audio_decoder_compute"] for t in timings),
        # what is neither LLM nor decoder compute: hand-offs (Ray calls, queues) and waiting for a CPU
        "handoff_s": statistics.median(t["time_to_first_audio"] - t["first_audio_codes"]
                                       - t["first_audio_decoder_compute"] for t in timings),
        "total_s": statistics.median(t["total"] for t in timings),
        "tokens": len(results[0].token_ids),
        "audio_s": len(results[0].pcm) / results[0].sample_rate,
        "chunks": len(results[0].chunks),
    }


def _latency_summary(lat: dict) -> str:
    return (f"**Ray overhead on time to first audio: {lat['ray_overhead_s'] * 1000:+.1f} ms = "
            f"{lat['ray_overhead_fraction'] * 100:+.1f} %** (target <= 10 %; per round {lat['ray_overhead_fraction_range']}; "
            f"medians of the rounds' staged - in-process differences), measured on the request cut at its first "
            f"audio chunk ({lat['cut_tokens']} tokens), so the LLM is idle while the decoder works on that chunk in "
            f"both paths (staged - in-process: hand-offs {lat['cut_handoff_overhead_s'] * 1000:+.1f} ms, decoder compute "
            f"{lat['cut_decoder_compute_slowdown_s'] * 1000:+.1f} ms).\n\n"
            f"Whole request ({lat['rows'][0]['tokens']} tokens): staged - in-process time to first audio "
            f"{lat['ttfa_overhead_s'] * 1000:+.1f} ms = {lat['ttfa_overhead_fraction'] * 100:+.1f} %, of which: LLM to its "
            f"first audio chunk {lat['llm_first_codes_overhead_s'] * 1000:+.1f} ms, decoder compute for the first audio "
            f"{lat['decoder_compute_slowdown_s'] * 1000:+.1f} ms (the staged LLM keeps decoding beside it on the shared "
            f"CPU), hand-offs {lat['handoff_overhead_s'] * 1000:+.1f} ms. Total time staged / in-process: "
            f"{lat['total_ratio']:.2f} (the stages overlap); identical ids: {lat['same_ids']}; stage GPUs: "
            f"{lat['placement_gpu_ids']}\n")


# ---------------------------------------------------------------------------------------------------------
# Part 2: throughput


def engine_throughput(args, models, label: str) -> dict:
    """The same TTS workload on a `DecodeEngine` in this process (no Ray): 1 request vs n requests added together.

    The ceiling for the LLM stage: what continuous batching gives before any hand-off, event loop or process
    boundary. Also the engine's milliseconds per step at 1 and at n requests.
    """
    import torch

    from actors.config import PipelineConfig
    from actors.payloads import SpeechRequest, build_prompt, to_generation_request
    from benchmarks.decode import ForwardTimer
    from pipeline.engine.decode_engine import DecodeEngine
    from pipeline.engine.requests import TokenEvent
    from pipeline.llm import load_llm
    from pipeline.tokens.vocab import TokenLayout, load_tokenizer

    config = PipelineConfig.from_models_dir(models)
    tokenizer = load_tokenizer(config.llm.path)
    layout = TokenLayout.from_tokenizer(tokenizer)
    model = load_llm(config.llm.path)
    n, tokens = args.concurrency, args.throughput_tokens

    def run(k: int, profile: bool = False) -> tuple[float, float, int, ForwardTimer | None]:
        """k requests added together, run to the end: (tokens/s, seconds per step, steps, the forward timer)."""
        timer = ForwardTimer() if profile else None
        engine = DecodeEngine(model, layout=layout, max_batch_size=max(16, n), align_steps=config.llm.align_steps,
                              observer=timer)
        for i in range(k):
            request = SpeechRequest(task="tts", text=TEXTS[i % len(TEXTS)], max_new_tokens=tokens)
            engine.add_request(to_generation_request(request, build_prompt(request, tokenizer, layout)))
        generated, steps, t0 = 0, 0, time.perf_counter()
        with torch.inference_mode():
            while engine.has_unfinished():
                generated += sum(isinstance(event, TokenEvent) for event in engine.step())
                steps += 1
        seconds = time.perf_counter() - t0
        return generated / seconds, seconds / steps, steps, timer

    run(1), run(n)  # warm-up
    ones, manys = [], []
    for _ in range(args.runs):  # alternate 1 and n requests; medians
        ones.append(run(1))
        manys.append(run(n))
    one, many = statistics.median(r[0] for r in ones), statistics.median(r[0] for r in manys)
    return {"rows": [{
        "models": label, "path": "engine in process (no Ray)", "tokens_per_s_1_stream": one,
        f"tokens_per_s_{n}_streams": many, **_paired_speedup([r[0] for r in ones], [r[0] for r in manys]),
        "tokens": n * tokens,
        "ms_per_step_1": statistics.median(r[1] for r in ones) * 1000,
        f"ms_per_step_{n}": statistics.median(r[1] for r in manys) * 1000,
    }], "step_costs": step_costs(run, n, max(args.runs, 2))}


STEP_PARTS = ("backbone", "mtp", "lm_head", "rest")


def step_costs(run, n: int, rounds: int) -> dict:
    """Where a step's time goes at 1 and at n requests (`ForwardTimer`, alternated rounds, medians): the
    backbone forward, the MCTP forward, lm_head, and the rest (inputs, masks, token choice, bookkeeping).

    Each request adds one row to every step, so a step costs about fixed + rows * per_row, and n requests give
    at most n * (fixed + per_row) / (fixed + n * per_row) times the tokens/s of one: the ceiling that batching
    the same work can reach. `per_row_ms` is what one more row adds to a step, split by part.
    """
    samples: dict[int, list[dict]] = {1: [], n: []}  # per round: ms per step of each part
    for _ in range(rounds):
        for k in (1, n):
            _, seconds_per_step, steps, timer = run(k, profile=True)
            parts = dict.fromkeys(STEP_PARTS, 0.0)
            for kind, _, _, seconds in timer.log:
                parts[kind if kind in ("backbone", "lm_head") else "mtp"] += seconds
            parts = {part: seconds / steps * 1000 for part, seconds in parts.items()}
            parts["total"] = seconds_per_step * 1000
            parts["rest"] = parts["total"] - sum(parts[p] for p in STEP_PARTS[:3])
            samples[k].append(parts)
    out = {f"ms_per_step_{k}": {part: statistics.median(r[part] for r in rows) for part in (*STEP_PARTS, "total")}
           for k, rows in samples.items()}
    one, many = out["ms_per_step_1"], out[f"ms_per_step_{n}"]
    out["per_row_ms"] = {part: (many[part] - one[part]) / (n - 1) for part in (*STEP_PARTS, "total")}
    out["fixed_ms"] = fixed = one["total"] - out["per_row_ms"]["total"]
    out["per_row_ms_for_4x"] = (n - 4) * fixed / (3 * n)  # n (F + r) / (F + n r) >= 4  <=>  r <= (n - 4) F / 3n
    return out


class _ItemSource:
    """An async actor that only streams a given item n times: what one streamed item costs in Ray itself."""

    async def stream(self, item, n: int):
        for _ in range(n):
            yield item

    async def cpu_seconds(self) -> float:
        return time.process_time()  # every thread of the actor process (event loop, Ray's report threads)


def ray_item_cost(args, n: int = 1000) -> dict:
    """CPU time per streamed item of a Ray streaming generator, in the producing actor and in the consumer.

    The LLM stage sends each request's output as such items; the item below is an LLMOutput like a merged TTS
    item (a text delta and an audio chunk). The producer's share runs beside the decode steps in the stage's
    process, which is why the stage merges output into fewer items (`stream_interval_s`).
    """
    import ray

    from actors.payloads import LLMOutput

    source = ray.remote(_ItemSource).options(max_concurrency=10, num_cpus=0).remote()
    item = LLMOutput(request_id="bench", text="a text delta ", text_ids=[1, 2, 3], audio_chunks=[list(range(10))])

    async def consume() -> None:
        async for ref in source.stream.options(num_returns="streaming").remote(item, n):
            await ref

    rounds = []
    try:
        for _ in range(max(args.runs, 2) + 1):  # the first is a warm-up
            actor0, mine0, t0 = ray.get(source.cpu_seconds.remote()), time.process_time(), time.perf_counter()
            asyncio.run(consume())
            wall, mine = time.perf_counter() - t0, time.process_time() - mine0
            actor = ray.get(source.cpu_seconds.remote()) - actor0
            rounds.append((wall / n, actor / n, mine / n))
    finally:
        ray.kill(source)
    rounds = rounds[1:]
    return {"items": n, "rounds": len(rounds),
            "wall_us_per_item": statistics.median(r[0] for r in rounds) * 1e6,
            "producer_cpu_us_per_item": statistics.median(r[1] for r in rounds) * 1e6,
            "consumer_cpu_us_per_item": statistics.median(r[2] for r in rounds) * 1e6}


def _paired_speedup(ones: list[float], manys: list[float]) -> dict:
    """n streams vs 1 per round (the two runs of a round are back to back, so the machine's drift between
    rounds cancels), median over rounds, with the range."""
    ratios = [m / o for o, m in zip(ones, manys)]
    return {"speedup": statistics.median(ratios), "speedup_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
            "speedup_per_round": ratios}


def throughput(args, models, label: str, whole_pipeline: bool, align_steps: int | None = None,
               staggered: bool = True) -> dict:
    from actors.config import PipelineConfig
    from actors.payloads import SpeechRequest
    from actors.staged_pipeline import StagedPipeline
    from actors.results import collect

    config = PipelineConfig.from_models_dir(models, stage_timeout_s=300, request_timeout_s=1800)
    config.decoder.n_steps = args.n_steps
    config.llm.max_batch_size = max(16, args.concurrency)
    if align_steps is not None:
        config.llm.align_steps = align_steps
    config = config.with_resources(torch_threads=args.stage_threads)
    pipe = StagedPipeline.start(config)
    n, tokens = args.concurrency, args.throughput_tokens
    first_items: list[float] = []  # per stream: seconds from the call to its first item (text or audio)
    items: list[int] = []  # per stream: items received (each one is a Ray report; see ray_item_cost)
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]

    async def llm_only(text: str) -> int:
        request = SpeechRequest(task="tts", text=text, max_new_tokens=tokens)
        count, start = 0, time.perf_counter()
        received = 0
        async for ref in pipe.stages.llm.generate.options(num_returns="streaming").remote(request):
            item = await ref
            received += 1
            if count == 0 and start is not None:
                first_items.append(time.perf_counter() - start)
                start = None
            if item.end is not None:
                count = len(item.end.token_ids)
        items.append(received)
        return count

    async def llm_many(k: int, stagger_s: float = 0.0) -> int:
        async def started(i: int) -> int:
            await asyncio.sleep(i * stagger_s)  # request i arrives i * stagger_s after the first
            return await llm_only(texts[i])

        return sum(await asyncio.gather(*(started(i) for i in range(k))))

    def pipeline_many(k: int) -> int:
        results = [None] * k

        def one(i):
            results[i] = collect(pipe.tts(texts[i], max_new_tokens=tokens))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"pipeline throughput run failed: {failed[0]}")
        return sum(len(r.token_ids) for r in results)

    def timed(fn, k):
        first_items.clear()
        items.clear()
        t0 = time.perf_counter()
        count = fn(k)
        first = statistics.median(first_items) if first_items else None
        per_stream = sum(items) / k if items else None
        return count / (time.perf_counter() - t0), count, first, per_stream

    rows = []
    try:
        loop_run = lambda k: asyncio.run(llm_many(k))  # noqa: E731
        paths = [("LLM stage (continuous batching)", loop_run)]
        if staggered and args.stagger_s > 0:
            paths.append((f"LLM stage, arrivals {args.stagger_s * 1000:g} ms apart",
                          lambda k: asyncio.run(llm_many(k, args.stagger_s))))
        if whole_pipeline:
            paths.append(("whole pipeline (TTS)", pipeline_many))
        for name, fn in paths:
            try:
                fn(1)  # warm-up
                ones, manys, firsts_1, firsts_n, items_1, items_n = [], [], [], [], [], []
                for _ in range(args.runs):  # alternate 1 and n streams; medians (the machine is noisy)
                    one, _, first, per_stream = timed(fn, 1)
                    ones.append(one)
                    firsts_1.append(first)
                    items_1.append(per_stream)
                    many, count, first, per_stream = timed(fn, n)
                    manys.append(many)
                    firsts_n.append(first)
                    items_n.append(per_stream)
            except RuntimeError as err:  # reported in the table, the other rows still count
                rows.append({"models": label, "path": name, "error": str(err)[:200]})
                continue
            one, many = statistics.median(ones), statistics.median(manys)
            row = {"models": label, "path": name, "tokens_per_s_1_stream": one, f"tokens_per_s_{n}_streams": many,
                   **_paired_speedup(ones, manys), "tokens": count, "runs_1": ones, f"runs_{n}": manys}
            if None not in firsts_1 + firsts_n:  # median time to a stream's first item (LLM stage path)
                row["first_item_s_1_stream"] = statistics.median(firsts_1)
                row[f"first_item_s_{n}_streams"] = statistics.median(firsts_n)
                row["items_per_stream_1"] = statistics.median(items_1)
                row[f"items_per_stream_{n}"] = statistics.median(items_n)
            rows.append(row)
        stats = pipe.stats()
    finally:
        pipe.shutdown()
    return {"rows": rows, "llm_largest_batch": stats["llm"]["largest_batch"],
            "decoder_largest_batch": stats["decoder"]["largest_batch"], "models": str(models)}
