"""Batched decoding: requests of different lengths, modes and phases in one engine equal each run alone."""
from __future__ import annotations

import pytest
import torch

from engine_probes import ForwardLog
from pipeline.engine.decode_engine import DecodeEngine
from pipeline.engine.requests import EndEvent, GenerationRequest, TokenEvent
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.generate import generate
from pipeline.engine.observe import RequestTrace
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


def _run_batched(model, specs, max_batch_size: int = 16, align_steps: int = 0):
    engine = DecodeEngine(model, max_batch_size=max_batch_size, align_steps=align_steps, observer=ForwardLog())
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


@pytest.mark.parametrize("max_batch_size,attn,align_steps", [(16, "sdpa", 0), (3, "sdpa", 0), (16, "eager", 0),
                                                               (16, "sdpa", 16)])
def test_batched_greedy_equals_alone(shared_dir, max_batch_size, attn, align_steps):
    model = load_llm(shared_dir / "parity" / "llm" / "model", dtype=torch.float32)
    model.config._attn_implementation = attn
    ids, ends, engine = _run_batched(model, REQUESTS, max_batch_size=max_batch_size, align_steps=align_steps)
    assert max(G for _, G, _ in engine.observer.forwards) > 1, "no forward ran more than one request"
    for i, (n, mode, max_new, rp, _) in enumerate(REQUESTS):
        alone = generate(model, _prompt(n, i), mode=mode, max_new_tokens=max_new, sampling=SamplingParams(repetition_penalty=rp))
        assert ids[f"r{i}"] == alone.ids, f"request {i} ({mode})"
        usage = ends[f"r{i}"].usage
        assert usage["backbone_forwards"] == alone.backbone_forwards
        assert usage["mtp_forwards_per_module"] == alone.usage["mtp_forwards_per_module"]
        assert usage["backbone_positions"] == alone.usage["backbone_positions"]


def test_groups_mix_prefill_catchup_and_modules(model):
    """A step runs at most two padded forwards: the backbone (prefill / 1 token / catch-up, mixed) and the MCTP
    modules (different modules in one forward), then one lm_head over all their rows."""
    _, _, engine = _run_batched(model, REQUESTS[:5])
    log = engine.observer.forwards
    kinds = {kind for kind, G, _ in log if G > 1}
    assert "backbone" in kinds and any(k.startswith("mtp") for k in kinds)
    assert any(kind == "backbone" and G > 1 and Q > 1 for kind, G, Q in log)
    assert any(kind.startswith("mtp") and "," in kind for kind in kinds), "no forward mixed two modules"
    steps, forwards = [], 0  # forwards between two lm_head calls = forwards of one step
    for kind, *_ in log:
        if kind == "lm_head":
            steps.append(forwards)
            forwards = 0
        else:
            forwards += 1
    assert max(steps) == 2 and min(steps) == 1


@pytest.mark.parametrize("gather_limit", [0, 1 << 30], ids=["per-module", "gathered"])
def test_mixed_module_forward_equals_each_module(model, monkeypatch, gather_limit):
    """run_mtp_modules (both ways: per-module projections, gathered weights) equals run_mtp_module row by row,
    also on a second call that attends to the K/V the first one wrote to the pool."""
    import pipeline.kernels.cpu
    from pipeline.engine.kv_cache import BatchKV, KVPool, group_attention_mask

    monkeypatch.setattr(pipeline.kernels.cpu, "MTP_GATHER_MAX_ELEMENTS", gather_limit)
    model.set_decode_kernels("cpu")
    N, NB, H = model.num_mtp_modules, model.num_backbone_layers, model.config.hidden_size
    modules, past, q_lens = [0, N - 1, 1 % N, 0], [0, 0, 0, 0], [3, 2, 3, 1]
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(4, 3, H, generator=g), torch.randn(4, 3, H, generator=g)) for _ in range(2)]
    batched_pool, alone_pools = KVPool([1] * NB + [N], min_capacity=2), [KVPool([1] * NB + [N], min_capacity=2) for _ in modules]
    for _ in modules:
        batched_pool.acquire()
    for pool in alone_pools:
        pool.acquire()
    with torch.inference_mode():
        for hidden, embeds in calls:
            pos = torch.tensor(past)[:, None] + torch.arange(3)
            cache = BatchKV(batched_pool, [0, 1, 2, 3], past, q_lens, "cpu", modules=modules, entry=NB)
            mask = group_attention_mask(past, q_lens, torch.float32, "cpu")
            out = model.run_mtp_modules(modules, hidden, embeds, pos, mask, cache)
            for i, k in enumerate(modules):
                q = q_lens[i]
                cache = BatchKV(alone_pools[i], [0], [past[i]], [q], "cpu", modules=[k], entry=NB)
                mask = group_attention_mask([past[i]], [q], torch.float32, "cpu")
                alone = model.run_mtp_module(k, hidden[i : i + 1, :q], embeds[i : i + 1, :q], pos[i : i + 1, :q], mask, cache)
                torch.testing.assert_close(out[i, :q], alone[0], atol=1e-5, rtol=1e-5)
            past = [p + q for p, q in zip(past, q_lens)]  # grows past min_capacity: the pool reallocates


