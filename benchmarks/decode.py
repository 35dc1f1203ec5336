"""`vita-audio bench decode`: the LLM engine (`DecodeEngine`) per decode mode, on the bench-size random model.

Model and protocol are those of ../shared/research/original-speed.md (LLM part), so the numbers sit next to
the original's: the "bench" size of `pipeline.sizes` (28 backbone layers + 10 MCTP modules, hidden 256,
intermediate 1376, 4 heads / 1 KV head), vocab 69632, float32, seed 11, built in memory; prompt [0] * 32, 256 new tokens, greedy, repetition penalty
1.0, no EOS. Every mode runs in the same process, round robin (1 warm-up round, then timed rounds), and the
rows report medians.

Besides tokens/s it measures the cost of each kind of forward (prefill, 1-token backbone step, catch-up
step by size, MCTP step) and prices each schedule with them: predicted time = the sum of the measured
costs of the forwards the schedule makes. predicted / wall ("of ceiling") near 1 means the engine adds
little beyond the model; "overhead per step" is wall minus the time inside model forwards, per forward.
"exact" is lossless MCTP (drafts verified by the backbone); on a random model drafts are almost never
accepted, so it is also run on a variant whose modules copy the backbone's bigram ("drafting model").
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections import defaultdict

import torch

from actors.requests import MODE_NAMES
from pipeline.engine.observe import StepObserver
from pipeline.sizes import build_llm, make_drafting_model

MODES = list(MODE_NAMES)  # the request policy's mode names (actors.requests), listed once

# ../shared/research/original-speed.md, "Per mode" (fa2+sdpa-kernel path; vanilla also on native sdpa).
ORIGINAL = {
    "source": "shared/research/original-speed.md (original VITA-Audio code, same model and protocol, CPU 2 threads)",
    "tokens_per_s": {"vanilla": 47.65, "vanilla_sdpa": 49.34, "balance": 95.72, "boost": 98.78, "turbo": 138.09},
    "x_vanilla": {"vanilla": 1.00, "balance": 2.01, "boost": 2.07, "turbo": 2.90},
    "backbone_forwards": {"vanilla": 256, "balance": 74, "boost": 73, "turbo": 24},
    "mtp_forwards": {"vanilla": 0, "balance": 182, "boost": 183, "turbo": 232},
    "ms_to_10th_token": {"vanilla": 212.3, "balance": 133.7, "boost": 79.2, "turbo": 81.1},
    "step_ms": {"backbone_1tok": 20.53, "catchup_11tok": 32.18, "mtp_step": 4.52, "mtp_first_use": 4.70},
}


def add_arguments(p, name: str) -> None:
    p.add_argument("--quick", action="store_true", help="64 new tokens, 1 timed round (a smoke run)")
    p.add_argument("--runs", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the original's numbers used 2 on an idle "
                   "machine; on a shared 2-core machine 2 threads collapse under contention, so 1 is the default)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--no-drafting-model", action="store_true", help="skip exact mode on the drafting model")


class ForwardTimer(StepObserver):
    """Times every model call of the engine (CUDA synchronised around it): `log` of (kind, rows, longest query,
    seconds) and their sum `seconds`."""

    def __init__(self):
        self.log: list[tuple[str, int, int, float]] = []
        self.seconds = 0.0

    def on_forward(self, kind, rows, q_len, run):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.log.append((kind, rows, q_len, dt))
        return out


def _classify(log, prompt_len: int) -> list[str]:
    """Cost class of each forward of one run: prefill, backbone 1-token, catch-up by size, MCTP step."""
    seen, classes = set(), []
    for kind, _, q, _ in log:
        if kind == "backbone":
            classes.append("prefill" if not classes else "backbone_1tok" if q == 1 else f"catchup_{q}tok")
        else:
            classes.append("mtp_first_use" if kind not in seen else f"mtp_{q}rows")
            seen.add(kind)
    return classes


def run_once(model, layout, mode: str, prompt: list[int], max_new: int) -> dict:
    from pipeline.engine.decode_engine import DecodeEngine
    from pipeline.engine.requests import EndEvent, GenerationRequest, TokenEvent

    timer = ForwardTimer()
    engine = DecodeEngine(model, layout=layout, observer=timer)
    engine.add_request(GenerationRequest(prompt, mode=mode, max_new_tokens=max_new, stop_ids=[]))
    ids, usage, t10 = [], None, None
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
                if len(ids) == 10:
                    t10 = time.perf_counter() - t0
            elif isinstance(event, EndEvent):
                usage = event.usage
    wall = time.perf_counter() - t0
    log = []  # one entry per forward, the step's lm_head time added to it (one request: one forward a step)
    for entry in timer.log:
        if entry[0] == "lm_head" and log:
            log[-1] = (*log[-1][:3], log[-1][3] + entry[3])
        else:
            log.append(entry)
    return {
        "wall": wall, "inside": timer.seconds, "forwards": len(log), "ids": ids, "usage": usage, "t10": t10,
        "classes": _classify(log, len(prompt)), "seconds": [s for *_, s in log],
    }


def _median(values):
    return statistics.median(values) if values else None


def bench_models(models: dict, modes_of: dict, prompt, max_new: int, runs: int) -> dict:
    """Round robin over (model, mode) pairs: 1 warm-up round + `runs` timed rounds; per-row medians."""
    from pipeline.tokens.layout import default_layout

    layouts = {name: default_layout(m) for name, m in models.items()}
    rows = [(name, mode) for name in models for mode in modes_of[name]]
    timed = defaultdict(list)
    for round_ in range(runs + 1):
        for name, mode in rows:
            result = run_once(models[name], layouts[name], mode, prompt, max_new)
            if round_ > 0:
                timed[(name, mode)].append(result)
            print(f"[bench decode] {'warm-up' if round_ == 0 else f'round {round_}/{runs}'} {name}/{mode}: "
                  f"{len(result['ids']) / result['wall']:.1f} tokens/s", file=sys.stderr, flush=True)
    return timed


def summarise(timed: dict, max_new: int) -> tuple[list[dict], dict]:
    costs = defaultdict(list)  # cost class -> seconds, pooled over every timed run of one model
    for (name, _), results in timed.items():
        for r in results:
            for cls, sec in zip(r["classes"], r["seconds"]):
                costs[(name, cls)].append(sec)
    step_ms = {key: 1e3 * _median(v) for key, v in costs.items()}
    rows = []
    for (name, mode), results in timed.items():
        first = results[0]
        for r in results[1:]:
            assert r["ids"] == first["ids"], f"{name}/{mode}: ids differ between timed runs"
        wall = _median([r["wall"] for r in results])
        inside = _median([r["inside"] for r in results])
        predicted = sum(step_ms[(name, c)] for c in first["classes"]) / 1e3
        usage = first["usage"]
        row = {
            "model": name,
            "mode": mode,
            "tokens": len(first["ids"]),
            "tokens_per_s": len(first["ids"]) / wall,
            "backbone_fwd": usage["backbone_forwards"],
            "mtp_fwd": usage["mtp_forwards"],
            "forwards_per_token": (usage["backbone_forwards"] + usage["mtp_forwards"]) / len(first["ids"]),
            "ms_to_10th_token": 1e3 * _median([r["t10"] for r in results if r["t10"] is not None] or [0.0]),
            "wall_s": wall,
            "predicted_s": predicted,
            "of_ceiling": predicted / wall,
            "overhead_ms_per_step": 1e3 * (wall - inside) / first["forwards"],
            "overhead_share": (wall - inside) / wall,
        }
        if usage.get("verify"):
            row["acceptance_length"] = usage["acceptance_length"]
        if name == "random" and mode in ORIGINAL["x_vanilla"]:
            row["orig_tokens_per_s"] = ORIGINAL["tokens_per_s"][mode]
            row["orig_x_vanilla"] = ORIGINAL["x_vanilla"][mode]
        rows.append(row)
    for name in {r["model"] for r in rows}:
        base = next((r for r in rows if r["model"] == name and r["mode"] == "vanilla"), None)
        for r in rows:
            if base is not None and r["model"] == name:
                r["x_vanilla"] = base["wall_s"] / r["wall_s"]
                r["ceiling_x_vanilla"] = base["predicted_s"] / r["predicted_s"]
                r["same_ids_as_vanilla"] = timed[(name, r["mode"])][0]["ids"] == timed[(name, "vanilla")][0]["ids"]
    return rows, step_ms


def run(args) -> dict:
    from benchmarks.report import markdown_table, write_report

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--modes must be a comma-separated subset of {MODES}, got {args.modes!r}")
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    max_new = 64 if args.quick else args.max_new_tokens
    runs = 1 if args.quick else args.runs
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        models = {"random": build_llm("bench")}
        modes_of = {"random": modes}
        if "exact" in modes and not args.no_drafting_model:
            models["drafting"] = make_drafting_model(build_llm("bench"), backbone_scale=0.0)
            modes_of["drafting"] = ["vanilla", "exact"]
        t0 = time.perf_counter()
        timed = bench_models(models, modes_of, [0] * 32, max_new, runs)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    rows, step_ms = summarise(timed, max_new)
    cost_rows = [{"model": m, "step": c, "ms": v, "count": sum(
        r["classes"].count(c) for (n, _), rs in timed.items() if n == m for r in rs)} for (m, c), v in sorted(step_ms.items())]
    results = {
        "protocol": {"prompt": "[0]*32", "max_new_tokens": max_new, "timed_rounds": runs, "warmup_rounds": 1,
                     "threads": args.threads, "greedy": True, "repetition_penalty": 1.0, "elapsed_s": elapsed,
                     "load_average_1min": os.getloadavg()[0]},
        "rows": rows,
        "step_costs_ms": cost_rows,
        "original": ORIGINAL,
    }
    columns = ["model", "mode", "tokens_per_s", "x_vanilla", "orig_tokens_per_s", "orig_x_vanilla", "ceiling_x_vanilla", "of_ceiling", "backbone_fwd",
               "mtp_fwd", "forwards_per_token", "ms_to_10th_token", "overhead_ms_per_step", "acceptance_length",
               "same_ids_as_vanilla"]
    original_rows = [{"mode": m, "tokens_per_s": ORIGINAL["tokens_per_s"][m], "x_vanilla": ORIGINAL["x_vanilla"][m],
                      "backbone_fwd": ORIGINAL["backbone_forwards"][m], "mtp_fwd": ORIGINAL["mtp_forwards"][m],
                      "ms_to_10th_token": ORIGINAL["ms_to_10th_token"][m]} for m in ORIGINAL["x_vanilla"]]
    markdown = (
        f"Bench-size random Qwen2-MTP (28 + 10 layers, hidden 256, vocab 69632, float32), prompt [0]*32, "
        f"{max_new} new tokens, greedy, {args.threads} torch threads; 1 warm-up + {runs} timed rounds, round robin, "
        f"medians. `of_ceiling` = predicted time from measured step costs / wall time.\n\n"
        + markdown_table(rows, columns)
        + "\n## Measured step costs (median ms)\n\n" + markdown_table(cost_rows)
        + f"\n## The original ({ORIGINAL['source']})\n\n" + markdown_table(original_rows)
        + "\nOriginal step costs (ms): " + ", ".join(f"{k} {v}" for k, v in ORIGINAL["step_ms"].items()) + "\n"
    )
    json_path, md_path = write_report("decode", results, markdown, args.out)
    results["report"] = {"json": str(json_path), "markdown": str(md_path)}
    print(markdown)
    return results
