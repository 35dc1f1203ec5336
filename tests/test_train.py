"""Stage rules (spec §6.1, §6.4), packing, config checks, and a tiny 4-stage run on Ray Train + DeepSpeed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jobs.train import run as train_run
from jobs.train.packing import main_token_count, pack
from jobs.train.stages import (
    freeze_for_stage,
    grow_mtp_modules,
    mtp_parameter_names,
    param_groups,
    warmup_cosine,
)
from pipeline.llm import load_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKBONE = ("model.embed_tokens.", "model.norm.", "lm_head.")


def backbone_keys(model) -> list[str]:
    NB = model.num_backbone_layers
    return [k for k in model.state_dict() if k.startswith(BACKBONE)
            or any(k.startswith(f"model.layers.{i}.") for i in range(NB))]


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):
    return tiny_models / "llm"


def test_stage2_module_is_a_copy_of_the_last_backbone_layer_and_stage3_copies_stage2(tiny_llm):
    base = load_llm(tiny_llm, dtype=torch.float32)
    stage1 = grow_mtp_modules(base, 0)
    assert stage1.num_mtp_modules == 0 and stage1.num_backbone_layers == base.num_backbone_layers
    stage2 = grow_mtp_modules(stage1, 1)
    NB = stage2.num_backbone_layers
    sd2 = stage2.state_dict()
    for key, value in sd2.items():
        if key.startswith(f"model.layers.{NB - 1}."):
            torch.testing.assert_close(sd2[key.replace(f"layers.{NB - 1}.", f"layers.{NB}.", 1)], value, rtol=0, atol=0)
    assert torch.equal(stage2.mtp_embed_norms[0].weight, torch.ones_like(stage2.mtp_embed_norms[0].weight))
    for key in backbone_keys(stage1):
        assert torch.equal(sd2[key], stage1.state_dict()[key]), key
    with torch.no_grad():
        stage2.mtp_projs[0].weight.add_(1.0)  # "trained": stage 3 must copy stage 2's module, not the backbone's
    stage3 = grow_mtp_modules(stage2, 10)
    sd3 = stage3.state_dict()
    for k in range(10):
        for key, value in sd2.items():
            if key.startswith(f"model.layers.{NB}."):
                assert torch.equal(sd3[key.replace(f"layers.{NB}.", f"layers.{NB + k}.", 1)], value)
        assert torch.equal(stage3.mtp_projs[k].weight, stage2.mtp_projs[0].weight)
        assert torch.equal(stage3.mtp_hidden_norms[k].weight, stage2.mtp_hidden_norms[0].weight)


def test_freeze_rules_and_the_mtp_learning_rate_multiplier(tiny_llm):
    model = load_llm(tiny_llm, dtype=torch.float32)
    mtp = mtp_parameter_names(model)
    trainable = set(freeze_for_stage(model, language_model_frozen=True))
    assert trainable == mtp and not any(n.startswith(BACKBONE) for n in trainable)
    with pytest.raises(ValueError, match="MCTP module"):
        freeze_for_stage(grow_mtp_modules(model, 0), language_model_frozen=True)
    assert len(freeze_for_stage(model, language_model_frozen=False)) == len(list(model.parameters()))
    groups = param_groups(model, lr=5e-5, weight_decay=0.1, mtp_lr_mult=10.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_id[id(p)]
        assert g["lr"] == pytest.approx(5e-4 if name in mtp else 5e-5), name
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 and "norm" not in name else 0.0)


def test_warmup_then_cosine_to_ten_percent():
    total = 100
    factors = [warmup_cosine(s, total, 0.03, 0.1) for s in range(total + 1)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.1)
    assert warmup_cosine(3 + 48, total, 0.03, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 48 / 97)))


def test_packing_restarts_position_ids_and_drops_overlong_samples():
    samples = [{"id": "a", "input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
               {"id": "b", "input_ids": [4, 5], "labels": [-100, 5]},
               {"id": "c", "input_ids": list(range(9)), "labels": list(range(9))},
               {"id": "d", "input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]}]
    rows = pack(samples, max_length=6, pad_id=0)
    assert rows.dropped == 1 and rows.sample_ids == [["a", "b"], ["d"]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert rows.labels[1].tolist() == [-100, -100, 8, 9, -100, -100]
    assert main_token_count(rows.labels) == 3 + 2


def test_grad_accumulation_normalises_by_the_window_token_count(tiny_llm):
    """Spec §6.4: the sum over a window of CE_sum(micro) / N_window equals one big batch's sum / N (here the
    window's rows as one batch), so gradients do not depend on how the window is split."""
    model = freeze_model = load_llm(tiny_llm, dtype=torch.float32).train()
    rng = np.random.RandomState(0)
    ids = torch.from_numpy(rng.randint(5, 120, size=(2, 12)))
    labels = ids.clone()
    labels[:, :3] = -100
    n = main_token_count(labels.numpy())
    total = sum(model(input_ids=ids[i:i + 1], labels=labels[i:i + 1], num_items_in_batch=n).loss for i in range(2))
    whole = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5)
    assert freeze_model is model


def test_config_checks_refuse_before_any_worker(tmp_path, tiny_llm):
    plan = train_run.load_recipe("tiny", ["stage2.num_mtp_modules=0", "max_steps=3"])
    assert plan[1]["max_steps"] == 3 and plan[4]["mtp_lr_mult"] == 10.0
    with pytest.raises(train_run.TrainConfigError, match="no MCTP module"):
        train_run.check_stage(plan[2], 10**6, 2, 2**34)
    with pytest.raises(train_run.TrainConfigError, match="zero_stage: 3"):
        train_run.check_stage(plan[1], 7 * 10**9, 2, 32 * 2**30)
    train_run.check_stage(plan[1], 7 * 10**9, 2, 80 * 2**30)
    with pytest.raises(train_run.TrainConfigError, match="no Parquet shards"):
        train_run.check_shards(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["x"], "input_ids": [[1, 2]]}), tmp_path / "bad.parquet")
    with pytest.raises(train_run.TrainConfigError, match="lacks columns"):
        train_run.check_shards(tmp_path)
    with pytest.raises(train_run.TrainConfigError, match="not found"):
        train_run.load_recipe("nope")
