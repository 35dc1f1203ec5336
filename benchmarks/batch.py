"""`vita-audio bench batch`: batch ASR / TTS throughput vs the LLM actor's batch size and vs the pool size.

Five measurements in one run, on the tiny set unless --models is given:
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
5. The OpenAI Batch API vs `vita-audio batch`: the same ASR set (audio by file:// URL under the app's
   batch_url_prefixes, the files the job's manifest names) and the same TTS set, once through `run_batch` and
   once through the endpoint (a Serve app on loopback, up for both sides) with the openai SDK: upload the
   JSONL, create, poll retrieve every --poll-s until completed, download the output (and the spoken answers'
   files). Wall time from submission to results in hand, same pool size, rounds alternating which goes first.
   The API's extra time is split into upload, create (validation + driver start request), driver start, the
   job, polling wait, finalize (the retrieve that writes the output files) and download. Target: API <= 1.1x.
Sections run in one Ray (--sections picks some); --quick is a small set for tests.
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

from actors.ray_runtime import close_local_ray
from benchmarks.report import int_list, markdown_table, write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = (Path(os.environ.get("VITA_AUDIO_SHARED", REPO.parent / "shared")) / "corpora" / "mini-speech"
                  / "LibriSpeech" / "dev-clean-mini")
CODES_PER_SECOND = 12.5
TEXTS = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
         "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
         "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
         "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage."]


SECTIONS = ("llm", "jobs", "store", "api")
# --quick: a small set (tests/test_benchmarks_run.py); each replaces its flag's default only
QUICK = {"copies": 1, "requests": 8, "repeats": 1, "llm_batch_sizes": "1,8", "pool_sizes": "1", "tts_texts": 4,
         "asr_tokens": 16, "tts_tokens": 48, "store_rounds": 1, "api_rounds": 1}
API_KEY = "bench-batch-key"
API_ROWS = 8  # rows per call of every stage pool in the Batch API comparison: the endpoint's (PoolConfig's default)
FINAL = ("completed", "failed", "cancelled", "expired")
API_PARTS = ("upload_s", "create_s", "driver_start_s", "job_s", "poll_wait_s", "finalize_s", "download_s")
API_COLUMNS = ["task", "pool", "round", "side", "wall_s", "inputs", "errors", *API_PARTS, "polls", "startup_s",
               "same_text"]


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
    parser.add_argument("--api-rounds", type=int, default=2,
                        help="rounds of the Batch API vs run_batch comparison (0: skip it)")
    parser.add_argument("--api-pool-sizes", default="1",
                        help="pool sizes (actors per stage / request runners) of the Batch API comparison")
    parser.add_argument("--poll-s", type=float, default=0.5, help="seconds between the SDK's batches.retrieve polls")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"which of {', '.join(SECTIONS)} to run")
    parser.add_argument("--quick", action="store_true", help="a small set (for tests): " +
                        ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " unless given")


def run(args: argparse.Namespace) -> dict:
    import torch

    from actors.config import PipelineConfig
    from actors.models import resolve_models_dir

    if args.quick:
        defaults = argparse.Namespace()
        add_arguments(parser := argparse.ArgumentParser(add_help=False), "batch")
        parser.parse_args([], defaults)
        for key, value in QUICK.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not sections or set(sections) - set(SECTIONS):
        raise ValueError(f"--sections must list some of {', '.join(SECTIONS)}, got {args.sections!r}")
    batch_sizes = int_list(args.llm_batch_sizes, "--llm-batch-sizes")
    pool_sizes = int_list(args.pool_sizes, "--pool-sizes")
    api_pools = int_list(args.api_pool_sizes, "--api-pool-sizes")
    if min(args.copies, args.requests, args.repeats, args.tts_texts, args.asr_tokens, args.tts_tokens) < 1:
        raise ValueError("--copies, --requests, --repeats, --tts-texts, --asr-tokens and --tts-tokens must be >= 1")
    if min(args.store_rounds, args.api_rounds) < 0 or not args.poll_s > 0:
        raise ValueError("--store-rounds and --api-rounds must be >= 0, --poll-s > 0")
    files = sorted(p.absolute() for p in Path(args.corpus).rglob("*") if p.suffix.lower() in (".flac", ".wav"))
    if not files:
        raise ValueError(f"--corpus {args.corpus!r} holds no .flac/.wav files")
    models = resolve_models_dir(args.models)
    stages = PipelineConfig.from_models_dir(models).with_resources(num_gpus=0)
    torch.set_num_threads(1)
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    results: dict = {"settings": {k: getattr(args, k) for k in (*QUICK, "api_pool_sizes", "poll_s", "quick")},
                     "sections": sections, "load_average_at_start": load_at_start, "source": _source()}
    out = Path(args.out)

    def save() -> None:  # after each section: a run stopped part-way keeps the sections it finished
        results["batch_api_overhead"] = _api_overhead(results.get("batch_api", []))
        results["targets"] = (_targets(results.get("llm_batch", []), results.get("jobs", []),
                                       results.get("in_process_asr"))
                              + _store_targets(results.get("object_store", []))
                              + _api_targets(results["batch_api_overhead"]))
        out.mkdir(parents=True, exist_ok=True)
        _plot(results, out / "batch.png")
        write_report("batch", results, _markdown(results, args), out)

    # the new comparisons first (Batch API, object store), then the job sweep and the in-process LLM stage
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp, _local_ray():
        if "api" in sections:
            results["batch_api"] = _api_sweep(models, files, api_pools, args, Path(tmp))
            save()
        if "store" in sections:
            results["object_store"] = _store_sweep(models, files, args, Path(tmp))
            save()
        if "jobs" in sections:
            results["jobs"] = _job_sweep(models, files, pool_sizes, args, Path(tmp))
    if "jobs" in sections:
        results["in_process_asr"] = _in_process(models, files * args.copies, args.asr_tokens)
        save()
    if "llm" in sections:
        results["llm_batch"] = _llm_sweep(stages, files, batch_sizes, args)
    save()
    return results


def _markdown(results: dict, args) -> str:
    md = (f"Load average when the run started: {results['load_average_at_start']} (1, 5, 15 min). Source: "
          f"{results['source']}. Settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items()) + "\n\n")
    if "llm_batch" in results:
        md += "## LLM stage vs engine batch size\n\n" + markdown_table(results["llm_batch"]) + "\n"
    if "jobs" in results:
        base = results["in_process_asr"]
        md += ("## Ray Data job vs actors per stage\n\n" + markdown_table(results["jobs"]) +
               f"\nIn-process pipeline, ASR one file at a time: RTFx {base['rtfx']:.3g} "
               f"({base['files']} files, {base['wall_s']:.3g} s)\n\n")
    if "object_store" in results:
        md += ("## Object store vs local disk (ASR job, 1 actor per stage; S3-compatible server on loopback)\n\n" +
               (markdown_table(results["object_store"]) if results["object_store"]
                else "skipped (--store-rounds 0, or moto not installed)\n") + "\n")
    if "batch_api" in results:
        md += (f"## Batch API (openai SDK, polls every {args.poll_s:g} s) vs run_batch, same input and pool size\n\n"
               "Wall time from submission to results in hand. `job`: run_batch's call (its results on local "
               "disk). `api`: files.create -> batches.create -> batches.retrieve until completed -> "
               "files.content of the output (and of each spoken answer's file); its parts: `upload_s`, "
               "`create_s` (the endpoint validates every line and asks for the driver actor), `driver_start_s` "
               "(until the driver opened the run folder), `job_s` (the Ray Data job in the driver, to its end "
               "record), `poll_wait_s` (the job's end to the retrieve that saw it), `finalize_s` (that retrieve: "
               "the output/error JSONL and the audio files written), `download_s`. `same_text`: ASR lines whose "
               "text equals the job's for the same id.\n\n" +
               (markdown_table(results["batch_api"], API_COLUMNS) if results["batch_api"]
                else "skipped (--api-rounds 0)\n") +
               "\nMedians over the rounds:\n\n" + markdown_table(results["batch_api_overhead"]) + "\n")
    return md + "## Targets\n\n" + markdown_table(results["targets"]) + "\n![throughput](batch.png)\n"


def _source() -> str:
    """The commit measured, and the files changed beside it (git status), or 'unknown' outside a checkout."""
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in changed if line.strip()]
    return f"commit {commit}" + (f" with {', '.join(changed)} changed" if changed else "")


class _local_ray:
    """A local Ray for the job sections (loopback, token auth, all cores, a small object store), unless one runs."""

    def __enter__(self):
        import ray

        self.started = not ray.is_initialized()
        if self.started:
            close_local_ray()
            self.temp = tempfile.mkdtemp(prefix="vb", dir="/tmp")  # short: Ray's socket paths must fit
            for attempt in (1, 2, 3, 4):  # Ray gives its raylet a fixed 30 s to register: short under a heavy load
                try:
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 * 2**20,
                             log_to_driver=False, _temp_dir=self.temp,
                             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
                    break
                except Exception as err:
                    ray.shutdown()
                    if attempt == 4 or "timed out during startup" not in str(err):
                        shutil.rmtree(self.temp, ignore_errors=True)
                        raise
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.started:
            ray.shutdown()
            shutil.rmtree(self.temp, ignore_errors=True)


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


def _manifests(files, args, tmp: Path) -> tuple[Path, Path]:
    """The ASR manifest (the corpus --copies times, ids c<k>-<stem>) and the TTS texts, as JSONL."""
    manifest = tmp / "asr.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{k}-{f.stem}", "path": str(f)}) + "\n"
                                for k in range(args.copies) for f in files))
    texts = tmp / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"t{i}", "text": TEXTS[i % len(TEXTS)]}) + "\n"
                             for i in range(args.tts_texts)))
    return manifest, texts


def _run_job(models, task: str, source: str, out: str, pool: int, tokens: int,
             rows_per_call: int | None = None) -> tuple[dict, float]:
    """run_batch with `pool` actors per stage (by default small calls, 8 rows to the LLM and 4 to the others, so
    rows stream from stage to stage and every actor of a pool gets work); the summary and the call's wall time."""
    from jobs.batch.callables import DecodeOptions
    from jobs.batch.job import BatchConfig, run_batch
    from jobs.pools import PoolConfig

    cpus = max(0.1, round(os.cpu_count() / (2 * pool), 2))
    pools = {s: PoolConfig(size=pool, num_cpus=cpus, batch_size=rows_per_call or (8 if s == "llm" else 4))
             for s in ("encoder", "llm", "decoder")}
    start = time.perf_counter()
    summary = run_batch(BatchConfig(task=task, input=str(source), out=str(out), models=str(models),
                                    decode=DecodeOptions(max_new_tokens=tokens), progress=False, block_size=16, **pools))
    return summary, time.perf_counter() - start


