"""Batched decoding: requests of different lengths, modes and phases in one engine equal each run alone."""
from __future__ import annotations

import pytest
import torch

from pipeline.generate import DecodeEngine, EndEvent, GenerationRequest, SamplingParams, TokenEvent, generate
from pipeline.llm import load_llm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(shared_dir):
    return load_llm(shared_dir / "parity" / "llm" / "model", dtype=torch.float32)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 426, (n,), generator=g).tolist()


REQUESTS = [  # (prompt length, mode, max_new_tokens, repetition penalty, join at step)
    (29, "boost", 40, 1.0, 0),
    (7, "vanilla", 25, 1.05, 0),
    (13, [2, 3, 1, 12], 33, 1.0, 0),
    (3, "turbo", 30, 1.05, 3),
    (21, "exact", 28, 1.0, 5),
    (11, "balance", 36, 1.0, 9),
    (5, "exact", 20, 1.05, 12),
]


def _run_batched(model, specs, max_batch_size: int = 16, profile: bool = False):
    engine = DecodeEngine(model, max_batch_size=max_batch_size, profile=profile)
    ids: dict[str, list[int]] = {}
    ends: dict[str, EndEvent] = {}
    step = 0
    pending = list(enumerate(specs))
    while pending or engine.has_unfinished():
        for i, (n, mode, max_new, rp, join) in [p for p in pending if p[1][4] <= step]:
            engine.add_request(GenerationRequest(
                _prompt(n, i), mode=mode, max_new_tokens=max_new,
                sampling=SamplingParams(repetition_penalty=rp), request_id=f"r{i}",
            ))
            ids[f"r{i}"] = []
        pending = [p for p in pending if p[1][4] > step]
        for event in engine.step():
            if isinstance(event, TokenEvent):
                ids[event.request_id].append(event.token_id)
            elif isinstance(event, EndEvent):
                ends[event.request_id] = event
        step += 1
        assert step < 500, "engine did not finish"
    return ids, ends, engine


@pytest.mark.parametrize("max_batch_size,attn", [(16, "sdpa"), (3, "sdpa"), (16, "eager")])
def test_batched_greedy_equals_alone(shared_dir, max_batch_size, attn):
    model = load_llm(shared_dir / "parity" / "llm" / "model", dtype=torch.float32)
    model.config._attn_implementation = attn
    ids, ends, engine = _run_batched(model, REQUESTS, max_batch_size=max_batch_size, profile=True)
    assert max(G for _, G, _, _ in engine.forward_log) > 1, "no forward ran more than one request"
    for i, (n, mode, max_new, rp, _) in enumerate(REQUESTS):
        alone = generate(model, _prompt(n, i), mode=mode, max_new_tokens=max_new, sampling=SamplingParams(repetition_penalty=rp))
        assert ids[f"r{i}"] == alone.ids, f"request {i} ({mode})"
        usage = ends[f"r{i}"].usage
        assert usage["backbone_forwards"] == alone.backbone_forwards
        assert usage["mtp_forwards_per_module"] == alone.usage["mtp_forwards_per_module"]
        assert usage["backbone_positions"] == alone.usage["backbone_positions"]


def test_groups_mix_prefill_catchup_and_modules(model):
    """One step runs one padded forward per group: backbone (prefill / 1 token / catch-up) and each module k."""
    _, _, engine = _run_batched(model, REQUESTS[:5], profile=True)
    kinds = {kind for kind, G, _, _ in engine.forward_log if G > 1}
    assert "backbone" in kinds and any(k.startswith("mtp") for k in kinds)
    assert any(kind == "backbone" and G > 1 and Q > 1 for kind, G, Q, _ in engine.forward_log)


def test_sampled_batch_equals_alone_with_seeds(model):
    specs = [(9, "boost", 20, 1.0, 0), (17, "vanilla", 15, 1.0, 0), (4, "exact", 18, 1.0, 2)]
    engine = DecodeEngine(model)
    ids = {}
    for i, (n, mode, max_new, _, _) in enumerate(specs):
        sampling = SamplingParams(greedy=False, temperature=0.9, top_k=40, seed=100 + i)
        engine.add_request(GenerationRequest(_prompt(n, i), mode=mode, max_new_tokens=max_new, sampling=sampling, request_id=f"s{i}"))
        ids[f"s{i}"] = []
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, TokenEvent):
                ids[event.request_id].append(event.token_id)
    for i, (n, mode, max_new, _, _) in enumerate(specs):
        sampling = SamplingParams(greedy=False, temperature=0.9, top_k=40, seed=100 + i)
        assert ids[f"s{i}"] == generate(model, _prompt(n, i), mode=mode, max_new_tokens=max_new, sampling=sampling).ids


def test_abort_in_a_batch_leaves_the_others_unchanged(model):
    engine = DecodeEngine(model)
    specs = [(10, "boost", 30), (6, "turbo", 30), (8, "vanilla", 30)]
    ids = {}
    for i, (n, mode, max_new) in enumerate(specs):
        engine.add_request(GenerationRequest(_prompt(n, i), mode=mode, max_new_tokens=max_new, request_id=f"a{i}"))
        ids[f"a{i}"] = []
    reasons = {}
    step = 0
    while engine.has_unfinished():
        if step == 6:
            engine.abort("a1")
        for event in engine.step():
            if isinstance(event, TokenEvent):
                ids[event.request_id].append(event.token_id)
            elif isinstance(event, EndEvent):
                reasons[event.request_id] = event.reason
        step += 1
    assert reasons == {"a0": "length", "a1": "aborted", "a2": "length"}
    assert len(ids["a1"]) == 6
    for i in (0, 2):
        n, mode, max_new = specs[i]
        assert ids[f"a{i}"] == generate(model, _prompt(n, i), mode=mode, max_new_tokens=max_new).ids


def test_bfloat16_batch_runs(shared_dir):
    """dtype is a parameter: the same engine in bfloat16 (what real checkpoints use on GPU)."""
    model = load_llm(shared_dir / "parity" / "llm" / "model", dtype=torch.float32)
    engine = DecodeEngine(model, dtype=torch.bfloat16)
    assert engine.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    for i, mode in enumerate(["vanilla", "boost", "exact"]):
        engine.add_request(GenerationRequest(_prompt(5 + 3 * i, i), mode=mode, max_new_tokens=15, request_id=mode))
    ids = {}
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, TokenEvent):
                ids.setdefault(event.request_id, []).append(event.token_id)
    assert {k: len(v) for k, v in ids.items()} == {"vanilla": 15, "boost": 15, "exact": 15}
    assert all(0 <= t < model.config.vocab_size for v in ids.values() for t in v)
