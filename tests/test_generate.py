"""The decode engine (pipeline/generate.py): parity with the original's generate, exact mode, events, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine.requests import AudioChunkEvent, EndEvent, GenerationRequest, TokenEvent
from pipeline.engine.decode_engine import DecodeEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.tokens.layout import default_layout
from pipeline.engine.schedules import expand_schedule, resolve_mode
from pipeline.engine.generate import generate
from pipeline.llm import load_llm
from pipeline.sizes import make_drafting_model

# Runs are parametrised from the fixture itself (same lookup as conftest.shared_dir), so a fixture set with
# other models, sizes or runs is checked the same way.
PARITY = Path(os.environ.get("VITA_AUDIO_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "parity" / "llm"
_INPUTS = json.loads((PARITY / "inputs.json").read_text()) if (PARITY / "inputs.json").is_file() else {"models": {}}
_GEN = json.loads((PARITY / "generation.json").read_text()) if (PARITY / "generation.json").is_file() else {}
MODELS = {name: spec["dir"] for name, spec in _INPUTS["models"].items()}
BIG = max(MODELS, key=lambda n: _INPUTS["models"][n]["mtp_modules"], default="mtp10")  # most MCTP modules
SMALL = min(MODELS, key=lambda n: _INPUTS["models"][n]["mtp_modules"], default="mtp1")
RUNS = [(name, run) for name in _GEN for run in _GEN[name]]
END_REASONS = {"max_new_tokens": "length", "eos": "stop"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parity(llm_parity):
    return llm_parity


@pytest.fixture(scope="module")
def models(parity):
    return {name: load_llm(parity["root"] / d, dtype=torch.float32) for name, d in MODELS.items()}


# --- parity with the original (../shared/parity/llm/generation.json) ----------------------------------------

def test_parity_runs_were_collected(parity):
    """The parity tests are parametrised at collection time: an unreadable fixture must fail, not collect nothing."""
    assert RUNS and set(MODELS) == set(parity["inputs"]["models"]) == set(parity["gen"])


@pytest.mark.parametrize("name,run", RUNS, ids=[f"{n}-{r}" for n, r in RUNS])
def test_generation_matches_original(parity, models, name, run):
    ref = parity["gen"][name][run]
    model = models[name]
    max_new = parity["inputs"]["max_new_tokens"]
    mode = ref["mtp_inference_mode"]
    if run.startswith("code_default") or ref.get("mode_source", "").startswith("attribute absent"):
        model = load_llm(parity["root"] / MODELS[name], dtype=torch.float32)
        model.name_or_path = ""  # no generation_config.json: the code default [1, N] applies
        mode = None
    stop = ref.get("eos_token_id_override") or parity["inputs"]["generation_settings"]["eos_token_id"]
    result = generate(
        model,
        parity["inputs"]["generation_prompt"],
        mode=mode,
        max_new_tokens=max_new,
        sampling=SamplingParams(greedy=True, repetition_penalty=ref["repetition_penalty"]),
        stop_ids=stop,
        trace=True,
        trace_logits=True,
    )
    assert result.ids == ref["generated_ids"]
    assert result.end_reason == END_REASONS[ref["end_reason"]]
    assert resolve_mode(mode, model) == ref["mtp_inference_mode"]
    if "schedule" in ref:
        assert expand_schedule(ref["mtp_inference_mode"], max_new) == ref["schedule"]
    counts, usage = ref["counts"], result.usage
    assert usage["forward_calls"] == counts["forward_calls"]
    assert usage["backbone_forwards"] == result.backbone_forwards == counts["backbone_calls"]
    assert usage["backbone_positions"] == counts["backbone_positions"]
    K = model.num_mtp_modules
    assert usage["mtp_forwards_per_module"] == [counts["mtp_calls_per_module"][f"mtp{k}"] for k in range(K)]
    assert usage["mtp_positions_per_module"] == [counts["mtp_positions_per_module"][f"mtp{k}"] for k in range(K)]
    assert result.mtp_forwards == sum(usage["mtp_forwards_per_module"])
    trace = ref.get("trace")
    if trace is not None:
        for key in ("producer", "q_len", "pos_first", "pos_last"):
            assert result.trace[key] == trace[key], key
    if "hidden_state_lengths" in ref:
        used = [k for k in range(K) if usage["mtp_forwards_per_module"][k]]
        expect = ref["hidden_state_lengths"]
        assert result.trace["hidden_state_lengths"][0] == expect[0]
        assert [result.trace["hidden_state_lengths"][k + 1] for k in used] == [expect[k + 1] for k in used]
    key = f"{name}__gen__{run.split('__')[0]}__step_logits"
    if ref["repetition_penalty"] == 1.0 and key in parity["npz"] and "eosprobe" not in run:
        logits = torch.stack(result.trace["logits"]).numpy()
        np.testing.assert_allclose(logits, parity["npz"][key], atol=1e-4, rtol=1e-4)


def test_eager_attention_gives_the_same_generation(parity):
    """The original breaks with eager/sdpa under MCTP; our explicit masks make eager agree with the fixture."""
    name, run = next((n, r) for n, r in RUNS if n == BIG and "trace" in _GEN[n][r] and "M" not in _GEN[n][r].get("schedule", "M")[1:2])
    ref = parity["gen"][name][run]
    model = load_llm(parity["root"] / MODELS[name], dtype=torch.float32)
    model.config._attn_implementation = "eager"
    result = generate(
        model, parity["inputs"]["generation_prompt"], mode=ref["mtp_inference_mode"],
        max_new_tokens=parity["inputs"]["max_new_tokens"], stop_ids=parity["inputs"]["generation_settings"]["eos_token_id"],
        sampling=SamplingParams(repetition_penalty=ref["repetition_penalty"]), trace=True,
    )
    assert "mtp0" in result.trace["producer"]
    assert result.ids == ref["generated_ids"]


def fixture_layout(parity):
    """The fixture's vocabulary layout (inputs.json) as a TokenLayout."""
    from pipeline.tokens.vocab import TokenLayout

    v = parity["inputs"]["vocab_layout"]
    ids = v["special_ids"]
    return TokenLayout(
        boa=ids["<|begin_of_audio|>"], eoa=ids["<|end_of_audio|>"], audio_offset=v["audio_offset"],
        codebook_size=v["audio_codes"], audio_placeholder=ids["<|audio|>"], im_start=ids["<|im_start|>"],
        im_end=ids["<|im_end|>"], endoftext=ids["<|endoftext|>"],
        eos_ids=tuple(parity["inputs"]["generation_settings"]["eos_token_id"]), vocab_size=v["padding_rows"][0],
    )