def _job_sweep(models, files, pool_sizes, args, tmp: Path) -> list[dict]:
    manifest, texts = _manifests(files, args, tmp)
    rows = []
    for pool in pool_sizes:
        for task, source, tokens in (("asr", manifest, args.asr_tokens), ("tts", texts, args.tts_tokens)):
            out = tmp / f"{task}-{pool}"
            summary, wall = _run_job(models, task, str(source), str(out), pool, tokens)
            run = summary["this_run"]
            rows.append({"task": task, "actors_per_stage": pool, "inputs": summary["rows"],
                         "errors": summary["errors"], "audio_s": summary["audio_hours"] * 3600,
                         "wall_s": wall, "rtfx": summary["audio_hours"] * 3600 / wall,
                         "startup_s": run.get("startup_s"), "rtfx_after_startup": run.get("steady_audio_s_per_s")})
            shutil.rmtree(out, ignore_errors=True)
    return rows


def _store_sweep(models, files, args, tmp: Path) -> list[dict]:
    """The ASR job over a Parquet dataset and tar shards of the corpus (--copies times), local vs on a moto S3
    server on loopback; rounds alternate which goes first."""
    import importlib.util

    if args.store_rounds < 1 or importlib.util.find_spec("moto") is None:
        return []
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
        for round_ in range(args.store_rounds):
            for fmt, path in local.items():
                order = ("local", "s3") if round_ % 2 == 0 else ("s3", "local")
                for where in order:
                    source = str(path) if where == "local" else remote[fmt]
                    out = str(tmp / f"store-{fmt}-{round_}") if where == "local" else \
                        f"s3://{bucket}/runs/{fmt}-{round_}"
                    summary, wall = _run_job(models, "asr", source, out, 1, args.asr_tokens)
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


