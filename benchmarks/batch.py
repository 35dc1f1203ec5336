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
4. Object storage: the ASR job (1 actor per stage) on the same inputs as a Parquet audio dataset and as
   WebDataset tar shards, each read from local disk and from an S3-compatible server on loopback (moto,
   started here; results written to the store too), rounds alternating local / store. Target: the store's
   RTFx >= 0.9x local disk's, per format (the median of the rounds' ratios).
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

REPO = Path(__file__).resolve().parents[1]
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
    parser.add_argument("--store-rounds", type=int, default=2,
                        help="rounds of the local-disk vs object-store comparison (0: skip it)")
    parser.add_argument("--only-store", action="store_true",
                        help="only the local-disk vs object-store comparison (report: batch-object-store.*)")


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
    if args.only_store:
        return _store_only(models, files, args)

    llm_rows = _llm_sweep(stages, files, batch_sizes, args)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        job_rows, baseline, store_rows = _job_sweep(models, files, pool_sizes, args, Path(tmp))
    results = {"llm_batch": llm_rows, "jobs": job_rows, "in_process_asr": baseline, "object_store": store_rows,
               "targets": _targets(llm_rows, job_rows, baseline) + _store_targets(store_rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "batch.png")
    md = ("## LLM stage vs engine batch size\n\n" + markdown_table(llm_rows) +
          "\n## Ray Data job vs actors per stage\n\n" + markdown_table(job_rows) +
          f"\nIn-process pipeline, ASR one file at a time: RTFx {baseline['rtfx']:.3g} "
          f"({baseline['files']} files, {baseline['wall_s']:.3g} s)\n\n"
          "## Object store vs local disk (ASR job, 1 actor per stage; S3-compatible server on loopback)\n\n" +
          (markdown_table(store_rows) if store_rows else "skipped (--store-rounds 0, or moto not installed)\n") +
          "\n## Targets\n\n" +
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


def _store_only(models, files, args) -> dict:
    """Section 4 alone, on its own Ray, to batch-object-store.json / .md."""
    import ray

    started = not ray.is_initialized()
    if started:
        close_local_ray()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 * 2**20,
                 log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="vb", dir="/tmp"),
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
            rows = _store_sweep(models, files, args, Path(tmp))
    finally:
        if started:
            ray.shutdown()
    results = {"object_store": rows, "targets": _store_targets(rows),
               "settings": {"copies": args.copies, "rounds": args.store_rounds, "asr_tokens": args.asr_tokens}}
    md = ("## Object store vs local disk (ASR job, 1 actor per stage; S3-compatible server on loopback)\n\n"
          + markdown_table(rows) + "\n## Targets\n\n" + markdown_table(results["targets"]))
    write_report("batch-object-store", results, md, Path(args.out))
    return results


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
        store_rows = _store_sweep(models, files, args, tmp)
    finally:
        if started:
            ray.shutdown()
    return rows, _in_process(models, files * args.copies, args.asr_tokens), store_rows


def _store_sweep(models, files, args, tmp: Path) -> list[dict]:
    """The ASR job over a Parquet dataset and tar shards of the corpus (--copies times), local vs on a moto S3
    server on loopback; rounds alternate which goes first."""
    import importlib.util

    if args.store_rounds < 1 or importlib.util.find_spec("moto") is None:
        return []
    from jobs.batch.callables import DecodeOptions
    from jobs.batch.job import BatchConfig, run_batch
    from jobs.pools import PoolConfig
    from jobs.storage import location

    items = [(f"c{k}-{f.stem}", f.read_bytes()) for k in range(args.copies) for f in files]
    local = {"parquet": tmp / "ds", "tar": tmp / "shards"}
    _write_archives(items, local["parquet"], local["tar"])
    rows = []
    with _moto_server() as bucket:
        remote = {fmt: f"s3://{bucket}/{path.name}" for fmt, path in local.items()}
        for fmt, path in local.items():
            for file in sorted(path.iterdir()):
                (location(remote[fmt]) / file.name).write_bytes(file.read_bytes())
        cpus = max(0.1, round(os.cpu_count() / 2, 2))
        pools = {s: PoolConfig(size=1, num_cpus=cpus, batch_size=8 if s == "llm" else 4) for s in ("encoder", "llm")}
        for round_ in range(args.store_rounds):
            for fmt in local:
                order = ("local", "s3") if round_ % 2 == 0 else ("s3", "local")
                for where in order:
                    source = str(local[fmt]) if where == "local" else remote[fmt]
                    out = str(tmp / f"store-{fmt}-{round_}") if where == "local" else \
                        f"s3://{bucket}/runs/{fmt}-{round_}"
                    start = time.perf_counter()
                    summary = run_batch(BatchConfig(task="asr", input=source, out=out, models=str(models),
                                                    decode=DecodeOptions(max_new_tokens=args.asr_tokens),
                                                    progress=False, block_size=16, **pools))
                    wall = time.perf_counter() - start
                    audio = summary["audio_hours"] * 3600
                    rows.append({"format": fmt, "input": where, "round": round_, "inputs": summary["rows"],
                                 "errors": summary["errors"], "audio_s": audio, "wall_s": wall, "rtfx": audio / wall,
                                 "rtfx_after_startup": summary["this_run"].get("steady_audio_s_per_s")})
    return rows


def _write_archives(items: list[tuple[str, bytes]], parquet_dir: Path, tar_dir: Path) -> None:
    """The items as a Hugging Face-layout Parquet dataset (`id`, `audio` {bytes, path}; 4 files) and as 4
    WebDataset tar shards."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_dir.mkdir()
    tar_dir.mkdir()
    schema = pa.schema([("id", pa.string()), ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    per = -(-len(items) // 4)
    for k in range(4):
        part = items[k * per:(k + 1) * per]
        pq.write_table(pa.Table.from_pylist([{"id": i, "audio": {"bytes": b, "path": f"{i}.flac"}} for i, b in part],
                                            schema=schema), parquet_dir / f"train-{k:05d}-of-00004.parquet",
                       row_group_size=16)
        with tarfile.open(tar_dir / f"train-{k:03d}.tar", "w") as tar:
            for i, data in part:
                info = tarfile.TarInfo(f"{i}.flac")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _moto_server:
    """A moto S3 server on a free loopback port for the bench (a subprocess, stopped on exit), the AWS
    variables pointing at it meanwhile; enters as the bucket's name."""

    def __enter__(self) -> str:
        import socket
        import subprocess
        import sys

        import pyarrow.fs as pafs

        from jobs.storage import reset_filesystems

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        reset_filesystems()
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("the moto S3 server did not start")
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="bench",
                          secret_key="bench", region="us-east-1", allow_bucket_creation=True).create_dir("bench")
        return "bench"

    def __exit__(self, *exc) -> None:
        from jobs.storage import reset_filesystems

        self.server.terminate()
        self.server.wait(timeout=30)
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_filesystems()


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


def _store_targets(rows: list[dict]) -> list[dict]:
    """Per format: the median over rounds of the store's RTFx / local disk's."""
    import statistics

    out = []
    for fmt in sorted({r["format"] for r in rows}):
        ratios = []
        for round_ in sorted({r["round"] for r in rows}):
            by = {r["input"]: r for r in rows if r["format"] == fmt and r["round"] == round_}
            ratios.append(by["s3"]["rtfx"] / by["local"]["rtfx"])
        ratio = statistics.median(ratios)
        out.append({"target": f"asr job, {fmt} input on the object store >= 0.9x local disk (RTFx, end to end)",
                    "measured": ratio, "met": ratio >= 0.9})
    return out


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
