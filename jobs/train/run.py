"""A staged run: recipe -> checked stage configs -> one TorchTrainer per stage, chained by RUN_DIR/run.json.

run.json records the recipe config, and per stage its status (pending / running / done), its starting folder,
its HF folder and its last metrics. A stage starts from the previous stage's folder as recorded there (never a
hand-copied path); a done stage is skipped; a stage left running resumes from its last complete checkpoint
(RUN_DIR/checkpoints/stage<N>/step<S>, also reachable through Ray's own restore of the same run name).
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import yaml

from jobs.train.packing import REQUIRED_COLUMNS

RECIPES = Path(__file__).parent / "recipes"
STAGE_KEYS = ("num_mtp_modules", "language_model_frozen", "lr", "mtp_inference_mode")
OPTIONAL_KEYS = {"deepspeed_config", "log_every", "keep_checkpoints", "bf16", "mtp_loss_across_samples"}
NUMBERS = ("lr", "mtp_lr_mult", "weight_decay", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "eps", "max_steps",
           "grad_accum", "save_every", "max_length", "num_mtp_modules", "zero_stage")


class TrainConfigError(ValueError):
    """A run that cannot work, refused before any worker starts; the message says how to fix it."""


def load_recipe(recipe: str, overrides: list[str] = ()) -> dict[int, dict]:
    """Stage number -> full stage config. `recipe` is a YAML path or a name under recipes/ (`tiny`).
    Overrides `key=value` apply to every stage, `stage<N>.key=value` to one; values are parsed as YAML."""
    path = Path(recipe)
    if not path.is_file():
        path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        raise TrainConfigError(f"recipe {recipe!r} not found: give a YAML file or one of "
                               f"{sorted(p.stem for p in RECIPES.glob('*.yaml'))}")
    data = yaml.safe_load(path.read_text())
    stages = {int(n): {**data.get("defaults", {}), **s, "stage": int(n)} for n, s in data["stages"].items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainConfigError(f"override {item!r} is not key=value")
        target = stages.values()
        if key.startswith("stage") and "." in key:
            n, key = key[5:].split(".", 1)
            target = [stages[int(n)]]
        for s in target:
            s[key] = _value(value)
    return stages


def _value(text: str):
    """A YAML value, with `3e-3` read as a number (YAML 1.1 takes exponents without a dot for strings)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_stages(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def check_shards(data_dir: str | os.PathLike) -> list[str]:
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in Path(data_dir).rglob("*.parquet"))
    if not files:
        raise TrainConfigError(f"no Parquet shards under {data_dir!r}: run `vita-audio prepare` first")
    for f in files:
        missing = [c for c in REQUIRED_COLUMNS if c not in pq.read_schema(f).names]
        if missing:
            raise TrainConfigError(f"shard {f!r} lacks columns {missing} (needs {list(REQUIRED_COLUMNS)}): "
                                   "re-run the corpus preparation with this version")
    return files


