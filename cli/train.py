"""`vita-audio train`: the four VITA-Audio training stages as one resumable run on Ray Train + DeepSpeed.

    vita-audio train --recipe tiny --data prepared/shards --init models/llm --out runs/tiny
    vita-audio train --recipe jobs/train/recipes/vita_audio_7b.yaml --data /data/shards --init /models/qwen2 \\
        --out /data/runs/7b --workers 8 --gpus-per-worker 1 stage4.lr=2e-5

Each stage N ends with a Hugging Face folder RUN_DIR/stage<N>/ and starts from the previous one as recorded in
RUN_DIR/run.json; rerunning on the same --out skips finished stages and resumes an interrupted one from its
last checkpoint. Trailing `key=value` (every stage) or `stage<N>.key=value` (one stage) override the recipe.
A config that cannot work is refused here, before Ray or any worker starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

from actors.errors import InputError
from cli import checks


def add_arguments(p, name: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides: key=value for every stage, stage<N>.key=value for one")
    p.add_argument("--recipe", default="tiny", help="a recipe YAML file, or a built-in name (tiny, vita_audio_7b)")
    p.add_argument("--data", required=True, type=Path, help="SHARDS_DIR of `vita-audio prepare` (*.parquet)")
    p.add_argument("--init", required=True, type=Path, help="the starting LLM folder (Hugging Face format)")
    p.add_argument("--out", required=True, type=Path, help="RUN_DIR (rerun on it to resume)")
    p.add_argument("--stages", default="1-4", help="stages to run: N or N-M (default 1-4)")
    p.add_argument("--workers", type=checks.positive_int, default=2, help="Ray Train workers (one DeepSpeed rank each)")
    p.add_argument("--gpus-per-worker", type=checks.gpus, default=0.0, help="0: CPU workers with gloo; else NCCL")
    p.add_argument("--cpus-per-worker", type=checks.positive_cpus, default=1.0)
    p.add_argument("--max-failures", type=checks.non_negative_int, default=1, help="worker-group restarts per stage (from the "
                                                               "last checkpoint)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--restart", action="store_true", help="start the run in --out over (else a rerun with other "
                                                           "settings is refused, naming the setting)")
    p.add_argument("--json", action="store_true")


def check_args(args):
    """Every refusal that needs no Ray: flags, recipe, overrides, shards, starting folder, ZeRO memory."""
    from jobs.train.run import TrainConfigError, plan_run

    from actors.models import check_model_folder

    # each number alone is checked at parse time (cli.checks); here the folders, from their files
    check_model_folder(args.init, "llm", "--init")  # not the speech encoder's, complete, weights whole
    if not args.data.is_dir():
        raise InputError(f"--data {args.data}: not a folder (give the folder `vita-audio prepare --out` wrote)")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a folder")
    try:
        return plan_run(args.recipe, str(args.data), str(args.init), args.stages, args.workers,
                        args.gpus_per_worker, list(args.overrides), out=str(args.out), restart=args.restart)
    except TrainConfigError as err:
        raise InputError(str(err)) from None


def run(args) -> dict:
    from actors.ray_runtime import start_ray
    from jobs.train.run import run as run_stages

    plan, wanted = check_args(args)
    started = start_ray(args.address, num_gpus=None)
    try:
        import ray

        needed = args.workers * args.cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0)
        if needed > have:
            raise InputError(f"--workers {args.workers} x --cpus-per-worker {args.cpus_per_worker} needs {needed:g} "
                           f"CPUs, the cluster has {have:g}: lower --cpus-per-worker (e.g. 0.5) or --workers")
        if args.gpus_per_worker and args.workers * args.gpus_per_worker > ray.cluster_resources().get("GPU", 0):
            raise InputError(f"--workers {args.workers} x --gpus-per-worker {args.gpus_per_worker} GPUs are more "
                           "than the cluster has")
        manifest = run_stages(args.recipe, str(args.data), str(args.init), str(args.out), stages=args.stages,
                              workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                              overrides=list(args.overrides), max_failures=args.max_failures,
                              cpus_per_worker=args.cpus_per_worker, restart=args.restart)
    finally:
        if started:
            import ray

            ray.shutdown()
    done = [n for n in wanted if manifest["stages"].get(str(n), {}).get("status") == "done"]
    print(f"vita-audio train: stages {done} done; folders: "
          + ", ".join(str(Path(args.out) / f"stage{n}") for n in done) + f"; manifest {Path(args.out) / 'run.json'}",
          file=sys.stderr)
    return manifest
