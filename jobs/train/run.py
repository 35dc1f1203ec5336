"""A staged run: recipe -> checked stage configs -> one TorchTrainer per stage, chained by RUN_DIR/run.json.

run.json records the recipe config, and per stage its status (pending / running / done), its starting folder,
its HF folder and its last metrics. A stage starts from the previous stage's folder as recorded there (never a
hand-copied path); a done stage is skipped; a stage left running resumes from its last complete checkpoint
(RUN_DIR/checkpoints/stage<N>/step<S>, also reachable through Ray's own restore of the same run name).

RUN_DIR is a `jobs.run_folder.RunFolder`, as prepare's and batch's folders are: locked while a run writes it;
RUN_DIR/plan.json pins what the stages produce (the shards folder, --init, the stage the chain starts at, and
every stage's recipe values), so a rerun with other data, another --init or other recipe values is refused in
one line naming the setting (`restart=True`, the CLI's `--restart`, clears the run and starts over); a start
that fails before the first stage starts leaves RUN_DIR as it was. `--data` is the folder `vita-audio prepare`
wrote (its manifest.json names the shards) or a folder of shards; nothing else in it is read.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from jobs.run_folder import RunFolder, local_path
from jobs.train.config import RECIPES, StageConfig, TrainConfigError, load_recipe, pinned
from jobs.train.packing import REQUIRED_COLUMNS

__all__ = ["RECIPES", "StageConfig", "TrainConfigError", "load_recipe", "plan_run", "resolve_data", "run"]
PLAN_VERSION = 1
# everything a run writes in RUN_DIR (a restart clears these, and nothing else)
OUTPUTS = ("stage*", "checkpoints", "ray", "run.json")


def parse_stages(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def resolve_data(data) -> tuple[Path, list[str]]:
    """(the shards folder, its shard files) of `--data`: the folder `vita-audio prepare` wrote (the shards its
    manifest.json lists, under shards/) or a folder of shards (its *.parquet, hidden folders skipped)."""
    import pyarrow.parquet as pq

    root = local_path(data, "--data")
    if not root.is_dir():
        raise TrainConfigError(f"--data {data}: not a folder (give the folder `vita-audio prepare` wrote, or its "
                               "shards/)")
    if (root / "manifest.json").is_file() or ((root / "shards").is_dir() and (root / ".blocks").is_dir()):
        if not (root / "manifest.json").is_file():
            raise TrainConfigError(f"--data {data}: the preparation there has not finished (no manifest.json): "
                                   "rerun `vita-audio prepare` on it")
        try:
            names = json.loads((root / "manifest.json").read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TrainConfigError(f"--data {data}: manifest.json is not a preparation manifest ({err})") from None
        root = root / "shards"
        files = [str(root / name) for name in names]
        gone = [f for f in files if not Path(f).is_file()]
        if gone:
            raise TrainConfigError(f"--data {data}: its manifest lists {gone[0]}, which is missing: rerun "
                                   "`vita-audio prepare` on it")
    else:
        files = sorted(str(p) for p in root.rglob("*.parquet")
                       if not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise TrainConfigError(f"no Parquet shards under {str(data)!r}: run `vita-audio prepare` first")
    for f in files:
        missing = [c for c in REQUIRED_COLUMNS if c not in pq.read_schema(f).names]
        if missing:
            raise TrainConfigError(f"shard {f!r} lacks columns {missing} (needs {list(REQUIRED_COLUMNS)}): "
                                   "re-run the corpus preparation with this version")
    return root.resolve(), files


def check_init(init) -> Path:
    """`--init` is a Qwen2 (or Qwen2-MTP) LLM folder, read from its config.json."""
    path = local_path(init, "--init")
    config = path / "config.json"
    if not config.is_file():
        raise TrainConfigError(f"--init {init!r}: not a model folder (no config.json); give the LLM folder "
                               "(for example the llm/ of `vita-audio tiny`)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise TrainConfigError(f"--init {init!r}: config.json is not readable JSON ({err})") from None
    if model_type not in ("qwen2", "qwen2_mtp"):
        raise TrainConfigError(f"--init {init!r}: a {model_type!r} model folder, not a Qwen2 LLM; give the LLM "
                               "folder (for example the llm/ of a models folder)")
    return path.resolve()


def check_stage(cfg: StageConfig, n_params: int, workers: int, memory_bytes: int) -> None:
    """The memory check of a stage (every other check is the config's, at load)."""
    need = zero_bytes_per_worker(n_params, workers, cfg.zero_stage)
    if need > memory_bytes:
        raise TrainConfigError(
            f"stage {cfg.stage}: ZeRO-{cfg.zero_stage} needs about {need / 2**30:.1f} GiB per worker for "
            f"{n_params / 1e9:.2f} B fp32 parameters + grads + AdamW states, {memory_bytes / 2**30:.1f} GiB available: "
            "use zero_stage: 3, more workers, or bf16 on GPU")


def zero_bytes_per_worker(n_params: int, workers: int, zero_stage: int) -> int:
    """fp32 training memory per worker: params 4 B, grads 4 B, AdamW 8 B, partitioned as the ZeRO stage says."""
    params, grads, optim = 4 * n_params, 4 * n_params, 8 * n_params
    if zero_stage >= 1:
        optim //= workers
    if zero_stage >= 2:
        grads //= workers
    if zero_stage >= 3:
        params //= workers
    return params + grads + optim


class Manifest:
    """RUN_DIR/run.json, rewritten atomically on every change."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def stage(self, n: int) -> dict:
        return self.data["stages"].setdefault(str(n), {"status": "pending"})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def plan_run(recipe: str, data: str, init: str, stages: str = "1-4", workers: int = 2,
             gpus_per_worker: float = 0, overrides: list[str] = (), out: str | None = None,
             restart: bool = False) -> tuple[dict[int, StageConfig], list[int]]:
    """Every check that needs no worker: recipe and overrides, stage range, resources, shards, starting folder,
    memory, and (given `out`) the run folder's plan. Returns the stage configs and the stage numbers to run;
    raises TrainConfigError (an InputError) with the fix, changing nothing."""
    plan = load_recipe(recipe, list(overrides))
    try:
        wanted = parse_stages(stages)
    except ValueError:
        raise TrainConfigError(f"--stages {stages!r}: use N or N-M, like 1-4 or 3") from None
    unknown = [n for n in wanted if n not in plan]
    if not wanted or unknown:
        raise TrainConfigError(f"--stages {stages!r}: the recipe has stages {sorted(plan)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise TrainConfigError(f"--workers must be >= 1, got {workers!r}")
    if not isinstance(gpus_per_worker, (int, float)) or not math.isfinite(gpus_per_worker) or gpus_per_worker < 0:
        raise TrainConfigError(f"--gpus-per-worker must be a finite number >= 0, got {gpus_per_worker!r}")
    resolve_data(data)
    check_init(init)
    n_params = _count_params(init)
    memory = _memory_per_worker(workers, gpus_per_worker)
    for n in wanted:
        check_stage(plan[n], n_params, workers, memory)
    if out is not None:
        run_dir = local_path(out, "--out")
        RunFolder(run_dir, "train", OUTPUTS).check(
            _run_plan(plan, wanted, data, init, Manifest(run_dir), restart), restart)
    return plan, wanted


def _run_plan(plan: dict[int, StageConfig], wanted: list[int], data, init, manifest: Manifest,
              restart: bool) -> dict:
    """What RUN_DIR/plan.json pins: the shards folder, the starting folder, the stage the chain starts at (the
    first wanted stage, or an earlier one whose done stages lead to it), and every stage's recipe values."""
    first = min(wanted)
    while not restart and manifest.data["stages"].get(str(first - 1), {}).get("status") == "done":
        first -= 1
    return {"version": PLAN_VERSION, "data": str(resolve_data(data)[0]), "init": str(check_init(init)),
            "first_stage": first, **{f"stage{n}": pinned(cfg) for n, cfg in plan.items()}}


def run(recipe: str, data: str, init: str, out: str, stages: str = "1-4", workers: int = 2,
        gpus_per_worker: float = 0, overrides: list[str] = (), max_failures: int = 1,
        cpus_per_worker: float = 1.0, restart: bool = False) -> dict:
    """Run (or resume) the stages; returns run.json's content. Every refusal (TrainConfigError, RunFolderError:
    both InputErrors) comes before Ray is used."""
    plan, wanted = plan_run(recipe, data, init, stages, workers, gpus_per_worker, overrides)
    shards, files = resolve_data(data)
    run_dir = local_path(out, "--out").resolve()
    folder = RunFolder(run_dir, "train", OUTPUTS)
    run_plan = _run_plan(plan, wanted, data, init, Manifest(run_dir), restart)
    with folder.open(run_plan, restart=restart):
        return _run_stages(folder, plan, wanted, shards, files, check_init(init), recipe, overrides, workers,
                           gpus_per_worker, cpus_per_worker, max_failures)


def _run_stages(folder: RunFolder, plan: dict[int, StageConfig], wanted: list[int], shards: Path, files: list[str],
                init: Path, recipe: str, overrides, workers: int, gpus_per_worker: float, cpus_per_worker: float,
                max_failures: int) -> dict:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    from jobs.train.train_func import train_func

    run_dir = folder.out
    manifest = Manifest(run_dir)
    manifest.data.update(recipe=str(recipe), data=str(shards), init=str(init), overrides=list(overrides),
                         workers=workers)
    pad_id = AutoTokenizer.from_pretrained(init).pad_token_id

    # Read before the workers take their CPUs (on a small machine Data would get no CPU budget and wait forever);
    # every worker sees the whole dataset and keeps its rank's slice of the id order (stable across restarts).
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.read_parquet(files, columns=["id", "input_ids", "labels"]).materialize()
    start = init
    for n in wanted:
        entry = manifest.stage(n)
        prev = manifest.data["stages"].get(str(n - 1))
        if prev and prev.get("status") == "done":
            start = Path(prev["folder"])
        if entry["status"] == "done":
            start = Path(entry["folder"])
            continue
        cfg = plan[n].as_dict()
        cfg.update(init_dir=str(start), out_dir=str(run_dir / f"stage{n}"), pad_id=pad_id,
                   ckpt_root=str(run_dir / "checkpoints" / f"stage{n}"),
                   metrics_path=str(run_dir / f"stage{n}.metrics.jsonl"))
        entry.update(status="running", init=str(start), config=cfg, started=time.time())
        folder.commit()  # the first output: from here on the folder holds this run
        manifest.save()
        resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer = TorchTrainer(
            train_func, train_loop_config=cfg, torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources),
            datasets={"train": dataset}, dataset_config=DataConfig(datasets_to_split=[]),
            run_config=RunConfig(name=f"stage{n}", storage_path=str(run_dir / "ray"),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=max_failures)))
        with Progress(Path(cfg["metrics_path"]), cfg["log_every"], cfg["max_steps"]):
            result = trainer.fit()
        entry.update(status="done", folder=cfg["out_dir"], metrics=result.metrics,
                     checkpoint=result.checkpoint.path if result.checkpoint else None, finished=time.time())
        manifest.save()
        start = Path(cfg["out_dir"])
    folder.commit()
    return manifest.data


