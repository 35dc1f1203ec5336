"""`vita-audio bench train`: what Ray Train + DeepSpeed cost over a plain PyTorch loop, and what a 2nd worker buys.

Three measurements in one run, on the tiny set's LLM and mini-speech shards made by `vita-audio prepare` (or
--data SHARDS_DIR):
1. A plain single-process loop (no Ray, no DeepSpeed): the stage-1 model, AdamW groups, warm-up + cosine,
   the same packed rows and the same loss normalisation (spec §6.4) as a worker, timed per optimizer step.
2. The same stage under `jobs.train.run` with 1 worker (Ray Train + DeepSpeed ZeRO-2, gloo), per-step wall times
   from the timestamps of its metrics file (the loop's work and its Ray reports; start-up reported separately).
   Target: overhead <= 15 %.
3. All four stages with 2 workers: tokens/s (both workers' tokens) vs 1 worker, and the loss curves per stage.
Writes train.json, train.md and train.png. On a shared machine the numbers move with the neighbours' load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import markdown_table, write_report
from actors.ray_runtime import close_local_ray

REPO = Path(__file__).resolve().parents[2]
MINI = Path(os.environ.get("VITA_AUDIO_SHARED", REPO.parent / "shared")) / "corpora" / "mini-speech" / "LibriSpeech"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--data", type=Path, default=None, help="SHARDS_DIR (default: mini-speech prepared into --out)")
    parser.add_argument("--models", type=Path, default=None, help="folder with llm/ and encoder/ (default: tiny)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per stage")
    parser.add_argument("--max-length", type=int, default=512, help="packed row length")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for shards and runs (default: a "
                                                                "temporary folder, removed after)")


def run(args: argparse.Namespace) -> dict:
    import ray

    from actors.models import resolve_models_dir

    if args.steps < 3 or args.max_length < 16 or args.grad_accum < 1:
        raise ValueError("--steps must be >= 3, --max-length >= 16, --grad-accum >= 1")
    models = resolve_models_dir(args.models)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-train-"))
    started = not ray.is_initialized()
    if started:
        close_local_ray()  # loopback only, Ray's token auth on
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        data = args.data or prepare_mini_speech(models, work / "prepared")
        overrides = [f"max_steps={args.steps}", f"save_every={args.steps}", f"max_length={args.max_length}",
                     f"grad_accum={args.grad_accum}", "warmup_ratio=0.1"]
        plain = plain_loop(models / "llm", data, overrides)
        one = ray_run(models / "llm", data, work / "w1", overrides, workers=1, stages="1")
        two = ray_run(models / "llm", data, work / "w2", overrides, workers=2, stages="1-4")
    finally:
        if started:
            ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        {"setup": "plain PyTorch loop, 1 process", **_rate(plain["step_s"], plain["tokens_per_step"])},
        {"setup": "Ray Train + DeepSpeed, 1 worker", **_rate(one["step_s"][1], one["tokens_per_step"][1]),
         "start-up s": one["startup_s"]},
        {"setup": "Ray Train + DeepSpeed, 2 workers", **_rate(two["step_s"][1], two["tokens_per_step"][1]),
         "start-up s": two["startup_s"]},
    ]
    overhead = 1 - rows[1]["tokens/s"] / rows[0]["tokens/s"]
    scaling = rows[2]["tokens/s"] / rows[1]["tokens/s"]
    load = os.getloadavg()
    results = {"rows": rows, "overhead_1_worker": overhead, "scaling_2_vs_1": scaling,
               "loss_curves": two["curves"], "plain_losses": plain["losses"], "stage1_losses_1_worker": one["curves"]["1"],
               "load_average": load, "config": {k: str(v) for k, v in vars(args).items() if not k.startswith("_")} | {"data": str(data),
                                                             "models": str(models)}}
    _plot(results, out / "train.png")
    md = ("Stage 1 of the tiny recipe (ZeRO-2, fp32 on CPU, gloo), the same packed rows for every setup; "
          "steady-state rate = median over the optimizer steps after the first; start-up = the stage's wall time "
          "less its steps (Ray Train worker group, DeepSpeed init, model load, checkpoint, HF folder).\n\n"
          + markdown_table(rows, ["setup", "step s", "tokens/s", "start-up s"]) +
          f"\nRay Train + DeepSpeed overhead with 1 worker: **{overhead:+.1%}** (target <= 15 %). "
          f"2 workers vs 1: **{scaling:.2f}x** tokens/s. Load average during the run: "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores (other engineers' jobs), so "
          "the ratios are noisy.\n\n![loss curves per stage](train.png)\n")
    write_report("train", results, md, out)
    return results


def prepare_mini_speech(models: Path, out: Path) -> Path:
    """The mini-speech ASR samples as training shards, through the corpus-preparation job (resumes if done)."""
    from jobs.pools import PoolConfig
    from jobs.prepare.job import PrepareConfig, run_prepare

    run_prepare(PrepareConfig(sources=[f"librispeech:{MINI}"], out=str(out), tasks=("asr",), models=str(models),
                              progress=False, encoder=PoolConfig(size=1, batch_size=8), block_size=16))
    return out / "shards"


def plain_loop(init: Path, data: Path, overrides: list[str]) -> dict:
    """Stage 1 as a plain loop in this process: one torch thread, like a 1-CPU Ray worker."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from jobs.train.packing import main_token_count, pack
    from jobs.train.run import load_recipe
    from jobs.train.stage_rules import param_groups, warmup_cosine
    from jobs.train.train_func import build_model

    cfg = load_recipe("tiny", overrides)[1].as_dict() | {"init_dir": str(init)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg)
        opt = torch.optim.AdamW(param_groups(model, cfg["lr"], cfg["weight_decay"], cfg["mtp_lr_mult"]),
                                lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, cfg["max_steps"], cfg["warmup_ratio"], cfg["min_lr_ratio"]))
        samples = sorted(pq.read_table(data, columns=["id", "input_ids", "labels"]).to_pylist(), key=lambda s: s["id"])
        packed = pack(samples, cfg["max_length"], AutoTokenizer.from_pretrained(init).pad_token_id)
        rows = list(zip(packed.input_ids, packed.position_ids, packed.labels))
        gas, times, losses = cfg["grad_accum"], [], []
        for step in range(cfg["max_steps"]):
            window = [rows[(step * gas + i) % len(rows)] for i in range(gas)]
            n_items = max(1, sum(main_token_count(r[2][None]) for r in window))
            t0, loss = time.perf_counter(), 0.0
            for ids, pos, labels in window:
                out = model(input_ids=torch.from_numpy(ids[None]), position_ids=torch.from_numpy(pos[None]),
                            labels=torch.from_numpy(labels[None]), num_items_in_batch=n_items)
                out.loss.backward()
                loss += out.loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
    finally:
        torch.set_num_threads(threads)
    return {"step_s": times, "losses": losses, "tokens_per_step": gas * cfg["max_length"]}


