"""Chunked prefill: a long prompt is read in pieces between the other requests' steps, with unchanged ids; prompts
that do not fit the model's positions are refused in tokens."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_probes import ForwardLog
from pipeline.engine.decode_engine import PREFILL_CHUNK_TOKENS, DecodeEngine
from pipeline.engine.observe import RequestTrace
from pipeline.engine.requests import EndEvent, GenerationRequest, TokenEvent
from pipeline.engine.sampling import SamplingParams
from pipeline.llm import load_llm
from pipeline.sizes import make_drafting_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODES = ["vanilla", "boost", "turbo", "exact", [2, 3, 1, 12]]


@pytest.fixture(scope="module")
def model(shared_dir):
    return load_llm(shared_dir / "parity" / "llm" / "model", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return load_llm(tiny_models / "llm", dtype=torch.float32)


def _prompt(n: int, seed: int, vocab: int = 426) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _run(model, specs, chunk, observer=None, joins=None):
    """specs: (prompt, mode, max_new, repetition penalty); request i joins at step joins[i] (default 0).
    Returns ids, end events and, per step, the requests that got a token in it."""
    engine = DecodeEngine(model, prefill_chunk_tokens=chunk, observer=observer)
    joins = joins or [0] * len(specs)
    ids = {f"r{i}": [] for i in range(len(specs))}
    ends, emitted, step = {}, [], 0
    while step <= max(joins) or engine.has_unfinished():
        for i, (prompt, mode, max_new, rp) in enumerate(specs):
            if joins[i] == step:
                engine.add_request(GenerationRequest(prompt, mode=mode, max_new_tokens=max_new, stop_ids=[],
                                                     sampling=SamplingParams(repetition_penalty=rp), request_id=f"r{i}"))
        got = set()
        for event in engine.step():
            if isinstance(event, TokenEvent):
                ids[event.request_id].append(event.token_id)
                got.add(event.request_id)
            elif isinstance(event, EndEvent):
                ends[event.request_id] = event
        emitted.append(got)
        step += 1
        assert step < 2000, "engine did not finish"
    return ids, ends, emitted


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("rp", [1.0, 1.05])
def test_chunked_prefill_gives_the_same_ids(model, mode, rp):
    """One long prompt, chunk 16 (pieces of the backbone prefill and of every module's catch-up): the ids and
    the positions the backbone read equal the unchunked run's; only the forward count grows by the pieces, of at
    most 16 tokens (fewer deeper into the prompt, where a row attends to more positions)."""
    spec = [(_prompt(150, 7), mode, 40, rp)]
    whole, whole_end, _ = _run(model, spec, 0)
    log = ForwardLog()
    chunked, chunked_end, emitted = _run(model, spec, 16, observer=log)
    assert chunked == whole
    a, b = whole_end["r0"].usage, chunked_end["r0"].usage
    assert a["backbone_positions"] == b["backbone_positions"]
    assert a["mtp_positions_per_module"] == b["mtp_positions_per_module"]
    prefill = [Q for kind, G, Q in log.forwards if kind == "prefill"]
    assert prefill[0] == 16 and max(prefill) == 16 and sum(prefill) == 150 and len(prefill) >= 10
    n = len(prefill)
    assert b["backbone_forwards"] == a["backbone_forwards"] + n - 1  # n pieces instead of 1 forward
    assert not any(emitted[: n - 1]), "a token came before the last piece of the prompt"
    assert "r0" in emitted[n - 1]
    if mode != "vanilla":  # module catch-ups over the prompt come in pieces of up to 16 x 2 backbone layers rows
        pieces = [Q for kind, G, Q in log.forwards if kind.startswith("prefill-mtp")]
        assert pieces and 16 < max(pieces) <= 32


def test_long_prompt_does_not_stall_the_others(model):
    """A batch mixing a long prompt (joining mid-way) with short ones: the short ones get a token in every step
    while the long one prefills, and every request's ids equal its unchunked run's."""
    specs = [(_prompt(9, 1), "boost", 60, 1.0), (_prompt(5, 2), "vanilla", 60, 1.05), (_prompt(12, 3), "exact", 60, 1.0),
             (_prompt(300, 4), "boost", 30, 1.0), (_prompt(7, 5), [2, 3, 1, 12], 40, 1.0)]
    joins = [0, 0, 1, 3, 6]
    log = ForwardLog()
    chunked, _, emitted = _run(model, specs, 16, observer=log, joins=joins)
    whole, _, _ = _run(model, specs, 0, joins=joins)
    assert chunked == whole
    first_long = next(i for i, got in enumerate(emitted) if "r3" in got)
    assert first_long >= 3 + 300 // 16  # one piece per step
    for step in range(4, first_long):  # the short ones (not the exact one: it emits in bursts) keep going
        assert {"r0", "r1"} <= emitted[step], f"step {step}: {emitted[step]}"
    # the pieces run as a forward of their own: the others' one-token rows are never padded to a piece's length
    assert all(Q <= 16 for kind, G, Q in log.forwards if kind == "prefill")
    assert all(Q < 16 for kind, G, Q in log.forwards if kind == "backbone" and G > 1)


def test_two_long_prompts_share_one_budget_oldest_first(model):
    """Pieces of a step share one budget: the older long prompt is read first, the newer one after it (before
    the older one's MCTP catch-up: first tokens go first)."""
    log = ForwardLog()
    specs = [(_prompt(100, 8), "boost", 10, 1.0), (_prompt(90, 9), "vanilla", 10, 1.0), (_prompt(4, 10), "boost", 20, 1.0)]
    chunked, _, emitted = _run(model, specs, 16, observer=log)
    assert chunked == _run(model, specs, 0)[0]
    prefill = [(G, Q) for kind, G, Q in log.forwards if kind == "prefill"]
    assert all(G == 1 or Q < 16 for G, Q in prefill)  # a step's pieces hold at most 16 tokens together
    first = {r: next(i for i, got in enumerate(emitted) if r in got) for r in ("r0", "r1", "r2")}
    assert first["r2"] == 0 and first["r0"] < first["r1"]


@pytest.mark.parametrize("mode", ["boost", "exact", "vanilla"])
def test_tiny_model_chunked_equals_whole(tiny, mode):
    vocab = tiny.config.vocab_size
    specs = [(_prompt(200, 11, vocab), mode, 24, 1.0), (_prompt(6, 12, vocab), "turbo", 30, 1.0)]
    assert _run(tiny, specs, 32, joins=[0, 2])[0] == _run(tiny, specs, 0, joins=[0, 2])[0]


def test_exact_on_a_drafting_model_with_chunks(shared_dir):
    """Drafts that are accepted (so caches roll forward and back) after a chunked prefill and catch-up."""
    drafting = make_drafting_model(load_llm(shared_dir / "parity" / "llm" / "model", dtype=torch.float32),
                                   backbone_scale=0.0)
    specs = [(_prompt(120, 13), "exact", 40, 1.0), (_prompt(8, 14), "exact", 40, 1.0)]
    ids, ends, _ = _run(drafting, specs, 8, joins=[0, 1])
    assert ids == _run(drafting, specs, 0, joins=[0, 1])[0]
    assert ends["r0"].usage["accepted_drafts"] > 0


def test_trace_shows_the_pieces(model):
    """The per-request trace lists each piece as a backbone forward over consecutive positions."""
    trace = RequestTrace()
    _run(model, [(_prompt(40, 15), "boost", 5, 1.0)], 16, observer=trace)
    t = trace.pop("r0")
    n = next(i for i, p in enumerate(t["pos_first"]) if p + t["q_len"][i] == 40) + 1  # the last piece
    assert t["producer"][:n] == ["backbone"] * n and t["q_len"][0] == 16 and sum(t["q_len"][:n]) == 40
    assert t["pos_first"][:n] == [sum(t["q_len"][:i]) for i in range(n)]


def test_prompt_cap_in_tokens(model):
    """A prompt that does not fit the model's positions beside max_new_tokens is refused, naming the numbers."""
    positions = model.config.max_position_embeddings
    engine = DecodeEngine(model)
    with pytest.raises(ValueError, match=rf"prompt of 11 tokens with max_new_tokens={positions - 10}.*{positions} positions.*at most 10"):
        engine.add_request(GenerationRequest([1] * 11, max_new_tokens=positions - 10))
    engine.add_request(GenerationRequest([1] * 10, max_new_tokens=positions - 10))  # fits exactly


def test_pieces_get_shorter_deep_into_the_prompt(tiny):
    """Deeper into a prompt a row attends to more positions, so pieces hold fewer tokens (each costs about what
    the chunk costs from position 0), never fewer than chunk / 8."""
    log = ForwardLog()
    ids, _, _ = _run(tiny, [(_prompt(1500, 16, tiny.config.vocab_size), "vanilla", 2, 1.0)], 64, observer=log)
    pieces = [Q for kind, G, Q in log.forwards if kind == "prefill"]
    assert pieces[0] == 64 and sum(pieces) == 1500
    assert all(a >= b for a, b in zip(pieces[:-2], pieces[1:-1])) and 8 <= pieces[-2] < 32


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8", "off"])
def test_prefill_chunk_setting_is_checked(model, bad):
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        DecodeEngine(model, prefill_chunk_tokens=bad)
    assert DecodeEngine(model, prefill_chunk_tokens=None).prefill_chunk_tokens == 0
    assert DecodeEngine(model, prefill_chunk_tokens=0).prefill_chunk_tokens == 0
    assert DecodeEngine(model).prefill_chunk_tokens == PREFILL_CHUNK_TOKENS["cpu"]


def test_bench_prefill_runs(tmp_path):
    """`vita-audio bench prefill --quick` in a subprocess (tests never import benchmarks/): a report whose rows
    compare chunk settings, with the long request's ids the same in each."""
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "prefill", "--quick", "--chunks", "0,64",
                           "--out", str(tmp_path), "--json"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["prefill_chunk_tokens"] for r in result["rows"]] == [0, 64] and result["same_ids"] is True
    assert all(r["ttft_ms_with"] > 0 and r["ttft_ms_without"] > 0 for r in result["rows"])
    assert result["rows"][1]["long_prefill_steps"] > 1 == result["rows"][0]["long_prefill_steps"]
    for name in ("prefill.json", "prefill.md", "prefill.png"):
        assert (tmp_path / name).is_file()
