"""`vita-audio bench batch`: batch ASR / TTS throughput vs the LLM actor's batch size and vs the pool size.

Three measurements in one run, on the tiny set unless --models is given:
1. The LLM stage alone (`jobs.batch.callables.SpeechLLM`, in this process): the same requests with the engine
   taking 1, 2, 4, 8 ... of them per step (best of --repeats runs). ASR: audio seconds transcribed per wall second (the requests'
   codes are encoded once before timing); TTS: seconds of audio codes generated per wall second (12.5 codes
   per second). Target: 8 per step >= 2.5x one at a time.
2. The Ray Data job (`run_batch`) with 1, 2 ... actors per stage, end to end (actor start-up and model
   loads included, Ray itself already up): RTFx = audio seconds per wall second.
3. The in-process pipeline (`actors.local.LocalPipeline`) looping over the same ASR files one at a time,
   its model loads timed too: the job with one actor per stage should reach >= 0.9x its RTFx.
Writes batch.json, batch.md and batch.png. On a shared machine the numbers move with the neighbours' load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.report import int_list, markdown_table, write_report
from actors.ray_runtime import close_local_ray

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = (Path(os.environ.get("VITA_AUDIO_SHARED", REPO.parent / "shared")) / "corpora" / "mini-speech"
                  / "LibriSpeech" / "dev-clean-mini")
CODES_PER_SECOND = 12.5
TEXTS = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
         "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
         "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
         "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage."]


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--models", type=Path, default=None, help="folder with llm/, encoder/, decoder/ (default: tiny)")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="folder of audio files for ASR")
    parser.add_argument("--copies", type=int, default=12, help="ASR job inputs: the corpus this many times")
    parser.add_argument("--llm-batch-sizes", default="1,2,4,8,16", help="engine batch sizes for the LLM stage")
    parser.add_argument("--requests", type=int, default=32, help="requests per LLM stage measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per LLM stage measurement (best kept)")
    parser.add_argument("--pool-sizes", default="1,2", help="actors per stage for the Ray Data job")
    parser.add_argument("--tts-texts", type=int, default=8, help="TTS job inputs")
    parser.add_argument("--asr-tokens", type=int, default=32, help="max new tokens per ASR request")
    parser.add_argument("--tts-tokens", type=int, default=96, help="max new tokens per TTS request")


def run(args: argparse.Namespace) -> dict:
    import torch

    from actors.config import PipelineConfig
    from actors.models import resolve_models_dir

    batch_sizes = int_list(args.llm_batch_sizes, "--llm-batch-sizes")
    pool_sizes = int_list(args.pool_sizes, "--pool-sizes")
    if min(args.copies, args.requests, args.repeats, args.tts_texts, args.asr_tokens, args.tts_tokens) < 1:
        raise ValueError("--copies, --requests, --repeats, --tts-texts, --asr-tokens and --tts-tokens must be >= 1")
    files = sorted(p for p in Path(args.corpus).rglob("*") if p.suffix.lower() in (".flac", ".wav"))
    if not files:
        raise ValueError(f"--corpus {args.corpus!r} holds no .flac/.wav files")
    models = resolve_models_dir(args.models)
    stages = PipelineConfig.from_models_dir(models).with_resources(num_gpus=0)
    torch.set_num_threads(1)

    llm_rows = _llm_sweep(stages, files, batch_sizes, args)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        job_rows, baseline = _job_sweep(models, files, pool_sizes, args, Path(tmp))
    results = {"llm_batch": llm_rows, "jobs": job_rows, "in_process_asr": baseline,
               "targets": _targets(llm_rows, job_rows, baseline)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "batch.png")
    md = ("## LLM stage vs engine batch size\n\n" + markdown_table(llm_rows) +
          "\n## Ray Data job vs actors per stage\n\n" + markdown_table(job_rows) +
          f"\nIn-process pipeline, ASR one file at a time: RTFx {baseline['rtfx']:.3g} "
          f"({baseline['files']} files, {baseline['wall_s']:.3g} s)\n\n## Targets\n\n" +
          markdown_table(results["targets"]) + "\n![throughput](batch.png)\n")
    write_report("batch", results, md, out)
    return results


def _llm_sweep(stages, files, batch_sizes, args) -> list[dict]:
    """The SpeechLLM callable on the same requests at each engine batch size (ASR and TTS)."""
    import dataclasses

    from jobs.batch.callables import DecodeOptions, SpeechEncoder, SpeechLLM

    chosen = (files * (args.requests // len(files) + 1))[: args.requests]
    encoded = SpeechEncoder(stages.encoder)([{"id": f"{i}", "path": str(f)} for i, f in enumerate(chosen)])
    asr_seconds = sum(encoded.column("audio_seconds").to_pylist())
    texts = [{"id": f"{i}", "text": TEXTS[i % len(TEXTS)]} for i in range(args.requests)]
    rows = []
    for size in batch_sizes:
        config = dataclasses.replace(stages.llm, max_batch_size=size)
        for task, batch, tokens in (("asr", encoded, args.asr_tokens), ("tts", texts, args.tts_tokens)):
            llm = SpeechLLM(config, task, DecodeOptions(max_new_tokens=tokens))
            llm(batch[:2] if isinstance(batch, list) else batch.slice(0, 2))  # warm-up
            wall = float("inf")
            for _ in range(args.repeats):  # the best of a few: neighbours on a shared machine add noise
                start = time.perf_counter()
                out = llm(batch)
                wall = min(wall, time.perf_counter() - start)
            seconds = asr_seconds if task == "asr" else \
                sum(len(c) for chunks in out.column("chunks").to_pylist() for c in chunks or []) / CODES_PER_SECOND
            rows.append({"task": task, "llm_batch": size, "requests": args.requests, "wall_s": wall,
                         "audio_s_per_s": seconds / wall, "largest_step_batch": llm.stage.largest_batch})
            llm.bridge.stop()
    for row in rows:
        one = next(r for r in rows if r["task"] == row["task"] and r["llm_batch"] == min(batch_sizes))
        row["speedup_vs_smallest"] = row["audio_s_per_s"] / one["audio_s_per_s"]
    return rows


def _job_sweep(models, files, pool_sizes, args, tmp: Path) -> tuple[list[dict], dict]:
    import ray

    from jobs.batch.job import BatchConfig, run_batch
    from jobs.pools import PoolConfig
    from jobs.batch.callables import DecodeOptions

    manifest = tmp / "asr.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{k}-{f.stem}", "path": str(f)}) + "\n"
                                for k in range(args.copies) for f in files))
    texts = tmp / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"t{i}", "text": TEXTS[i % len(TEXTS)]}) + "\n"
                             for i in range(args.tts_texts)))
    started = not ray.is_initialized()
    if started:
        close_local_ray()  # loopback only, Ray's token auth on
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 * 2**20,
                 log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="vb", dir="/tmp"),
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    rows = []
    try:
        for pool in pool_sizes:
            for task, source, tokens in (("asr", manifest, args.asr_tokens), ("tts", texts, args.tts_tokens)):
                out = tmp / f"{task}-{pool}"
                cpus = max(0.1, round(os.cpu_count() / (2 * pool), 2))
                # small calls, so rows stream from stage to stage and every actor of a pool gets work
                pools = {s: PoolConfig(size=pool, num_cpus=cpus, batch_size=8 if s == "llm" else 4)
                         for s in ("encoder", "llm", "decoder")}
                start = time.perf_counter()
                summary = run_batch(BatchConfig(task=task, input=str(source), out=str(out), models=str(models),
                                                decode=DecodeOptions(max_new_tokens=tokens), progress=False,
                                                block_size=16, **pools))
                wall = time.perf_counter() - start
                run = summary["this_run"]
                rows.append({"task": task, "actors_per_stage": pool, "inputs": summary["rows"],
                             "errors": summary["errors"], "audio_s": summary["audio_hours"] * 3600,
                             "wall_s": wall, "rtfx": summary["audio_hours"] * 3600 / wall,
                             "startup_s": run.get("startup_s"), "rtfx_after_startup": run.get("steady_audio_s_per_s")})
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if started:
            ray.shutdown()
    return rows, _in_process(models, files * args.copies, args.asr_tokens)


def _in_process(models, files, tokens: int) -> dict:
    """LocalPipeline transcribing the files one after another; its model loads are timed, as the job's are."""
    from actors.config import PipelineConfig
    from actors.local import LocalPipeline
    from actors.results import collect
    from pipeline.audio import load_audio

    start = time.perf_counter()
    pipe = LocalPipeline(PipelineConfig.from_models_dir(models))
    loaded = time.perf_counter()
    seconds = 0.0
    for f in files:
        seconds += len(load_audio(str(f))) / 16000
        collect(pipe.asr(str(f), constraint="task", max_new_tokens=tokens))
    end = time.perf_counter()
    pipe.bridge.stop()
    return {"files": len(files), "audio_s": seconds, "wall_s": end - start, "rtfx": seconds / (end - start),
            "rtfx_after_load": seconds / (end - loaded)}