def check_stage(cfg: dict, n_params: int, workers: int, memory_bytes: int) -> None:
    missing = [k for k in STAGE_KEYS if k not in cfg]
    if missing:
        raise TrainConfigError(f"stage {cfg['stage']}: recipe lacks {missing}")
    if cfg["language_model_frozen"] and cfg["num_mtp_modules"] < 1:
        raise TrainConfigError(f"stage {cfg['stage']} freezes the language model but has no MCTP module, so "
                               "nothing would train: set num_mtp_modules >= 1 or language_model_frozen: false")
    for key in NUMBERS:
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))):
            raise TrainConfigError(f"stage {cfg['stage']}: {key}={cfg[key]!r} must be a number")
    if cfg.get("deepspeed_config"):
        path = Path(cfg["deepspeed_config"])
        try:
            zero = json.loads(path.read_text()).get("zero_optimization", {})
        except (OSError, ValueError) as err:
            raise TrainConfigError(f"stage {cfg['stage']}: deepspeed_config {str(path)!r} is not a readable JSON "
                                   f"file ({err})") from None
        if zero.get("stage", "auto") != "auto":
            cfg["zero_stage"] = zero["stage"]
    if cfg["zero_stage"] not in (0, 1, 2, 3):
        raise TrainConfigError(f"zero_stage {cfg['zero_stage']!r}: use 0, 1, 2 or 3")
    if cfg["max_steps"] < 1 or cfg["grad_accum"] < 1 or cfg["save_every"] < 1:
        raise TrainConfigError("max_steps, grad_accum and save_every must be >= 1")
    need = zero_bytes_per_worker(n_params, workers, cfg["zero_stage"])
    if need > memory_bytes:
        raise TrainConfigError(
            f"stage {cfg['stage']}: ZeRO-{cfg['zero_stage']} needs about {need / 2**30:.1f} GiB per worker for "
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
             gpus_per_worker: float = 0, overrides: list[str] = ()) -> tuple[dict[int, dict], list[int]]:
    """Every check that needs no worker: recipe and overrides, stage range, shards, starting folder, memory.
    Returns the stage configs and the stage numbers to run; raises TrainConfigError with the fix."""
    known = set().union(*(s.keys() for s in load_recipe(recipe).values()), OPTIONAL_KEYS)
    plan = load_recipe(recipe, list(overrides))
    for item in overrides:
        key = item.partition("=")[0].split(".", 1)[-1] if item.startswith("stage") else item.partition("=")[0]
        if key not in known:
            raise TrainConfigError(f"override {item!r}: unknown key {key!r} (recipe keys: {', '.join(sorted(known))})")
    try:
        wanted = parse_stages(stages)
    except ValueError:
        raise TrainConfigError(f"--stages {stages!r}: use N or N-M, like 1-4 or 3") from None
    unknown = [n for n in wanted if n not in plan]
    if not wanted or unknown:
        raise TrainConfigError(f"--stages {stages!r}: the recipe has stages {sorted(plan)}")
    if workers < 1 or gpus_per_worker < 0:
        raise TrainConfigError("--workers must be >= 1 and --gpus-per-worker >= 0")
    check_shards(data)
    if not (Path(init) / "config.json").is_file():
        raise TrainConfigError(f"--init {init!r}: not a model folder (no config.json); give the LLM folder "
                               "(for example the llm/ of `vita-audio tiny`)")
    n_params = _count_params(init)
    memory = _memory_per_worker(workers, gpus_per_worker)
    for n in wanted:
        check_stage(plan[n], n_params, workers, memory)
    return plan, wanted


def run(recipe: str, data: str, init: str, out: str, stages: str = "1-4", workers: int = 2,
        gpus_per_worker: float = 0, overrides: list[str] = (), max_failures: int = 1,
        cpus_per_worker: float = 1.0) -> dict:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    from jobs.train.train_func import train_func

    plan, wanted = plan_run(recipe, data, init, stages, workers, gpus_per_worker, overrides)
    run_dir = Path(out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    manifest.data.update(recipe=str(recipe), data=str(Path(data).resolve()), init=str(Path(init).resolve()),
                         overrides=list(overrides), workers=workers)
    pad_id = AutoTokenizer.from_pretrained(init).pad_token_id

    # Read before the workers take their CPUs (on a small machine Data would get no CPU budget and wait forever);
    # every worker sees the whole dataset and keeps its rank's slice of the id order (stable across restarts).
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.read_parquet(data, columns=["id", "input_ids", "labels"]).materialize()
    start = Path(init).resolve()
    for n in wanted:
        entry = manifest.stage(n)
        prev = manifest.data["stages"].get(str(n - 1))
        if prev and prev.get("status") == "done":
            start = Path(prev["folder"])
        if entry["status"] == "done":
            start = Path(entry["folder"])
            continue
        cfg = copy.deepcopy(plan[n])
        cfg.update(init_dir=str(start), out_dir=str(run_dir / f"stage{n}"), pad_id=pad_id,
                   ckpt_root=str(run_dir / "checkpoints" / f"stage{n}"),
                   metrics_path=str(run_dir / f"stage{n}.metrics.jsonl"))
        entry.update(status="running", init=str(start), config=cfg, started=time.time())
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
        with Progress(Path(cfg["metrics_path"]), cfg.get("log_every", 1), cfg["max_steps"]):
            result = trainer.fit()
        entry.update(status="done", folder=cfg["out_dir"], metrics=result.metrics,
                     checkpoint=result.checkpoint.path if result.checkpoint else None, finished=time.time())
        manifest.save()
        start = Path(cfg["out_dir"])
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
