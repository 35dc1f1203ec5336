"""The per-worker training loop for Ray Train's TorchTrainer: one stage, DeepSpeed inside (spec §6).

Every worker loads the stage's starting folder, grows/initialises MCTP modules and freezes as the stage says
(deterministically, so all ranks hold identical weights), packs its own Ray Data shard, and trains with
`deepspeed.initialize` over a client AdamW (keeps the MCTP lr groups; no JIT fused-Adam build on CPU).

Loss normalisation follows the original's HF Trainer + DeepSpeed (spec §6.4): every CE of a micro-batch is
sum / N_window, N_window = the scored backbone targets of the whole gradient-accumulation window on this
worker, and DeepSpeed must not divide by the accumulation steps again (`scale_wrt_gas=False`); ranks average.
Checkpoints (model, optimizer, scheduler, step, config) are written by all ranks into one folder under the run
directory (shared storage on a cluster) and reported by rank 0 through `ray.train.report`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from jobs.train.packing import main_token_count, pack
from jobs.train.stage_rules import freeze_for_stage, grow_mtp_modules, param_groups, warmup_cosine

COMPLETE = "complete.json"


def build_model(cfg: dict):
    from pipeline.llm import load_llm

    model = load_llm(cfg["init_dir"], dtype=torch.float32)
    if cfg["num_mtp_modules"] != model.num_mtp_modules:  # stage 1 from an MCTP folder drops them
        model = grow_mtp_modules(model, cfg["num_mtp_modules"], seed=cfg.get("seed", 42))
    model.config.mtp_loss_across_samples = bool(cfg.get("mtp_loss_across_samples", False))
    freeze_for_stage(model, cfg["language_model_frozen"])
    return model.train()


def deepspeed_config(cfg: dict, bf16: bool = False) -> dict:
    """The engine's config from the recipe. A recipe `deepspeed_config: FILE.json` (the original's
    scripts/deepspeed/zero*.json, HF-Trainer style) is accepted: its ZeRO block (without "auto" values) replaces
    the recipe's zero_stage and its other plain settings are kept; batch shape, clipping, precision (bf16 on GPU,
    fp32 on CPU) and the optimizer/scheduler (the client AdamW + warm-up cosine with the MCTP lr groups) stay the
    recipe's."""
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": cfg["grad_accum"],
          "gradient_clipping": cfg["max_grad_norm"], "zero_optimization": {"stage": cfg["zero_stage"]},
          "steps_per_print": 10**9, "wall_clock_breakdown": False}
    user = load_deepspeed_json(cfg.get("deepspeed_config"))
    for key, value in user.items():
        if key == "zero_optimization":
            ds[key] = {k: v for k, v in value.items() if v != "auto"}
        elif key not in ds and value != "auto" and key not in RECIPE_OWNED:
            ds[key] = value
    if bf16:
        ds["bf16"] = {"enabled": True}
    return ds


RECIPE_OWNED = ("optimizer", "scheduler", "train_batch_size", "bf16", "fp16", "amp")


