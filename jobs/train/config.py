"""The typed training config: a recipe YAML (`defaults` + `stages`) and `key=value` overrides -> one checked
`StageConfig` per stage, validated up front as torchtune's recipes are (nothing here imports torch or Ray).

    stages = load_recipe("tiny", ["max_steps=4", "stage4.lr=1e-3"])   # {1: StageConfig(...), ..., 4: ...}

Every refusal is one `TrainConfigError` line (an `InputError`: the CLI exits 2) naming the file, stage, key or
override and what is accepted: a recipe that is not YAML (with its line and column), an unknown top-level key,
stage or setting (with the valid ones), a value of the wrong type or out of range (`lr=nan`, `max_steps=0`),
a stage that would train nothing, an unreadable DeepSpeed JSON.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from actors.errors import InputError

RECIPES = Path(__file__).parent / "recipes"


class TrainConfigError(InputError):
    """A run that cannot work, refused before any worker starts; the message says how to fix it."""


@dataclass(frozen=True)
class StageConfig:
    """One training stage: the model it trains (spec §6.1) and its optimisation (a recipe's values)."""

    stage: int
    num_mtp_modules: int  # MCTP modules of the model this stage trains (0: the plain backbone, stage 1)
    language_model_frozen: bool  # stages 2-3: only the MCTP modules train
    lr: float  # peak learning rate (warm-up, then cosine down to min_lr_ratio x lr)
    max_steps: int  # optimizer steps of the stage
    mtp_inference_mode: tuple[int, ...]  # the decode schedule written to the stage's generation_config.json
    zero_stage: int = 2  # DeepSpeed ZeRO stage (a deepspeed_config JSON's ZeRO block overrides it)
    grad_accum: int = 1  # micro-batches (packed rows) per optimizer step and worker
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_length: int = 2048  # tokens per packed row
    log_every: int = 10  # a progress line and a Ray report every N steps (the metrics file: every step)
    save_every: int = 400  # a checkpoint every N steps (and at the last)
    keep_checkpoints: int = 2
    seed: int = 42
    mtp_lr_mult: float = 1.0  # learning-rate multiplier of the MCTP parameters (stage 4: 10)
    mtp_loss_across_samples: bool = False
    bf16: bool = False  # on GPU
    deepspeed_config: str | None = None  # the original's scripts/deepspeed/zero*.json (its ZeRO block is used)

    def as_dict(self) -> dict:
        """The plain dict a Ray Train worker receives (JSON types: lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in dataclasses.fields(StageConfig) if f.name != "stage"}
REQUIRED = tuple(n for n, f in FIELDS.items() if f.default is dataclasses.MISSING)
# settings that do not change what a stage produces (a rerun may change them)
NOT_PINNED = ("log_every", "keep_checkpoints")

_INT, _FLOAT, _BOOL = "an integer", "a number", "true or false"
# name -> (kind, range check, the range in words)
RULES = {
    "num_mtp_modules": (_INT, lambda v: v >= 0, ">= 0"),
    "language_model_frozen": (_BOOL, None, ""),
    "lr": (_FLOAT, lambda v: v > 0, "> 0"),
    "max_steps": (_INT, lambda v: v >= 1, ">= 1"),
    "mtp_inference_mode": ("a list of integers", lambda v: len(v) >= 2 and len(v) % 2 == 0 and min(v) >= 0,
                           "pairs of integers >= 0, like [1, 10, 4, 10]"),
    "zero_stage": (_INT, lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3"),
    "grad_accum": (_INT, lambda v: v >= 1, ">= 1"),
    "max_grad_norm": (_FLOAT, lambda v: v > 0, "> 0"),
    "betas": ("a list of numbers", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "eps": (_FLOAT, lambda v: v > 0, "> 0"),
    "warmup_ratio": (_FLOAT, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "min_lr_ratio": (_FLOAT, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (_FLOAT, lambda v: v >= 0, ">= 0"),
    "max_length": (_INT, lambda v: v >= 2, ">= 2"),
    "log_every": (_INT, lambda v: v >= 1, ">= 1"),
    "save_every": (_INT, lambda v: v >= 1, ">= 1"),
    "keep_checkpoints": (_INT, lambda v: v >= 1, ">= 1"),
    "seed": (_INT, lambda v: v >= 0, ">= 0"),
    "mtp_lr_mult": (_FLOAT, lambda v: v > 0, "> 0"),
    "mtp_loss_across_samples": (_BOOL, None, ""),
    "bf16": (_BOOL, None, ""),
    "deepspeed_config": ("a file path", None, ""),
}
assert set(RULES) == set(FIELDS), "every StageConfig field has its rule"


def recipe_path(recipe: str) -> Path:
    """A YAML path, or the name of a recipe under jobs/train/recipes/ (`tiny`, `vita_audio_7b`)."""
    path = Path(recipe)
    if not path.is_file():
        path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        raise TrainConfigError(f"recipe {recipe!r} not found: give a YAML file or one of "
                               f"{sorted(p.stem for p in RECIPES.glob('*.yaml'))}")
    return path


def load_recipe(recipe: str, overrides: list[str] = ()) -> dict[int, StageConfig]:
    """Stage number -> its checked StageConfig. Overrides `key=value` apply to every stage, `stage<N>.key=value`
    to one; values are parsed as YAML (`3e-3` is a number)."""
    path = recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TrainConfigError(f"recipe {path}: not valid YAML ({_yaml_problem(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TrainConfigError(f"recipe {path}: not readable ({err})") from None
    extra = sorted(set(data) - {"defaults", "stages"}, key=str) if isinstance(data, dict) else []
    if extra:
        raise TrainConfigError(f"recipe {path}: unknown top-level key {extra[0]!r} (a recipe has defaults and stages)")
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise TrainConfigError(f"recipe {path}: expected a mapping with `stages:` (stage number -> settings) "
                               "and optionally `defaults:`")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise TrainConfigError(f"recipe {path}: `defaults:` must be a mapping of settings")
    _known_keys(defaults, f"recipe {path}, defaults")
    raw: dict[int, dict] = {}
    for n, settings in data["stages"].items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TrainConfigError(f"recipe {path}: stage {n!r}: stage numbers are integers >= 1")
        if not isinstance(settings, dict):
            raise TrainConfigError(f"recipe {path}: stage {n}: expected a mapping of settings")
        _known_keys(settings, f"recipe {path}, stage {n}")
        raw[n] = {**defaults, **settings}
    for item in overrides:
        key, value, targets = _parse_override(item, sorted(raw))
        for n in targets:
            raw[n][key] = value
    return {n: stage_config(n, raw[n]) for n in sorted(raw)}


def stage_config(n: int, settings: dict) -> StageConfig:
    """The checked StageConfig of stage `n` from its merged settings."""
    where = f"stage {n}: "
    missing = [k for k in REQUIRED if k not in settings]
    if missing:
        raise TrainConfigError(f"{where}the recipe lacks {', '.join(missing)}")
    values = {k: check_value(k, v, where) for k, v in settings.items()}
    if values["language_model_frozen"] and values["num_mtp_modules"] < 1:
        raise TrainConfigError(f"stage {n} freezes the language model but has no MCTP module, so nothing would "
                               "train: set num_mtp_modules >= 1 or language_model_frozen: false")
    if values.get("deepspeed_config"):
        ds = Path(values["deepspeed_config"]).resolve()
        try:
            zero = json.loads(ds.read_text()).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError) as err:
            raise TrainConfigError(f"{where}deepspeed_config {str(ds)!r} is not a readable JSON file ({err})") from None
        values["deepspeed_config"] = str(ds)
        if isinstance(zero, dict) and zero.get("stage", "auto") != "auto":
            values["zero_stage"] = check_value("zero_stage", zero["stage"], f"{where}deepspeed_config {ds}: ")
    return StageConfig(stage=n, **values)


def check_value(name: str, value, where: str = ""):
    """`value` as the field's type, or a TrainConfigError naming the setting, the value and what is accepted."""
    kind, ok, words = RULES[name]
    bad = TrainConfigError(f"{where}{name}={value!r} must be {kind}")
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "a file path":
        if value is not None and not isinstance(value, str):
            raise bad
        return value
    if kind in (_INT, _FLOAT):
        value = _number(value, integer=kind == _INT, error=bad)
    else:  # a list of integers / numbers
        if not isinstance(value, (list, tuple)):
            raise bad
        value = tuple(_number(v, integer=kind == "a list of integers", error=bad) for v in value)
    if ok is not None and not ok(value):
        raise TrainConfigError(f"{where}{name}={_show(value)} must be {words}")
    return value


def pinned(stage: StageConfig) -> dict:
    """The settings of a stage that define what it produces (a run folder's plan pins them)."""
    return {k: v for k, v in stage.as_dict().items() if k not in NOT_PINNED}


def _number(value, integer: bool, error: Exception):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise error
        return int(value)
    if not math.isfinite(value):
        raise TrainConfigError(str(error).replace("must be a number", "must be a finite number"))
    return float(value)


def _known_keys(settings: dict, where: str) -> None:
    for key in settings:
        if key not in FIELDS:
            raise TrainConfigError(f"{where}: {_unknown(key)}")


def _unknown(key) -> str:
    close = difflib.get_close_matches(str(key), FIELDS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} ({hint}valid keys: {', '.join(FIELDS)})"


def _parse_override(item: str, stages: list[int]) -> tuple[str, object, list[int]]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise TrainConfigError(f"override {item!r} is not key=value (or stage<N>.key=value)")
    targets = stages
    if key.startswith("stage") and "." in key:
        number, key = key[len("stage"):].split(".", 1)
        if not number.isdigit() or int(number) not in stages:
            raise TrainConfigError(f"override {item!r}: the recipe has no stage {number or '?'} (its stages: "
                                   f"{', '.join(map(str, stages))}; write stage<N>.key=value)")
        targets = [int(number)]
    if key not in FIELDS:
        raise TrainConfigError(f"override {item!r}: {_unknown(key)}")
    return key, _value(item, text), targets


def _value(item: str, text: str):
    """A YAML value, with `3e-3` and `nan` read as numbers (YAML 1.1 reads them as strings)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TrainConfigError(f"override {item!r}: not a YAML value ({_yaml_problem(err)})") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _show(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)