def _api_sweep(models, files, pool_sizes, args, tmp: Path) -> list[dict]:
    """The same ASR and TTS sets through run_batch and through the endpoint's Batch API (openai SDK), with the
    Serve app up for both; per pool size, rounds alternating which side goes first."""
    import openai
    from ray import serve

    from actors.ray_runtime import free_port
    from serve.app import build_app

    if args.api_rounds < 1:
        return []
    manifest, texts = _manifests(files, args, tmp)
    corpus = Path(args.corpus).absolute()
    asr_lines = [{"custom_id": f"c{k}-{f.stem}", "method": "POST", "url": "/v1/audio/transcriptions",
                  "body": {"model": "vita-audio", "file": {"url": f.as_uri()}, "max_new_tokens": args.asr_tokens}}
                 for k in range(args.copies) for f in files]
    tts_lines = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/audio/speech",
                  "body": {"model": "vita-audio", "input": TEXTS[i % len(TEXTS)], "response_format": "flac",
                           "max_new_tokens": args.tts_tokens}} for i in range(args.tts_texts)]
    sets = {"asr": (manifest, asr_lines, args.asr_tokens), "tts": (texts, tts_lines, args.tts_tokens)}
    warm = tmp / "warm.jsonl"
    warm.write_text("".join(manifest.read_text().splitlines(keepends=True)[:4]))
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=600)
    rows = []
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for pool in pool_sizes:
            app_args = _api_app_args(models, tmp, corpus, pool)
            serve.run(build_app(app_args), name="bench-batch", route_prefix="/")
            # a warm-up of each side, untimed (a fresh pool's first imports and loads come off the OS's cold caches)
            _run_job(models, "asr", str(warm), str(tmp / f"api-warm-{pool}"), pool, args.asr_tokens, API_ROWS)
            _api_run(client, asr_lines[:4], "/v1/audio/transcriptions", args.poll_s, Path(app_args["files"]))
            for round_ in range(args.api_rounds):
                for task, (source, lines, tokens) in sets.items():
                    for side in ("job", "api") if round_ % 2 == 0 else ("api", "job"):
                        if side == "job":
                            out = tmp / f"api-cmp-{task}-{pool}-{round_}"
                            summary, wall = _run_job(models, task, str(source), str(out), pool, tokens, API_ROWS)
                            row = {"wall_s": wall, "inputs": summary["rows"], "errors": summary["errors"],
                                   "startup_s": summary["this_run"].get("startup_s")}
                            texts_by_id = {r["id"]: r["text"] for r in _job_rows(out)}
                            shutil.rmtree(out, ignore_errors=True)
                        else:
                            row = _api_run(client, lines, "/v1/audio/transcriptions" if task == "asr" else
                                           "/v1/audio/speech", args.poll_s, Path(app_args["files"]))
                            api_texts = row.pop("texts")
                        rows.append({"task": task, "pool": pool, "round": round_, "side": side, **row})
                    if task == "asr":  # both sides of the round ran: the same text for the same id?
                        differ = [(i, t, api_texts.get(i)) for i, t in texts_by_id.items() if api_texts.get(i) != t]
                        rows[-1 if side == "api" else -2].update(
                            same_text=1 - len(differ) / max(1, len(texts_by_id)), text_differs=differ[:3])
    finally:
        serve.shutdown()
    return rows