def ray_run(init: Path, data: Path, run_dir: Path, overrides: list[str], workers: int, stages: str) -> dict:
    """A fresh `jobs.train.run` on `run_dir`; per-stage step times, losses and start-up time."""
    from jobs.train import run as train_run

    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    train_run.run("tiny", str(data), str(init), str(run_dir), stages=stages, workers=workers, overrides=overrides)
    wall = time.perf_counter() - t0
    step_s, tokens, curves = {}, {}, {}
    for path in sorted(run_dir.glob("stage*.metrics.jsonl")):
        n = int(path.name[5])
        metrics = [json.loads(line) for line in path.read_text().splitlines()]
        tokens[n] = metrics[0]["tokens"]
        # wall between consecutive steps (the loop's own work plus its Ray reports); the first from its own clock
        step_s[n] = [metrics[0]["step_s"]] + [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:])]
        curves[str(n)] = {"step": [m["step"] for m in metrics], "loss": [m["loss"] for m in metrics],
                          "backbone_loss": [m["backbone_loss"] for m in metrics],
                          "mtp_losses": [m["mtp_losses"] for m in metrics]}
    manifest = json.loads((run_dir / "run.json").read_text())
    stage1 = manifest["stages"]["1"]
    train_s = sum(step_s[1])
    return {"step_s": step_s, "tokens_per_step": tokens, "curves": curves, "wall_s": wall,
            "startup_s": (stage1["finished"] - stage1["started"]) - train_s}


def _rate(step_s: list[float], tokens_per_step: int) -> dict:
    steady = statistics.median(step_s[1:])
    return {"step s": steady, "tokens/s": tokens_per_step / steady}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["loss_curves"]
    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(4 * (len(curves) + 1), 3.6))
    for ax, (n, c) in zip(axes, sorted(curves.items())):
        ax.plot(c["step"], c["loss"], "o-", label="total")
        ax.plot(c["step"], c["backbone_loss"], "s--", label="backbone")
        if c["mtp_losses"] and c["mtp_losses"][0]:
            ax.plot(c["step"], [sum(m) / len(m) for m in c["mtp_losses"]], "^:", label="MCTP (mean over modules)")
        ax.set_title(f"stage {n} (2 workers)")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("loss")
    ax = axes[-1]
    names = [r["setup"].replace("Ray Train + DeepSpeed", "Ray+DS").replace("plain PyTorch loop", "plain") for r in results["rows"]]
    ax.bar(range(len(names)), [r["tokens/s"] for r in results["rows"]], color=["#888", "#3a7", "#37a"])
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=7)
    ax.set_title("stage 1 tokens/s (steady state)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