def test_kv_pool_grows_and_keeps_contents():
    from pipeline.engine.kv_cache import BatchKV, KVPool

    pool = KVPool([1, 3], min_capacity=2)
    slots = [pool.acquire() for _ in range(3)]
    written = {}
    for step in range(5):  # each write of 3 rows x 2 positions; capacity and slot count grow on the way
        key = torch.randn(3, 2, 2, 4)  # (G, kv_heads, Q, D)
        cache = BatchKV(pool, slots, [2 * step] * 3, [2] * 3, "cpu", modules=[2, 0, 1], entry=1)
        keys, values = cache.update(key, -key, layer_idx=7)  # entry fixes the pool entry, not layer_idx
        written[step] = key
        assert keys.shape == (3, 2, 2 * step + 2, 4)
        if step == 2:
            slots.append(pool.acquire())  # a fourth request joins: the slot dim grows at the next write
            slots = slots[:3]
    full = torch.cat([written[s] for s in range(5)], dim=2)  # (3, heads, 10, D)
    torch.testing.assert_close(keys, full)
    torch.testing.assert_close(values, -full)
    pool.release(1)
    assert pool.acquire() == 1  # the lowest free slot is reused


def test_new_request_waits_to_join_in_phase(model):
    """With align_steps, a request arriving mid-way through the others' MCTP run joins where its schedule lines
    up with theirs (one forward per step from then on) and its output is unchanged; without, it joins at once."""
    specs = [(9, "boost", 60), (12, "boost", 60)]
    results = {}
    for align in (0, 16):
        engine = DecodeEngine(model, align_steps=align, observer=ForwardLog())
        engine.add_request(GenerationRequest(_prompt(*specs[0][:1], 0), mode="boost", max_new_tokens=60, request_id="r0"))
        ids = {"r0": [], "r1": []}
        joined, step = None, 0
        while engine.has_unfinished():
            if step == 6:  # r0 is in its first MCTP run
                engine.add_request(GenerationRequest(_prompt(specs[1][0], 1), mode="boost", max_new_tokens=60, request_id="r1"))
            before = len(engine.observer.forwards)
            for event in engine.step():
                if isinstance(event, TokenEvent):
                    ids[event.request_id].append(event.token_id)
                    if event.request_id == "r1" and joined is None:
                        joined = step
            if joined is not None and joined < step and len(ids["r1"]) < 60 and len(ids["r0"]) < 60:
                forwards = [k for k, *_ in engine.observer.forwards[before:] if k != "lm_head"]
                results.setdefault(align, []).append(len(forwards))
            step += 1
        results[(align, "joined")] = joined
        for i, (n, mode, max_new) in enumerate(specs):
            assert ids[f"r{i}"] == generate(model, _prompt(n, i), mode=mode, max_new_tokens=max_new).ids
    assert results[(0, "joined")] == 6
    assert 6 < results[(16, "joined")] <= 6 + 16
    assert set(results[16]) == {1}, "aligned requests should share one forward per step"
    assert 2 in results[0]


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
    assert sorted(engine.kv.free) == [0, 1, 2] and engine.kv.num_slots == 3  # every KV slot came back
    assert len(ids["a1"]) == 6
    for i in (0, 2):
        n, mode, max_new = specs[i]
        assert ids[f"a{i}"] == generate(model, _prompt(n, i), mode=mode, max_new_tokens=max_new).ids