def load_deepspeed_json(path) -> dict:
    return json.loads(Path(path).read_text()) if path else {}


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint folder whose write finished (rank 0 writes COMPLETE after every rank saved)."""
    done = [p for p in ckpt_root.glob("step*") if (p / COMPLETE).is_file()] if ckpt_root.is_dir() else []
    return max(done, key=lambda p: int(p.name[4:]), default=None)


def train_func(cfg: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ckpt_root = Path(cfg["ckpt_root"])
    ckpt_root.mkdir(parents=True, exist_ok=True)
    (ckpt_root / f"rank{rank}.pid").write_text(str(os.getpid()))  # which process is which rank (ops, tests)
    torch.manual_seed(cfg.get("seed", 42))
    model = build_model(cfg)
    total = cfg["max_steps"]
    optimizer = torch.optim.AdamW(param_groups(model, cfg["lr"], cfg["weight_decay"], cfg["mtp_lr_mult"]),
                                  lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total, cfg["warmup_ratio"], cfg["min_lr_ratio"]))
    gas = cfg["grad_accum"]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, bf16=bool(cfg.get("bf16")) and torch.cuda.is_available()))

    step = 0
    # the newer of Ray's last reported checkpoint and the last complete one on disk (a failure between the
    # all-ranks save and rank 0's report leaves the newest only on disk)
    reported = ray.train.get_checkpoint()
    candidates = [c for c in (Path(reported.path) if reported else None, latest_checkpoint(ckpt_root)) if c]
    resume_dir = max(candidates, key=_checkpoint_step, default=None)
    if resume_dir is not None:
        _, client = engine.load_checkpoint(str(resume_dir), tag="state")
        step = int(client["step"])

    rows = _packed_rows(ray.train.get_dataset_shard("train"), cfg, rank, world)
    metrics_path = Path(cfg["metrics_path"])
    if rank == 0:
        _keep_metrics_up_to(metrics_path, step)  # steps after the resumed checkpoint are trained again
    cursor = step * gas  # the data position is a function of the step, so a resumed run sees the same batches
    while step < total:
        window = [rows[(cursor + i) % len(rows)] for i in range(gas)]
        cursor += gas
        n_items = max(1, sum(main_token_count(r[2][None]) for r in window))
        t0, sums = time.perf_counter(), {"loss": 0.0, "backbone": 0.0, "mtp": None}
        for ids, pos, labels in window:
            batch = {k: torch.from_numpy(v[None]).to(engine.device) for k, v in
                     (("input_ids", ids), ("position_ids", pos), ("labels", labels))}
            out = engine(**batch, num_items_in_batch=n_items)
            engine.backward(out.loss, scale_wrt_gas=False)
            engine.step()
            sums["loss"] += out.loss.item()
            sums["backbone"] += out.backbone_loss.item()
            mtp = np.array([x.item() for x in out.mtp_losses])
            sums["mtp"] = mtp if sums["mtp"] is None else sums["mtp"] + mtp
        step += 1
        dt = time.perf_counter() - t0
        tokens = gas * len(window[0][0]) * world  # packed positions of every worker in this step
        metrics = {"stage": cfg["stage"], "step": step, "loss": sums["loss"], "backbone_loss": sums["backbone"],
                   "mtp_losses": [] if sums["mtp"] is None else sums["mtp"].tolist(),
                   "lr": scheduler.get_last_lr()[0], "tokens": tokens, "step_s": dt, "tokens_per_s": tokens / dt, "time": time.time()}
        if rank == 0:  # before the checkpoint: a complete checkpoint at step S implies metrics up to S
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        checkpoint = None
        if step % cfg["save_every"] == 0 or step == total:
            checkpoint = _save(engine, ckpt_root / f"step{step}", step, cfg, rank, dist)
        if checkpoint is not None or step % cfg.get("log_every", 1) == 0:  # a sync of all ranks: not every step
            ray.train.report(metrics, checkpoint=checkpoint if rank == 0 else None)
    if rank == 0:
        write_hf_folder(engine.module, cfg)
    dist.barrier()


def _packed_rows(shard, cfg: dict, rank: int, world: int) -> list:
    """This worker's packed rows: every `world`-th sample of the id order, from `rank` (Ray Data's block order
    is not stable across restarts; the id order is, so a resumed worker sees the same batches)."""
    samples = sorted(shard.iter_rows(), key=lambda s: str(s["id"]))[rank::world]
    packed = pack(samples, cfg["max_length"], cfg["pad_id"])
    if not len(packed.input_ids):
        raise ValueError(f"no sample of this worker's shard fits max_length={cfg['max_length']} "
                         f"({packed.dropped} dropped): raise max_length or give the stage more data")
    return list(zip(packed.input_ids, packed.position_ids, packed.labels))


def _checkpoint_step(path: Path) -> int:
    done = path / COMPLETE
    return json.loads(done.read_text())["step"] if done.is_file() else -1


def _keep_metrics_up_to(path: Path, step: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _save(engine, path: Path, step: int, cfg: dict, rank: int, dist):
    from ray.train import Checkpoint

    engine.save_checkpoint(str(path), tag="state", client_state={"step": step, "config": cfg})
    dist.barrier()
    if rank == 0:
        (path / COMPLETE).write_text(json.dumps({"step": step}))
        done = sorted((p for p in path.parent.glob("step*") if (p / COMPLETE).is_file()), key=lambda p: int(p.name[4:]))
        for old in done[:-cfg.get("keep_checkpoints", 2)]:  # Ray keeps its own copies (CheckpointConfig)
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return Checkpoint.from_directory(str(path))


def write_hf_folder(model, cfg: dict) -> Path:
    """RUN_DIR/stage<N>/: save_pretrained (safetensors), the tokenizer of the starting folder, and the
    generation config with this stage's MCTP mode; written to a temp folder then renamed (atomic)."""
    out = Path(cfg["out_dir"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.mtp_loss_across_samples = False  # a training-time choice, not a property of the weights
    model.save_pretrained(tmp, safe_serialization=True)
    init = Path(cfg["init_dir"])
    for name in os.listdir(init):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")):
            shutil.copy(init / name, tmp / name)
    gen_path = init / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen["mtp_inference_mode"] = list(cfg["mtp_inference_mode"])
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
