"""`vita-audio bench prepare`: corpus preparation throughput, 1 and 2 encoder actors vs a plain loop.

On the same files, in one run, with the bench-size speech encoder (pipeline.sizes.encoder_shape("bench")) and the
tiny set's tokenizer:
1. a plain single-process loop: for each utterance read + check (`jobs.prepare.checks.read_checked`), encode it
   alone, build its sample, write one Parquet file at the end; run as a fresh process (`python -m
   benchmarks.prepare`), timed from its start, as a user would run it: its imports and model load count, as the
   job's workers' do;
2. the Ray Data job (`run_prepare`) with 1 and with 2 encoder actors, end to end (actor start-up and model
   loads included, Ray itself already up), on a fresh output folder each.
Throughput = audio seconds per wall second; also after start-up (loop: after its model load; job: from its
first rows). Targets on a 2-core machine: 1 actor >= 0.9x the loop, 2 actors >= 1.5x 1 actor.
Writes prepare.json, prepare.md and prepare.png. On a shared machine the numbers move with the neighbours' load
(the load average is recorded).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.report import markdown_table, write_report
from actors.ray_runtime import close_local_ray

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = (Path(os.environ.get("VITA_AUDIO_SHARED", REPO.parent / "shared")) / "corpora" / "mini-speech"
                  / "LibriSpeech")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="a LibriSpeech-layout folder")
    parser.add_argument("--copies", type=int, default=30, help="the corpus this many times (as distinct speakers)")
    parser.add_argument("--actors", default="1,2", help="encoder actors of the job runs")
    parser.add_argument("--read-tasks", default="2,0",
                        help="read-and-check tasks of the job runs (0: the encoder actors read their own rows)")
    parser.add_argument("--encoder", default="bench", choices=["tiny", "bench"], help="speech encoder size")
    parser.add_argument("--rows", type=int, default=8, help="rows per encoder call in the job")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement (best kept)")


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch

    from pipeline.encoder.speech_encoder import tiny_encoder_config, write_random_encoder
    from pipeline.sizes import encoder_shape
    from pipeline.tiny import default_models_dir

    actors = sorted({int(a) for a in args.actors.split(",") if a.strip()})
    reads = [int(r) for r in args.read_tasks.split(",") if r.strip()]
    if not actors or actors[0] < 1 or args.copies < 1 or args.rows < 1 or args.repeats < 1:
        raise ValueError("--actors must list integers >= 1; --copies, --rows and --repeats must be >= 1")
    if not reads or min(reads) < 0:
        raise ValueError("--read-tasks must list integers >= 0")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        models = tmp / "models"
        tiny = default_models_dir()
        models.mkdir()
        for part in ("llm", "decoder"):
            (models / part).symlink_to(tiny / part)
        if args.encoder == "tiny":
            (models / "encoder").symlink_to(tiny / "encoder")
        else:
            write_random_encoder(models / "encoder", tiny_encoder_config(**encoder_shape("bench")), seed=0)
        corpus = _copies(Path(args.corpus), args.copies, tmp / "corpus")
        loop = min((_fresh_process_loop(corpus, models, tmp / f"loop{r}") for r in range(args.repeats)),
                   key=lambda r: r["wall_s"])
        started = not ray.is_initialized()
        if started:
            close_local_ray()  # loopback only, Ray's token auth on
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 * 2**20,
                     log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="vp", dir="/tmp"),
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            jobs = [min((_job(corpus, models, tmp / f"job{n}-{k}-{r}", n, args.rows, k) for r in range(args.repeats)),
                        key=lambda r: r["wall_s"]) for k in reads for n in actors]
        finally:
            if started:
                ray.shutdown()
    rows = [loop] + jobs
    for row in rows:
        row["vs_loop"] = row["audio_s_per_s"] / loop["audio_s_per_s"]
    results = {"encoder": args.encoder, "runs": rows, "targets": _targets(loop, jobs),
               "load_average": os.getloadavg(), "files": loop["utterances"], "audio_s": loop["audio_s"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(rows, out / "prepare.png")
    md = (f"{loop['utterances']} utterances, {loop['audio_s']:.1f} s of audio (the mini-speech LibriSpeech files x "
          f"{args.copies}), ASR samples, {args.encoder}-size encoder, one torch thread per process, "
          f"load average {results['load_average'][0]:.1f} at the end.\n\n" +
          markdown_table(rows, ["run", "encoder_actors", "read_tasks", "utterances", "audio_s", "wall_s", "audio_s_per_s",
                                "startup_s", "audio_s_per_s_after_startup", "vs_loop"]) +
          "\n## Targets\n\n" + markdown_table(results["targets"]) + "\n![throughput](prepare.png)\n")
    write_report("prepare", results, md, out)
    return results


def _copies(corpus: Path, copies: int, out: Path) -> Path:
    """The corpus `copies` times as a LibriSpeech part (speaker ids prefixed by the copy), files symlinked."""
    from jobs.prepare.recipes import prepare_librispeech

    part = out / "bench"
    for k in range(copies):
        for utts in prepare_librispeech(corpus).values():
            for u in utts:
                spk, chapter, n = u.id.split("-")
                folder = part / f"{k}{spk}" / chapter
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{k}{spk}-{chapter}-{n}.flac").symlink_to(u.audio[0].path)
                with open(folder / f"{k}{spk}-{chapter}.trans.txt", "a") as f:
                    f.write(f"{k}{spk}-{chapter}-{n} {u.text}\n")
    return out


def _fresh_process_loop(corpus: Path, models: Path, out: Path) -> dict:
    """`_plain_loop` in a new Python process; wall time and start-up from the moment it is started."""
    import json
    import subprocess
    import sys

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.prepare", str(corpus), str(models), str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=3600, check=True)
    wall = time.perf_counter() - start
    inner = json.loads(done.stdout.strip().splitlines()[-1])
    return {**inner, "run": "plain loop (own process)", "wall_s": wall, "audio_s_per_s": inner["audio_s"] / wall,
            "startup_s": wall - inner["wall_s"] + inner["startup_s"]}


def _plain_loop(corpus: Path, models: Path, out: Path) -> dict:
    """One process, one utterance at a time: read + check, encode, build the sample; one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.prepare.checks import AudioChecks, read_checked
    from jobs.prepare.recipes import prepare_librispeech
    from jobs.prepare.samples import build_sample, recipe_messages
    from pipeline.encoder.speech_encoder import load_encoder
    from pipeline.tokens.chat import BOOST_RATIO
    from pipeline.tokens.vocab import TokenLayout, load_tokenizer

    start = time.perf_counter()
    utts = [u for items in prepare_librispeech(corpus).values() for u in items]
    encoder = load_encoder(models / "encoder")
    tokenizer = load_tokenizer(models / "llm")
    layout = TokenLayout.from_tokenizer(tokenizer)
    loaded = time.perf_counter()
    checks, rows, seconds = AudioChecks(), [], 0.0
    for u in utts:
        wave, _ = read_checked(u.audio[0], checks)
        codes = [encoder.encode_waveforms([wave])[0]]
        sample = build_sample(tokenizer, layout, {"messages": recipe_messages("asr", u.text)}, codes, BOOST_RATIO)
        rows.append({"id": u.id, "input_ids": sample["input_ids"], "labels": sample["labels"]})
        seconds += len(wave) / 16000
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "samples.parquet")
    end = time.perf_counter()
    return {"run": "plain loop", "encoder_actors": 0, "read_tasks": 0, "utterances": len(utts), "audio_s": seconds,
            "wall_s": end - start, "audio_s_per_s": seconds / (end - start), "startup_s": loaded - start,
            "audio_s_per_s_after_startup": seconds / (end - loaded)}


