"""The Qwen2-MTP model (pipeline/llm.py) against the original's teacher-forced outputs (../shared/parity/llm).

Tolerances follow the fixture README: float32 re-implementations agree within ~1e-5, so 1e-4 on every array.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.llm  # noqa: F401  (registers qwen2_mtp with the Auto classes)
from pipeline.checkpoints import CheckpointError
from pipeline.llm import Qwen2MTPConfig, Qwen2MTPForCausalLM, load_llm

ATOL = RTOL = 1e-4
# Cases are parametrised from the fixture itself (same lookup as conftest.shared_dir).
PARITY = Path(os.environ.get("VITA_AUDIO_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "parity" / "llm"
_INPUTS = json.loads((PARITY / "inputs.json").read_text()) if (PARITY / "inputs.json").is_file() else {"models": {}}
MODELS = {name: spec["dir"] for name, spec in _INPUTS["models"].items()}
BIG = max(MODELS, key=lambda n: _INPUTS["models"][n]["mtp_modules"], default="mtp10")



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parity(llm_parity):
    return llm_parity


@pytest.fixture(scope="module")
def models(parity):
    return {name: load_llm(parity["root"] / d, dtype=torch.float32) for name, d in MODELS.items()}


def _close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    actual = actual.detach().float().cpu().numpy()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.abs(actual - expected).max())
    assert np.allclose(actual, expected, atol=ATOL, rtol=RTOL), f"{what}: max |diff| {diff:.3g}"


def _teacher_forced(model, ids: list[int]):
    """Full forward with labels, plus the backbone's per-layer states through hooks."""
    states = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: states.append(o))]
    for layer in model.model.layers[: model.num_backbone_layers - 1]:
        hooks.append(layer.register_forward_hook(lambda m, i, o: states.append(o)))
    x = torch.tensor([ids])
    try:
        with torch.no_grad():
            out = model(x, position_ids=torch.arange(len(ids))[None], labels=x, return_mtp_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return out, states[: model.num_backbone_layers]


def test_parity_models_were_collected(parity):
    """The parity tests are parametrised at collection time: an unreadable fixture must fail, not collect nothing."""
    assert MODELS and set(MODELS) == set(parity["inputs"]["models"])


@pytest.mark.parametrize("name", list(MODELS))
def test_teacher_forced_arrays_and_losses(parity, models, name):
    model, npz = models[name], parity["npz"]
    cases = parity["inputs"]["models"][name]["teacher_forced_cases"]
    assert cases, "fixture lists no teacher-forced case"
    for case in cases:
        prefix = f"{name}__{case}__"
        ids = npz[prefix + "input_ids"].tolist()
        out, layer_states = _teacher_forced(model, ids)
        L = len(ids)
        _close(out.logits[0], npz[prefix + "backbone_logits"], prefix + "backbone_logits")
        _close(out.hidden_states[0], npz[prefix + "backbone_hidden"], prefix + "backbone_hidden")
        states = torch.stack([s[0] for s in layer_states] + [out.hidden_states[0]])
        _close(states, npz[prefix + "backbone_layer_states"], prefix + "backbone_layer_states")
        for k in range(model.num_mtp_modules):
            rows = L - k - 1
            _close(out.mtp_layer_inputs[k][0, :rows], npz[f"{prefix}mtp{k}_layer_input"], f"{prefix}mtp{k}_layer_input")
            _close(out.mtp_hidden_states[k][0, :rows], npz[f"{prefix}mtp{k}_hidden"], f"{prefix}mtp{k}_hidden")
            _close(out.mtp_logits[k][0, :rows], npz[f"{prefix}mtp{k}_logits"], f"{prefix}mtp{k}_logits")
        ref = parity["tf"][name][case]
        assert float(out.loss) == pytest.approx(ref["total_loss"], abs=1e-4)
        assert float(out.backbone_loss) == pytest.approx(ref["backbone_loss"], abs=1e-4)
        for k in range(model.num_mtp_modules):
            assert float(out.mtp_losses[k]) == pytest.approx(ref[f"mtp{k}_loss"], abs=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations_agree(parity, attn):
    model = load_llm(parity["root"] / MODELS[BIG], dtype=torch.float32)
    model.config._attn_implementation = attn
    case = parity["inputs"]["models"][BIG]["teacher_forced_cases"][0]
    prefix = f"{BIG}__{case}__"
    ids = parity["npz"][prefix + "input_ids"].tolist()
    out, _ = _teacher_forced(model, ids)
    _close(out.logits[0], parity["npz"][prefix + "backbone_logits"], f"{attn} backbone_logits")
    k = model.num_mtp_modules - 1
    _close(out.mtp_logits[k][0, : len(ids) - k - 1], parity["npz"][f"{prefix}mtp{k}_logits"], f"{attn} mtp{k}_logits")


def test_auto_class_loads_without_remote_code_and_round_trips(parity, models, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(parity["root"] / MODELS[BIG], dtype=torch.float32)
    assert isinstance(auto, Qwen2MTPForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(parity["root"] / MODELS[BIG]), Qwen2MTPConfig)
    ref = models[BIG].state_dict()
    for key, value in auto.state_dict().items():
        assert torch.equal(value, ref[key]), key
    auto.save_pretrained(tmp_path / "saved")
    again = load_llm(tmp_path / "saved", dtype=torch.float32)
    assert set(again.state_dict()) == set(ref)
    for key, value in again.state_dict().items():
        assert torch.equal(value, ref[key]), key


def _tiny_config(**kw) -> Qwen2MTPConfig:
    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_nextn_predict_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    return Qwen2MTPConfig(**{**base, **kw})


def test_packed_samples_equal_separate_samples():
    torch.manual_seed(0)
    model = Qwen2MTPForCausalLM(_tiny_config()).eval()
    a, b = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (1, 7))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        out_p = model(packed, position_ids=pos, labels=packed, num_items_in_batch=1, return_mtp_logits=True)
        out_a = model(a, labels=a, num_items_in_batch=1, return_mtp_logits=True)
        out_b = model(b, labels=b, num_items_in_batch=1, return_mtp_logits=True)
    torch.testing.assert_close(out_p.logits[:, :9], out_a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.logits[:, 9:], out_b.logits, atol=1e-5, rtol=1e-5)
    for k in range(2):  # module k: rows with a token k+1 ahead in the same sample
        torch.testing.assert_close(out_p.mtp_logits[k][:, : 9 - k - 1], out_a.mtp_logits[k][:, : 9 - k - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_p.mtp_logits[k][:, 9 : 16 - k - 1], out_b.mtp_logits[k][:, : 7 - k - 1], atol=1e-5, rtol=1e-5)
    # summed CE (num_items_in_batch=1): the packed loss is the sum of the two samples' losses
    assert float(out_p.loss) == pytest.approx(float(out_a.loss) + float(out_b.loss), rel=1e-5)
    for k in range(2):
        assert float(out_p.mtp_losses[k]) == pytest.approx(float(out_a.mtp_losses[k] + out_b.mtp_losses[k]), rel=1e-5)


def test_frozen_lm_head_drops_main_loss_and_backbone_gradients():
    torch.manual_seed(1)
    model = Qwen2MTPForCausalLM(_tiny_config(mtp_loss_weight=0.5))
    model.train()
    model.lm_head.weight.requires_grad_(False)
    x = torch.randint(0, 96, (1, 12))
    out = model(x, labels=x)
    expected = 0.5 / 2 * (out.mtp_losses[0] + out.mtp_losses[1])
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    out.loss.backward()
    backbone = list(model.model.layers[:2].parameters()) + [model.model.embed_tokens.weight]
    assert all(p.grad is None or not p.grad.any() for p in backbone), "gradient reached the backbone"
    mtp = list(model.model.layers[2:].parameters()) + list(model.mtp_projs.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mtp)
    # trainable head (stage 4): main loss included and the backbone gets gradients
    model.zero_grad()
    model.lm_head.weight.requires_grad_(True)
    out = model(x, labels=x)
    assert float(out.loss.detach()) == pytest.approx(float((out.backbone_loss + 0.25 * sum(out.mtp_losses)).detach()), rel=1e-6)
    out.loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def _broken_copy(parity, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(parity["root"] / MODELS[BIG], folder)
    (folder / "model.safetensors").chmod(0o644)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_bad_checkpoints_name_the_problem(parity, tmp_path):
    missing = _broken_copy(parity, tmp_path / "a", lambda t: t.pop("mtp_projs.0.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*mtp_projs\.0\.weight"):
        load_llm(missing)
    wrong = _broken_copy(parity, tmp_path / "b", lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"wrong shape.*model\.norm\.weight"):
        load_llm(wrong)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(tmp_path / "nowhere")
    assert issubclass(CheckpointError, ValueError)
