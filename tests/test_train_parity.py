"""Training parity with the original (../shared/parity/llm_train): loss, every CE and every gradient of one
packed row of three samples, in both stage semantics (`full`: everything trainable; `frozen_llm`: the
language model frozen with the MCTP parts re-enabled, stages 2-3)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.llm import load_llm

MODELS = {"mtp10": "model", "mtp1": "model_mtp1"}


@pytest.fixture(scope="module")
def train_parity(shared_dir):
    root = shared_dir / "parity" / "llm_train"
    return {
        "npz": np.load(root / "train_expected.npz"),
        "inputs": json.loads((root / "train_inputs.json").read_text()),
        "llm": shared_dir / "parity" / "llm",
    }


def run_step(train_parity, name: str, case: str, across: bool):
    from jobs.train.stage_rules import freeze_for_stage

    torch.manual_seed(0)
    model = load_llm(train_parity["llm"] / MODELS[name], dtype=torch.float32).train()
    model.config.mtp_loss_across_samples = across
    if case == "frozen_llm":
        freeze_for_stage(model, language_model_frozen=True)
    z = train_parity["npz"]
    batch = {k: torch.from_numpy(z[f"{name}__{k}"]) for k in ("input_ids", "position_ids", "labels")}
    out = model(**batch)
    out.loss.backward()
    return model, out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("case", ["full", "frozen_llm"])
def test_loss_and_gradients_match_the_original(train_parity, name, case):
    z = train_parity["npz"]
    model, out = run_step(train_parity, name, case, across=True)
    prefix = f"{name}__{case}__"
    np.testing.assert_allclose(out.loss.item(), z[prefix + "loss"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(out.backbone_loss.item(), z[prefix + "backbone_loss"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(torch.stack(out.mtp_losses).detach().numpy(), z[prefix + "mtp_losses"], atol=1e-5, rtol=1e-6)

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {k[len(prefix + "grad__"):] for k in z.files if k.startswith(prefix + "grad__")}
    assert with_grad == expected
    no_grad = set(train_parity["inputs"]["models"][name]["cases"][case].get("no_grad", []))
    assert {n for n, _ in model.named_parameters()} - with_grad == no_grad
    for n, p in model.named_parameters():
        if p.grad is not None:
            np.testing.assert_allclose(p.grad.numpy(), z[prefix + "grad__" + n], atol=1e-4, rtol=1e-4, err_msg=n)


def test_within_sample_default_scores_only_pairs_inside_a_sample(train_parity):
    """Default (False): mtp10's CE_k equal the README's `CE within` column (the samples' own terms); the
    modules without cross pairs (0..2) equal the original, the others differ from it by far more than 1e-5."""
    z = train_parity["npz"]
    _, out = run_step(train_parity, "mtp10", "full", across=False)
    ce = torch.stack(out.mtp_losses).detach().numpy()
    within = [13.24819, 12.04034, 12.2807, 11.89115, 13.05248, 12.56905, 13.19227, 11.77945, 14.00392, 17.45875]
    np.testing.assert_allclose(ce, within, atol=2e-5)
    np.testing.assert_allclose(out.loss.item(), 25.22725, atol=2e-5)
    orig = z["mtp10__full__mtp_losses"]
    np.testing.assert_allclose(ce[:3], orig[:3], atol=1e-5)
    assert np.all(np.abs(ce[3:] - orig[3:]) > 1e-2)