def _api_app_args(models, tmp: Path, corpus: Path, pool: int) -> dict:
    """The Serve app's args: a key, its own state and files folders, the corpus as a URL prefix batch lines
    may read, result blocks of 16 lines (as run_batch's here) and a pool of `pool`."""
    from serve.app import Args

    args = {"models": str(models), "api_key": API_KEY, "state": str(tmp / "api-state"), "files": str(tmp / "api-files"),
            "batch_url_prefixes": [corpus.as_uri() + "/"], "batch_block_size": 16, "max_tokens": 4096}
    if "batch_runners" in Args.model_fields:
        args["batch_runners"] = pool
    return args


def _job_rows(out: Path) -> list[dict]:
    from jobs.batch.job import read_results

    return read_results(out).select(["id", "text"]).to_pylist()


def _api_run(client, lines: list[dict], endpoint: str, poll_s: float, files_root: Path) -> dict:
    """One batch through the SDK, timed in parts (the driver's own times from its run folder, where there)."""
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    t0, w0 = time.perf_counter(), time.time()
    source = client.files.create(file=("requests.jsonl", data), purpose="batch")
    t_upload = time.perf_counter()
    batch = client.batches.create(input_file_id=source.id, endpoint=endpoint, completion_window="24h")
    t_created, polls = time.perf_counter(), 0
    while True:
        asked, asked_wall = time.perf_counter(), time.time()
        batch = client.batches.retrieve(batch.id)
        polls += 1
        if batch.status in FINAL:
            break
        time.sleep(poll_s)
    t_done = time.perf_counter()
    if batch.status != "completed":
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.errors}")
    output = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines() if x.strip()]
    errors = [] if batch.error_file_id is None else \
        [x for x in client.files.content(batch.error_file_id).text.splitlines() if x.strip()]
    bodies = [line["response"]["body"] for line in output]
    audio = [b["audio"]["file_id"] for b in bodies if isinstance(b, dict) and isinstance(b.get("audio"), dict)]
    for file_id in audio:  # the spoken answers, in hand as the job's FLAC files are
        client.files.content(file_id).read()
    end = time.perf_counter()
    marks = _driver_marks(files_root, batch.id)  # wall-clock times the driver left in its run folder
    created_wall = w0 + (t_created - t0)
    ended = marks.get("ended")
    return {"wall_s": end - t0, "inputs": len(output) + len(errors), "errors": len(errors),
            "upload_s": t_upload - t0, "create_s": t_created - t_upload,
            "driver_start_s": marks["opened"] - created_wall if "opened" in marks else None,
            "job_s": ended - marks.get("opened", created_wall) if ended else None,
            "poll_wait_s": asked_wall - ended if ended else None, "finalize_s": t_done - asked,
            "download_s": end - t_done, "polls": polls,
            "texts": {line["custom_id"]: b.get("text") for line, b in zip(output, bodies) if isinstance(b, dict)}}


