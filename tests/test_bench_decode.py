"""`vita-audio bench decode`'s bookkeeping (benchmarks/decode.py) on the parity fixtures' model with the most
MCTP modules: forward classes, predicted time, ids stable across runs."""
from __future__ import annotations

import pytest
import torch

from pipeline.llm import load_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def big_model(llm_parity):
    models = llm_parity["inputs"]["models"]
    name = max(models, key=lambda n: models[n]["mtp_modules"])
    return load_llm(llm_parity["root"] / models[name]["dir"], dtype=torch.float32)


def test_bench_decode_plumbing(big_model):
    """The benchmark's bookkeeping on a tiny model: forward classes, predicted time, ids stable across runs."""
    from benchmarks.decode import bench_models, summarise

    timed = bench_models({"m": big_model}, {"m": ["vanilla", "boost", "exact"]}, [0] * 8, 24, runs=2)
    rows, step_ms = summarise(timed, 24)
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["vanilla"]["backbone_fwd"] == 24 and by_mode["boost"]["backbone_fwd"] < 24
    assert by_mode["exact"]["same_ids_as_vanilla"] and not by_mode["boost"]["same_ids_as_vanilla"]
    assert all(r["predicted_s"] > 0 and r["of_ceiling"] > 0 for r in rows)
    assert {"prefill", "backbone_1tok", "catchup_11tok", "mtp_first_use"} <= {c for _, c in step_ms}