class Progress:
    """A progress line on stderr every `log_every` steps, read from the stage's metrics file (the driver sees it
    whatever Ray does with the workers' output)."""

    def __init__(self, path: Path, log_every: int, total: int, interval_s: float = 1.0):
        import threading

        self.path, self.every, self.total, self.interval = path, max(1, int(log_every)), total, interval_s
        self.stop, self.printed = threading.Event(), 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self._poll()

    def _loop(self):
        while not self.stop.wait(self.interval):
            self._poll()

    def _poll(self):
        import sys

        if not self.path.is_file():
            return
        for line in self.path.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:  # a line being written
                continue
            if m["step"] > self.printed and (m["step"] % self.every == 0 or m["step"] == self.total):
                self.printed = m["step"]
                mtp = m.get("mtp_losses") or []
                print(f"[stage {m['stage']}] step {m['step']}/{self.total} loss {m['loss']:.4f} "
                      f"backbone {m['backbone_loss']:.4f}" + (f" mtp {sum(mtp) / len(mtp):.4f}" if mtp else "")
                      + f" lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)


def _count_params(init: str) -> int:
    from math import prod

    from pipeline.llm import checkpoint_tensor_shapes

    return sum(prod(s) for s in checkpoint_tensor_shapes(init).values())


def _memory_per_worker(workers: int, gpus_per_worker: float) -> int:
    if gpus_per_worker:
        return 80 * 2**30  # checked on the cluster by DeepSpeed itself; this only stops absurd configs
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, workers)