def test_default_layout_from_config(parity, models):
    """Without a tokenizer the layout is derived from config.json + generation_config.json (released order)."""
    expected, layout = fixture_layout(parity), default_layout(models[BIG])
    assert (layout.boa, layout.eoa, layout.audio_offset, layout.im_end, layout.endoftext, layout.eos_ids) == (
        expected.boa, expected.eoa, expected.audio_offset, expected.im_end, expected.endoftext, expected.eos_ids)
    if expected.codebook_size & (expected.codebook_size - 1) == 0:  # the size heuristic: largest power of two
        assert layout.codebook_size == expected.codebook_size


# --- schedules -----------------------------------------------------------------------------------------------


def test_schedules_and_modes(models):
    model = models[BIG]
    assert expand_schedule([8192, 0], 12) == expand_schedule([1, 0], 12) == "M" * 12
    assert expand_schedule([1, 10, 4, 10], 30) == "M" + "m" * 10 + "MMMM" + "m" * 10 + "MMMM" + "m"
    assert expand_schedule([2, 3, 1, 12], 20) == "MMmmm" + "M" + "m" * 12 + "Mm"
    assert resolve_mode("boost", model) == [1, 10, 4, 10]
    assert resolve_mode("Turbo", model) == [1, 10]
    assert resolve_mode("1,4,3,8,4,10", model) == [1, 4, 3, 8, 4, 10]
    assert resolve_mode([2, 3, 1, 12], model) == [2, 3, 1, 12]
    assert resolve_mode("exact", model) == "exact"
    saved = json.loads((PARITY / MODELS[BIG] / "generation_config.json").read_text()).get("mtp_inference_mode")
    assert resolve_mode(None, model) == (saved or [1, model.num_mtp_modules])  # the checkpoint's default
    for bad, match in [
        ("fast", "unknown mode 'fast'"),
        ("1,2,3", "even length"),
        ([0, 10], "must start with a backbone step"),
        ([1, -2], "negative"),
        ([1, 2, 0, 0], r"must not be \(0, 0\)"),
        (3.5, "mode must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_mode(bad, model)


def test_mode_with_fewer_modules_falls_back_to_backbone(models, parity):
    """Turbo [1, 10] with K < 10 modules: the step that would need module K runs the backbone, then module 0
    again (the original's quirk; K = 1 alternates backbone / module 0)."""
    K = models[SMALL].num_mtp_modules
    if K >= 10:
        pytest.skip("needs a model with fewer than 10 modules")
    result = generate(models[SMALL], parity["inputs"]["generation_prompt"], mode="turbo", max_new_tokens=2 * K + 3, trace=True)
    burst = ["backbone"] + [f"mtp{k}" for k in range(K)]
    assert result.trace["producer"] == (burst * 3)[: 2 * K + 3]


# --- exact (lossless) MCTP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.0, 1.05])
def test_exact_equals_vanilla_on_random_model(parity, models, penalty):
    prompt = parity["inputs"]["generation_prompt"]
    sampling = SamplingParams(repetition_penalty=penalty)
    for name in MODELS:
        vanilla = generate(models[name], prompt, mode="vanilla", max_new_tokens=40, sampling=sampling)
        exact = generate(models[name], prompt, mode="exact", max_new_tokens=40, sampling=sampling)
        boost = generate(models[name], prompt, mode="boost", verify=True, max_new_tokens=40, sampling=sampling)
        assert exact.ids == vanilla.ids == boost.ids
        assert exact.usage["generated_tokens"] == 40


@pytest.mark.parametrize("broken", [(), (3,), (0, 6)])
def test_exact_uses_fewer_backbone_forwards_when_drafts_agree(parity, broken):
    model = make_drafting_model(load_llm(parity["root"] / MODELS[BIG], dtype=torch.float32), broken)
    prompt = parity["inputs"]["generation_prompt"]
    for penalty in (1.0, 1.05):
        sampling = SamplingParams(repetition_penalty=penalty)
        vanilla = generate(model, prompt, mode="vanilla", max_new_tokens=60, sampling=sampling)
        exact = generate(model, prompt, mode="exact", max_new_tokens=60, sampling=sampling)
        assert exact.ids == vanilla.ids
        first_broken = min(broken, default=model.num_mtp_modules)
        if first_broken > 0:
            assert exact.usage["accepted_drafts"] > 0
            assert exact.backbone_forwards < vanilla.backbone_forwards
            assert exact.usage["acceptance_length"] > 1.0
        assert exact.usage["acceptance_length"] <= first_broken


def test_exact_sampling_is_seeded_and_follows_the_backbone(parity):
    model = make_drafting_model(load_llm(parity["root"] / MODELS[BIG], dtype=torch.float32))
    prompt = parity["inputs"]["generation_prompt"]
    sampling = SamplingParams(greedy=False, temperature=0.7, top_k=3, seed=5)
    a = generate(model, prompt, mode="exact", max_new_tokens=40, sampling=sampling, trace=True)
    b = generate(model, prompt, mode="exact", max_new_tokens=40, sampling=sampling)
    assert a.ids == b.ids
    assert a.usage["accepted_drafts"] > 0
    # every emitted token is among the backbone's top-3 at its position (top_k=3 is the backbone's, not a draft's)
    ids = torch.tensor([prompt + a.ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(tok in top3[i].tolist() for i, tok in enumerate(a.ids))


# --- sampling, stop ids, events ------------------------------------------------------------------------------


def test_sampling_is_seeded_per_request(parity, models):
    prompt = parity["inputs"]["generation_prompt"]
    run = lambda seed, mode: generate(  # noqa: E731
        models[BIG], prompt, mode=mode, max_new_tokens=30,
        sampling=SamplingParams(greedy=False, temperature=1.3, top_p=0.9, seed=seed),
    ).ids
    assert run(1, "boost") == run(1, "boost")
    assert run(1, "boost") != run(2, "boost")
    greedy = generate(models[BIG], prompt, mode="boost", max_new_tokens=30).ids
    assert run(1, "boost") != greedy


def test_events_audio_chunks_and_stop(parity, models):
    model, layout = models[BIG], fixture_layout(parity)
    engine = DecodeEngine(model, layout=layout)
    request = GenerationRequest(parity["inputs"]["generation_prompt"], mode="boost", max_new_tokens=37, constraint="interleaved")
    events = list(engine.stream(request))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    chunks = [e for e in events if isinstance(e, AudioChunkEvent)]
    end = events[-1]
    assert isinstance(end, EndEvent) and end.reason == "length" and len(tokens) == 37
    ids = [t.token_id for t in tokens]
    # Boost layout: T [a x8] TTTT [a x8] TTTT [a x8] ... ; 37 tokens end inside the third span (flushed)
    K = min(model.num_mtp_modules, 10)
    assert [t.producer for t in tokens[: K + 1]] == ["backbone"] + [f"mtp{k}" for k in range(K)]
    assert ids[1] == layout.boa and ids[10] == layout.eoa and ids[15] == layout.boa and ids[24] == layout.eoa
    assert all(layout.is_audio(i) for i in ids[2:10] + ids[16:24] + ids[30:37])
    assert [len(c.codes) for c in chunks] == [8, 8, 7]
    assert chunks[0].codes == [i - layout.audio_offset for i in ids[2:10]]
    assert all(t.is_audio == layout.is_audio(t.token_id) for t in tokens)
    # a stop id ends the stream after that token, with reason "stop"
    stop = ids[5]
    result = generate(model, parity["inputs"]["generation_prompt"], mode="boost", max_new_tokens=37, stop_ids=[stop],
                      constraint="interleaved", layout=layout)
    assert result.ids == ids[:6] and result.end_reason == "stop"


def test_text_constraint_forbids_audio(parity, models):
    layout = fixture_layout(parity)
    free = generate(models[BIG], parity["inputs"]["generation_prompt"], mode="turbo", max_new_tokens=60, layout=layout)
    assert any(layout.is_audio(i) or i in (layout.boa, layout.eoa) for i in free.ids)  # the random model emits audio
    text = generate(models[BIG], parity["inputs"]["generation_prompt"], mode="turbo", max_new_tokens=60, constraint="text",
                    layout=layout)
    assert not any(layout.is_audio(i) or i in (layout.boa, layout.eoa) for i in text.ids)


def test_abort_frees_and_reports(parity, models):
    engine = DecodeEngine(models[BIG])
    rid = engine.add_request(GenerationRequest(parity["inputs"]["generation_prompt"], mode="boost", max_new_tokens=50))
    engine.step()
    engine.step()
    engine.abort(rid)
    events = engine.step()
    assert [type(e) for e in events] == [EndEvent] and events[0].reason == "aborted"
    assert events[0].usage["generated_tokens"] == 2
    assert not engine.has_unfinished()
    engine.abort("unknown")  # no-op


def test_bad_input_names_the_problem(models):
    model = models[BIG]
    V = model.config.vocab_size
    for kwargs, match in [
        (dict(prompt_ids=[]), "prompt_ids must be a non-empty"),
        (dict(prompt_ids=[1, V]), rf"out of range \[0, {V}\): \[{V}\]"),
        (dict(prompt_ids=[1, -1]), "out of range"),
        (dict(prompt_ids="hello"), "prompt_ids must be"),
        (dict(prompt_ids=[1, 2], mode="warp"), "unknown mode 'warp'"),
        (dict(prompt_ids=[1, 2], max_new_tokens=0), "max_new_tokens must be"),
        (dict(prompt_ids=[1, 2], constraint="audio"), "constraint must be one of"),
        (dict(prompt_ids=[1, 2], stop_ids=["x"]), "stop_ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            DecodeEngine(model).add_request(GenerationRequest(**kwargs))
    for kwargs, match in [
        (dict(temperature=0.0, greedy=False), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(seed=-3), "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)


# --- command line and benchmark plumbing ---------------------------------------------------------------------


def test_cli_generate(parity, models, capsys):
    from cli.main import main

    llm = str(parity["root"] / MODELS[BIG])
    runs = parity["gen"][BIG]
    prompt = ",".join(map(str, parity["inputs"]["generation_prompt"]))
    stops = ",".join(map(str, parity["inputs"]["generation_settings"]["eos_token_id"]))
    ref = next(r for r in runs.values() if "trace" in r and r["mtp_inference_mode"][1] > 0)
    assert main(["generate", "--llm", llm, "--prompt-ids", prompt, "--mode", ",".join(map(str, ref["mtp_inference_mode"])),
                 "--max-new-tokens", "20", "--greedy", "--repetition-penalty", str(ref["repetition_penalty"]),
                 "--stop-ids", stops, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ids"] == ref["generated_ids"][:20]
    assert out["backbone_forwards"] == ref["trace"]["producer"][:20].count("backbone")
    assert out["mtp_forwards"] == 20 - out["backbone_forwards"]
    vanilla = next(r for r in runs.values() if r["mtp_inference_mode"][1] == 0)
    assert main(["generate", "--llm", llm, "--prompt-ids", prompt, "--exact", "--max-new-tokens", "12", "--greedy",
                 "--repetition-penalty", str(vanilla["repetition_penalty"]), "--stop-ids", stops, "--json"]) == 0
    exact = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exact["ids"] == vanilla["generated_ids"][:12]
    V = models[BIG].config.vocab_size
    for argv, match in [
        (["--prompt-ids", f"1,{V}"], "out of range"),
        (["--prompt-ids", ","], "--prompt-ids is empty"),
        (["--prompt-ids", "1,a"], "comma-separated integers"),
        (["--prompt-ids", "1,2", "--mode", "fast"], "unknown mode 'fast'"),
    ]:
        assert main(["generate", "--llm", llm, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: weight-loading progress)
        assert err.startswith("vita-audio generate: error:") and match in err
    assert main(["generate", "--llm", str(parity["root"]), "--prompt-ids", "1"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_interleaved_constraint_slots_follow_the_ratio(parity):
    """Slot kinds per generated index: each (T, A) pair in order, then the last pair repeats (spec §2.3)."""
    from pipeline.engine.sampling import OutputConstraint

    layout = fixture_layout(parity)
    constraint = OutputConstraint("interleaved", layout, layout.vocab_size, "cpu", ratio=[2, 3, 1, 4, 3, 5])
    pair = lambda t, a: ["text"] * t + ["boa"] + ["audio"] * (a - 2) + ["eoa"]  # noqa: E731
    expected = pair(2, 3) + pair(1, 4) + pair(3, 5) * 3
    assert [constraint.slot(i) for i in range(len(expected))] == expected
    assert constraint.ranges["audio"] == (layout.audio_offset, layout.audio_offset + layout.codebook_size, True)
    assert constraint.ranges["boa"] == (layout.boa, layout.boa + 1, True)
    lo, hi, exact = constraint.ranges["text"]  # text ids around BOA/EOA: a range with holes
    assert lo == 0 and hi > layout.boa and not exact
    assert OutputConstraint("text", layout, layout.vocab_size, "cpu").slot(12345) == "text"