def _driver_marks(files_root: Path, batch_id: str) -> dict:
    """When the batch's driver opened its run folder (its lock file) and when the job ended (its end record)."""
    marks = {}
    for folder in files_root.rglob(batch_id):
        lock, end = folder / ".lock", folder / "driver.json"
        if lock.exists():
            marks["opened"] = lock.stat().st_mtime
        try:
            marks["ended"] = float(json.loads(end.read_text())["ended_at"])
        except (OSError, ValueError, KeyError):
            pass
    return marks


def _api_overhead(rows: list[dict]) -> list[dict]:
    """Per task and pool: the medians over rounds of each side's wall time and of the API's parts, and the
    median of the rounds' api / job ratios."""
    import statistics

    out = []
    for task, pool in sorted({(r["task"], r["pool"]) for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["pool"] == pool]
        api = [r for r in mine if r["side"] == "api"]
        job = [r for r in mine if r["side"] == "job"]
        ratios = [a["wall_s"] / j["wall_s"] for a in api for j in job if a["round"] == j["round"]]

        def median(key, side=api):
            values = [r[key] for r in side if r.get(key) is not None]
            return statistics.median(values) if values else None

        out.append({"task": task, "pool": pool, "job_wall_s": median("wall_s", job), "api_wall_s": median("wall_s"),
                    "api_over_job": statistics.median(ratios), "rounds": len(ratios),
                    **{k: median(k) for k in API_PARTS},
                    "job_startup_s": median("startup_s", job)})
    return out


def _api_targets(overhead: list[dict]) -> list[dict]:
    return [{"target": f"{r['task']}: Batch API (SDK, submission to results) <= 1.1x run_batch, pool {r['pool']}",
             "measured": r["api_over_job"], "met": r["api_over_job"] <= 1.1} for r in overhead]


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
    if one and baseline:
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

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (llm, jobs), (store, api) = axes
    for task in ("asr", "tts"):
        rows = [r for r in results.get("llm_batch", []) if r["task"] == task]
        if rows:
            llm.plot([r["llm_batch"] for r in rows], [r["audio_s_per_s"] for r in rows], marker="o", label=task)
        rows = [r for r in results.get("jobs", []) if r["task"] == task]
        if rows:
            jobs.plot([r["actors_per_stage"] for r in rows], [r["rtfx"] for r in rows], marker="o", label=f"{task} job")
    if "in_process_asr" in results:
        jobs.axhline(results["in_process_asr"]["rtfx"], color="gray", linestyle="--", label="asr in-process loop")
    llm.set(xscale="log" if results.get("llm_batch") else "linear", xlabel="LLM engine batch size", ylabel="audio s per wall s", title="LLM stage")
    jobs.set(xlabel="actors per stage", ylabel="RTFx (audio s per wall s)", title="Ray Data job")
    rows = results.get("object_store", [])
    for k, fmt in enumerate(sorted({r["format"] for r in rows})):
        for j, where in enumerate(("local", "s3")):
            values = [r["rtfx"] for r in rows if r["format"] == fmt and r["input"] == where]
            store.bar(k + 0.4 * j, sum(values) / len(values), width=0.4, color=f"C{j}", label=where if k == 0 else None)
            store.plot([k + 0.4 * j] * len(values), values, "k.")
    store.set(xticks=[k + 0.2 for k in range(len({r["format"] for r in rows}))],
              xticklabels=sorted({r["format"] for r in rows}), ylabel="RTFx (mean bar, rounds as dots)",
              title="ASR job: object store on loopback vs local disk")
    for k, r in enumerate(results.get("batch_api_overhead", [])):
        api.bar(k - 0.2, r["job_wall_s"], width=0.4, color="gray", label="run_batch" if k == 0 else None)
        bottom = 0.0
        for j, part in enumerate(API_PARTS):
            api.bar(k + 0.2, r[part] or 0.0, width=0.4, bottom=bottom, color=f"C{j}",
                    label=part[:-2] if k == 0 else None)
            bottom += r[part] or 0.0
    api.set(xticks=range(len(results.get("batch_api_overhead", []))),
            xticklabels=[f"{r['task']} pool {r['pool']}" for r in results.get("batch_api_overhead", [])],
            ylabel="seconds, submission to results (medians)", title="Batch API (SDK) vs run_batch")
    for ax in (llm, jobs, store, api):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
