"""The rules that make the four training stages differ (spec §6.1): what trains, how new MCTP modules start,
which parameters get the MCTP learning-rate multiplier, and the warm-up + cosine schedule.

Freezing follows `--language-model-freeze` of the original: everything frozen, then each MCTP module's decoder
layer, `mtp_projs.k`, `mtp_embed_norms.k`, `mtp_hidden_norms.k` re-enabled; embeddings, final norm and lm_head
stay frozen, so the model's forward detaches the MCTP inputs and drops the backbone loss (spec §1.6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.llm import Qwen2MTPConfig, Qwen2MTPForCausalLM


@dataclass(frozen=True)
class StageRules:
    """One stage's model-side settings (the recipe's optimisation values live in the recipe)."""

    stage: int
    num_mtp_modules: int  # N of the model this stage trains (0 for stage 1 from a plain Qwen2)
    language_model_frozen: bool  # stages 2-3
    mtp_lr_mult: float = 1.0  # stage 4: 10.0


DEFAULT_STAGES = {
    1: StageRules(1, 0, False),
    2: StageRules(2, 1, True),
    3: StageRules(3, 10, True),
    4: StageRules(4, 10, False, 10.0),
}


def mtp_parameter_names(model: Qwen2MTPForCausalLM) -> set[str]:
    """Names of every MCTP parameter: the modules' decoder layers, projections and norms."""
    layers = {f"model.layers.{model.mtp_layer_index(k)}." for k in range(model.num_mtp_modules)}
    return {
        name for name, _ in model.named_parameters()
        if name.startswith(("mtp_projs.", "mtp_embed_norms.", "mtp_hidden_norms.")) or name.startswith(tuple(layers))
    }


def freeze_for_stage(model: Qwen2MTPForCausalLM, language_model_frozen: bool) -> list[str]:
    """Set requires_grad per stage; returns the trainable parameter names."""
    mtp = mtp_parameter_names(model)
    if language_model_frozen and not mtp:
        raise ValueError("a stage with the language model frozen needs at least one MCTP module "
                         "(set num_mtp_modules >= 1 for stages 2-3)")
    for name, p in model.named_parameters():
        p.requires_grad_(not language_model_frozen or name in mtp)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def grow_mtp_modules(model: Qwen2MTPForCausalLM, num_mtp_modules: int, seed: int = 42) -> Qwen2MTPForCausalLM:
    """A model with `num_mtp_modules` MCTP modules initialised as the original does when their keys are missing:
    module layer NB+k <- layer NB+k-1 (so stage 2's module starts as the last backbone layer and stage 3's ten
    start as stage 2's module), mtp_projs/norms k <- k-1 for k >= 1; a brand new module 0 keeps a random
    N(0, initializer_range) projection and unit norms. Existing modules and the backbone are copied unchanged."""
    old = model.num_mtp_modules  # fewer modules than the folder holds (stage 1 from an MCTP folder): the extra drop
    NB = model.num_backbone_layers
    base = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}  # re-derived
    cfg = Qwen2MTPConfig(**{**base, "num_hidden_layers": NB + num_mtp_modules,
                            "num_nextn_predict_layers": num_mtp_modules, "model_type": "qwen2_mtp"})
    cfg.architectures = ["Qwen2MTPForCausalLM"]
    torch.manual_seed(seed)  # the random init of a brand-new mtp_projs.0 is reproducible
    new = Qwen2MTPForCausalLM(cfg).to(model.dtype)
    state = model.state_dict()
    missing = set(new.state_dict()) - set(state)
    copied = dict(state)
    for k in range(min(old, num_mtp_modules), num_mtp_modules):
        src, dst = f"model.layers.{NB + k - 1}.", f"model.layers.{NB + k}."
        for key in list(copied):
            if key.startswith(src):
                copied[dst + key[len(src):]] = copied[key].clone()
        if k >= 1:
            for part in ("mtp_projs", "mtp_embed_norms", "mtp_hidden_norms"):
                for key in [x for x in copied if x.startswith(f"{part}.{k - 1}.")]:
                    copied[f"{part}.{k}." + key[len(f"{part}.{k - 1}."):]] = copied[key].clone()
    load = {k: v for k, v in copied.items() if k in new.state_dict()}
    result = new.load_state_dict(load, strict=False)
    still = set(result.missing_keys) & missing
    allowed = {k for k in still if k.startswith(("mtp_projs.0.", "mtp_embed_norms.0.", "mtp_hidden_norms.0."))}
    if still - allowed:
        raise RuntimeError(f"MCTP growth left keys uninitialised: {sorted(still - allowed)[:6]}")
    if cfg.tie_word_embeddings:
        new.tie_weights()
    return new


def param_groups(model: Qwen2MTPForCausalLM, lr: float, weight_decay: float, mtp_lr_mult: float) -> list[dict]:
    """AdamW groups: MCTP parameters at lr x mtp_lr_mult (the original matches names containing "mtp" or the
    modules' layer prefixes); biases and norms without weight decay (HF's decay split)."""
    mtp = mtp_parameter_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and "norm" not in name
        groups.setdefault((name in mtp or "mtp" in name, decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (mtp_lr_mult if is_mtp else 1.0), "weight_decay": weight_decay if decay else 0.0,
         "lr_mult": mtp_lr_mult if is_mtp else 1.0}
        for (is_mtp, decay), ps in sorted(groups.items())
    ]


def warmup_cosine(step: int, total_steps: int, warmup_ratio: float = 0.03, min_ratio: float = 0.1) -> float:
    """LR factor at optimizer step `step`: linear warm-up over ceil(warmup_ratio x total) steps, then cosine
    down to min_ratio of the peak (the original's DeepSpeed WarmupCosineLR with cos_min_ratio 0.1)."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