def test_pause_resume_and_abort_of_a_paused_request(model):
    """A paused request leaves the batch with its caches and, resumed, continues exactly as if never paused;
    aborting a paused one frees its KV slot."""
    engine = DecodeEngine(model)
    specs = [(10, "boost", 24), (6, "turbo", 24), (8, "vanilla", 24)]
    ids = {f"p{i}": [] for i in range(3)}
    for i, (n, mode, max_new) in enumerate(specs):
        engine.add_request(GenerationRequest(_prompt(n, i), mode=mode, max_new_tokens=max_new, request_id=f"p{i}"))
    reasons, step = {}, 0
    while engine.has_unfinished() or engine.paused_ids():
        if step == 3:
            assert engine.pause("p0") and engine.pause("p2") and not engine.pause("nope")
            assert engine.paused_ids() == ["p0", "p2"] and "p0" not in engine.running_ids()
        if step == 8:
            assert engine.resume("p0") and not engine.resume("p0")
            engine.abort("p2")  # paused: aborted without rejoining
        for event in engine.step():
            if isinstance(event, TokenEvent):
                ids[event.request_id].append(event.token_id)
            elif isinstance(event, EndEvent):
                reasons[event.request_id] = event.reason
        step += 1
    assert reasons == {"p0": "length", "p1": "length", "p2": "aborted"} and not engine.paused_ids()
    assert sorted(engine.kv.free) == list(range(engine.kv.num_slots))
    for i in (0, 1):
        n, mode, max_new = specs[i]
        assert ids[f"p{i}"] == generate(model, _prompt(n, i), mode=mode, max_new_tokens=max_new).ids


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


def test_hidden_buffer_keeps_chunks_and_cuts_them():
    from pipeline.engine.kv_cache import HiddenBuffer

    rows = torch.arange(40.0).view(20, 2)  # row r = [2r, 2r + 1]
    buf = HiddenBuffer()
    for a, b in [(0, 5), (5, 5), (5, 12), (12, 20)]:  # an empty append is a no-op
        buf.append(rows[a:b])
    assert (buf.start, buf.end) == (0, 20)
    torch.testing.assert_close(buf.get(5, 12), rows[5:12])  # one chunk: a view, no copy
    assert buf.get(5, 12).data_ptr() == rows[5:12].data_ptr()
    torch.testing.assert_close(buf.get(3, 15), rows[3:15])  # across chunks
    buf.trim(7)
    assert buf.start == 7
    torch.testing.assert_close(buf.get(7, 20), rows[7:20])
    with pytest.raises(RuntimeError, match="not held"):
        buf.get(6, 9)  # trimmed rows are gone even if their chunk is still held
    buf.truncate(14)  # rejected drafts: rows 14.. go
    assert buf.end == 14
    torch.testing.assert_close(buf.get(7, 14), rows[7:14])
    buf.append(rows[14:16] * -1)  # recomputed rows follow on
    torch.testing.assert_close(buf.get(12, 16), torch.cat([rows[12:14], -rows[14:16]]))
    buf.truncate(3)  # below start: everything goes, the producer restarts at 3
    assert (buf.start, buf.end) == (3, 3)