def _targets(llm_rows, job_rows, baseline) -> list[dict]:
    rows = []
    for task in ("asr", "tts"):
        by = {r["llm_batch"]: r for r in llm_rows if r["task"] == task}
        if 1 in by and 8 in by:
            ratio = by[8]["audio_s_per_s"] / by[1]["audio_s_per_s"]
            rows.append({"target": f"{task}: LLM batching 8 >= 2.5x one at a time", "measured": ratio,
                         "met": ratio >= 2.5})
    one = next((r for r in job_rows if r["task"] == "asr" and r["actors_per_stage"] == 1), None)
    if one:
        ratio = one["rtfx"] / baseline["rtfx"]
        rows.append({"target": "asr: Ray Data job, 1 actor/stage >= 0.9x in-process loop (end to end)",
                     "measured": ratio, "met": ratio >= 0.9})
        if one["rtfx_after_startup"]:
            ratio = one["rtfx_after_startup"] / baseline["rtfx_after_load"]
            rows.append({"target": "the same, after start-up (job: from its first rows; loop: after model loads)",
                         "measured": ratio, "met": ratio >= 0.9})
    return rows


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for task in ("asr", "tts"):
        rows = [r for r in results["llm_batch"] if r["task"] == task]
        left.plot([r["llm_batch"] for r in rows], [r["audio_s_per_s"] for r in rows], marker="o", label=task)
        rows = [r for r in results["jobs"] if r["task"] == task]
        right.plot([r["actors_per_stage"] for r in rows], [r["rtfx"] for r in rows], marker="o", label=f"{task} job")
    right.axhline(results["in_process_asr"]["rtfx"], color="gray", linestyle="--", label="asr in-process loop")
    left.set(xscale="log", xlabel="LLM engine batch size", ylabel="audio s per wall s", title="LLM stage")
    right.set(xlabel="actors per stage", ylabel="RTFx (audio s per wall s)", title="Ray Data job")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