def _loop_main(argv: list[str]) -> None:
    """`python -m benchmarks.prepare CORPUS MODELS OUT`: the plain loop; its timings as one JSON line."""
    import json

    import torch

    torch.set_num_threads(1)
    corpus, models, out = (Path(a) for a in argv)
    print(json.dumps(_plain_loop(corpus, models, out)))


def _job(corpus: Path, models: Path, out: Path, actors: int, rows: int, read_tasks: int) -> dict:
    from jobs.pools import PoolConfig
    from jobs.prepare.job import PrepareConfig, run_prepare

    cpus = max(0.1, round(os.cpu_count() / (2 * actors), 2))
    start = time.perf_counter()
    manifest = run_prepare(PrepareConfig(sources=[f"librispeech:{corpus}"], out=str(out), tasks=("asr",),
                                         models=str(models), encoder=PoolConfig(size=actors, num_cpus=cpus,
                                                                                batch_size=rows),
                                         read_tasks=read_tasks, block_size=16, progress=False))
    wall = time.perf_counter() - start
    run = manifest["runs"][-1]
    seconds = run["audio_seconds"]
    shutil.rmtree(out, ignore_errors=True)
    reading = f"{read_tasks} read tasks" if read_tasks else "reads in the actors"
    return {"run": f"job, {actors} actor(s), {reading}", "encoder_actors": actors, "read_tasks": read_tasks,
            "utterances": manifest["counts"]["inputs"],
            "audio_s": seconds, "wall_s": wall, "audio_s_per_s": seconds / wall, "startup_s": run.get("startup_s"),
            "audio_s_per_s_after_startup": run.get("steady_audio_s_per_s")}


def _targets(loop: dict, jobs: list[dict]) -> list[dict]:
    rows = []
    for reads in sorted({j["read_tasks"] for j in jobs}, reverse=True):
        by = {j["encoder_actors"]: j for j in jobs if j["read_tasks"] == reads}
        how = f"{reads} read tasks" if reads else "reads in the actors"
        for key, what in (("audio_s_per_s", "end to end"), ("audio_s_per_s_after_startup", "after start-up")):
            if 1 in by and by[1].get(key) and loop.get(key):
                ratio = by[1][key] / loop[key]
                rows.append({"target": f"{how}: 1 actor >= 0.9x the plain loop ({what})", "measured": ratio,
                             "met": ratio >= 0.9})
            if 1 in by and 2 in by and by[1].get(key) and by[2].get(key):
                ratio = by[2][key] / by[1][key]
                rows.append({"target": f"{how}: 2 actors >= 1.5x 1 actor ({what})", "measured": ratio,
                             "met": ratio >= 1.5})
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r["run"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["audio_s_per_s"] for r in rows], width=0.4, label="end to end")
    ax.bar([i + 0.2 for i in x], [r["audio_s_per_s_after_startup"] or 0 for r in rows], width=0.4,
           label="after start-up")
    ax.set_xticks(list(x), [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set(ylabel="audio seconds per wall second", title="corpus preparation throughput")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    _loop_main(sys.argv[1:])