def test_argmax_rows_equals_argmax():
    from pipeline.engine.sampling import argmax_rows

    g = torch.Generator().manual_seed(0)
    for rows in (1, 2, 8, 13):
        for vocab in (100, 4096, 16384, 17144, 151_936 + 16_387):
            x = torch.randn(rows, vocab, generator=g)
            cases = [x, x[:, 3 : vocab - 5]]  # a slice of a wider row, as for an id span
            tied = x.clone()
            tied[:, vocab // 3] = tied[:, vocab // 2] = tied[:, -1] = 50.0  # ties: the lowest id wins
            nan = x.clone()
            nan[0, -2] = nan[-1, 7] = float("nan")  # NaN counts as the max, as in argmax
            last = x.clone()
            last[0, -1] = 99.0  # the max in the tail past the last whole block
            cases += [tied, nan, last, torch.full((rows, vocab), float("-inf"))]
            for case in cases:
                assert torch.equal(argmax_rows(case), case.argmax(-1)), (rows, vocab)


def test_decode_logits_equal_lm_head_and_follow_weight_changes(model):
    hidden = torch.randn(16, model.config.hidden_size)
    with torch.inference_mode():
        for rows in (1, 2, 3, 8, 16):
            torch.testing.assert_close(model.decode_logits(hidden[:rows]), model.lm_head(hidden[:rows]).float(),
                                       atol=1e-5, rtol=1e-5)
        V = model.config.vocab_size
        for lo, hi in [(0, V), (100, 356), (7, 8), (V - 5, V)]:  # an id range: those columns only
            for rows in (1, 8):
                torch.testing.assert_close(model.decode_logits(hidden[:rows], lo, hi),
                                           model.lm_head(hidden[:rows]).float()[:, lo:hi], atol=1e-5, rtol=1e-5)
        for lo, hi in [(-1, 5), (5, 5), (0, V + 1)]:
            with pytest.raises(ValueError, match="id range"):
                model.decode_logits(hidden[:2], lo, hi)
    weight = model.lm_head.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(2.0)  # a training step / edit in place: the packed copy must be rebuilt
        with torch.inference_mode():
            torch.testing.assert_close(model.decode_logits(hidden[:8]), model.lm_head(hidden[:8]).float(),
                                       atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_cpu_decode_attention_is_sdpa_without_kv_copies(model):
    """The engine's CPU attention (enable_gqa instead of repeat_kv) gives exactly transformers' sdpa output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.engine.kv_cache import group_attention_mask
    from pipeline.kernels.cpu import sdpa_gqa_attention

    attn = model.model.layers[0].self_attn
    assert attn.num_key_value_groups > 1
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, D = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    for G, past, q_lens in [(1, [9], [1]), (1, [0], [6]), (4, [5, 0, 17, 8], [3, 6, 1, 6])]:
        Q, T = max(q_lens), max(p + q for p, q in zip(past, q_lens))
        query = torch.randn(G, heads, Q, D, generator=g)
        key, value = torch.randn(2, G, kv_heads, T, D, generator=g)
        mask = group_attention_mask(past, q_lens, torch.float32, "cpu")
        ours, _ = sdpa_gqa_attention(attn, query, key, value, mask, scaling=attn.scaling)
        theirs, _ = sdpa_attention_forward(attn, query, key, value, mask, scaling=attn.scaling)
        assert torch.equal(ours, theirs)
    DecodeEngine(model)
    assert model.config._attn_implementation == "vita_sdpa_gqa"  # chosen at load (set_decode_kernels), kept by the engine


def test_choose_batch_equals_choose_row_by_row(model):
    """The batched greedy choice (one argmax per slot kind, over the allowed ids' range) picks what each
    request's own `choose` picks: every slot kind, unconstrained rows, ties, and rows that must choose alone."""
    from pipeline.tokens.layout import default_layout
    from pipeline.engine.sampling import OutputConstraint, TokenSampler, choose_batch

    layout, V = default_layout(model), model.config.vocab_size
    interleaved = OutputConstraint("interleaved", layout, V, "cpu", [1, 10, 4, 10])
    text_only = OutputConstraint("text", layout, V, "cpu")
    specs = [(interleaved, i) for i in range(16)] + [(text_only, 0), (text_only, 5), (None, 0), (None, 3)]
    samplers = [TokenSampler(SamplingParams(), "cpu", c) for c, _ in specs]
    samplers.append(TokenSampler(SamplingParams(repetition_penalty=1.3), "cpu", interleaved))  # chooses alone
    indices = [i for _, i in specs] + [0]
    g = torch.Generator().manual_seed(5)
    for trial in range(3):
        logits = torch.randn(len(samplers), V, generator=g) * 4
        if trial == 1:  # ties inside and outside the allowed ranges: the lowest allowed id wins
            logits[:, 10] = logits[:, 20] = logits[:, layout.audio_offset + 7] = logits[:, -1] = 30.0
        prefixes = [None] * (len(samplers) - 1) + [torch.tensor([[1, 2, 3, 10, 20]])]
        batched = choose_batch(samplers, prefixes, logits, indices)
        alone = [s.choose(p, logits[i : i + 1], indices[i]) for i, (s, p) in enumerate(zip(samplers, prefixes))]
        assert batched == alone
        slots = {interleaved.slot(i) for i in range(16)}
        assert slots == {"text", "boa", "audio", "eoa"}


def test_choose_batch_over_an_id_range_equals_the_whole_vocabulary(model):
    """Scores over only the ids a step's rows may choose (`offset`) give the tokens the whole vocabulary gives."""
    from pipeline.tokens.layout import default_layout
    from pipeline.engine.sampling import OutputConstraint, TokenSampler, choose_batch

    layout, V = default_layout(model), model.config.vocab_size
    interleaved = OutputConstraint("interleaved", layout, V, "cpu", [1, 10, 4, 10])
    samplers = [TokenSampler(SamplingParams(), "cpu", interleaved) for _ in range(6)]
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(2)) * 4
    cases = ([0] * 6, [1] * 6, [2, 3, 4, 5, 6, 7], [11] * 6,  # text, BOA, audio, EOA
             [1, 2, 3, 1, 4, 5], [0, 1, 2, 11, 12, 13])  # BOA with audio (the range starts at BOA), all kinds
    for indices in cases:
        ranges = [interleaved.ranges[interleaved.slot(i)] for i in indices]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        whole = choose_batch(samplers, [None] * 6, logits, indices)
        assert choose_batch(samplers, [None] * 6, logits[:, lo:hi], indices, offset=lo) == whole
        assert all(r[0] <= t < r[1] for r, t in zip(ranges, whole))
    penalised = [TokenSampler(SamplingParams(repetition_penalty=1.3), "cpu", interleaved)]
    with pytest.raises(ValueError, match="whole vocabulary"):  # a row that chooses alone needs every score
        choose_batch(penalised, [torch.tensor([[1, 2]])], logits[:1, 5:9], [0], offset=5)


def test_constrained_greedy_steps_score_only_the_allowed_ids(model):
    """TTS-like requests (interleaved constraint, greedy): lm_head scores only the ids their slots allow (the
    codebook on audio slots, one id on BOA/EOA), and the ids equal the whole-vocabulary path's (a logits trace
    forces it) and each request's ids alone."""
    V = model.config.vocab_size
    ranges = []
    decode_logits = model.decode_logits

    def recording(hidden, lo=0, hi=None):
        ranges.append((lo, V if hi is None else hi))
        return decode_logits(hidden, lo, hi)

    def run(prompts, **engine_args):
        engine = DecodeEngine(model, **engine_args)
        for i, prompt in enumerate(prompts):
            engine.add_request(GenerationRequest(prompt, mode="boost", max_new_tokens=40, request_id=f"c{i}",
                                                 constraint="interleaved"))
        ids = {f"c{i}": [] for i in range(len(prompts))}
        while engine.has_unfinished():
            for event in engine.step():
                if isinstance(event, TokenEvent):
                    ids[event.request_id].append(event.token_id)
        return ids

    prompts = [_prompt(n, 40 + n) for n in (9, 17, 4)]
    model.decode_logits = recording
    try:
        batched = run(prompts)
        narrow = [r for r in ranges if r != (0, V)]
        ranges.clear()
        whole = run(prompts, observer=RequestTrace(logits=True))
        assert set(ranges) == {(0, V)}
    finally:
        del model.decode_logits
    assert batched == whole
    assert len(narrow) > len(batched["c0"]) // 2 and any(hi - lo == 1 for lo, hi in narrow)
    for i, prompt in enumerate(prompts):
        assert run([prompt])["c0"] == batched[f"c{i}"]
