"""The CUDA path's dtypes, exercised on CPU: every stage loaded in bfloat16 (what `actors.placement` /
`actors.ray_runtime` pick on a GPU for the LLM, the encoder and the decoder alike), and the staged pipeline's
stage objects (`LocalPipeline`) in bfloat16, against float32 on the tiny set.

What must agree and what is measured (printed; `pytest -s` shows it):
- what the stages compute from integers alone agrees exactly: the encoder's token count per clip, the
  decoder's PCM length, the engine's first greedy id after the prompt;
- ids that come out of an argmax over bf16 activations (encoder VQ codes, LLM top-1) agree with float32 on
  most positions: the rate is printed and bounded below; a rounding flip is not a failure, a broken path is;
- the decoder's mel is within a few per cent of float32 (its waveform is not compared sample by sample: the
  NSF source integrates F0, so a 0.1 % F0 change moves the phase of every later sample);
- nothing silently upcasts: every parameter is bf16 after loading, and every module's floating output is bf16,
  except the two places that cast on purpose and say so (`rotary_emb.inv_freq` kept in float32 by
  transformers; HiFT's (i)STFT in float32, so the generator returns float32 speech).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BF16 = torch.bfloat16
# (module class, output dtype) pairs that are deliberate: HiFT's waveform comes from its float32 iSTFT
DELIBERATE_FLOAT32 = {("HiFTGenerator", "torch.float32")}
DELIBERATE_FP32_BUFFERS = {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}  # RoPE: float32 by design


def _watch(*modules) -> Counter:
    """Count module outputs that are floating point but not bf16, by (class, dtype)."""
    seen: Counter = Counter()

    def hook(module, inputs, output):
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != BF16:
                seen[(type(module).__name__, str(out.dtype))] += 1

    for root in modules:
        for module in root.modules():
            module.register_forward_hook(hook)
    return seen


def _assert_all_bf16(module, name: str, allowed_buffers=()) -> None:
    params = {n: p.dtype for n, p in module.named_parameters() if p.dtype != BF16}
    buffers = {n: b.dtype for n, b in module.named_buffers()
               if b.is_floating_point() and b.dtype != BF16 and n not in allowed_buffers}
    assert not params and not buffers, f"{name}: not bf16 after loading: {params} {buffers}"


def _speech(shared_dir: Path, n: int = 3) -> list[Path]:
    files = sorted((shared_dir / "corpora" / "mini-speech").rglob("*.flac"))[:n]
    assert files, "no mini-speech clips"
    return files


def test_encoder_bf16_codes_agree_with_float32(tiny_models, shared_dir):
    from pipeline.encoder.speech_encoder import load_encoder

    ids = {}
    for dtype in (torch.float32, BF16):
        encoder = load_encoder(tiny_models / "encoder", dtype=dtype)
        if dtype == BF16:
            _assert_all_bf16(encoder.model, "encoder")
            off = _watch(encoder.model)
        ids[dtype] = encoder.encode_waveforms([encoder.load(f) for f in _speech(shared_dir)])
    assert not off, f"encoder upcasts: {dict(off)}"
    lengths = [(len(a), len(b)) for a, b in zip(ids[torch.float32], ids[BF16])]
    assert all(a == b for a, b in lengths), lengths  # token counts come from the frame mask: exact
    same = np.concatenate([np.equal(a, b) for a, b in zip(ids[torch.float32], ids[BF16])])
    print(f"\nencoder VQ codes, bf16 vs fp32: {same.mean():.1%} of {same.size} codes agree")
    assert same.mean() >= 0.90


def test_llm_bf16_top1_agrees_with_float32(tiny_models):
    from pipeline.llm import load_llm

    m32 = load_llm(tiny_models / "llm", dtype=torch.float32)
    m16 = load_llm(tiny_models / "llm", dtype=BF16)
    _assert_all_bf16(m16, "llm", DELIBERATE_FP32_BUFFERS)
    off = _watch(m16)
    x = torch.randint(0, m32.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        o32, o16 = m32(input_ids=x), m16(input_ids=x)
    assert not off, f"LLM upcasts: {dict(off)}"
    assert o16.logits.dtype == BF16 and all(l.dtype == BF16 for l in o16.mtp_logits)
    backbone = (o32.logits.argmax(-1) == o16.logits.argmax(-1)).float().mean().item()
    modules = [(a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(o32.mtp_logits, o16.mtp_logits)]
    print(f"\nLLM teacher-forced top-1, bf16 vs fp32 over 96 positions: backbone {backbone:.1%}, MCTP modules "
          + " ".join(f"{m:.0%}" for m in modules))
    assert backbone >= 0.95 and min(modules) >= 0.85


def test_engine_bf16_greedy_ids(tiny_models):
    """The decode engine in bf16: greedy ids per mode against fp32 (common prefix and position-wise agreement)."""
    from pipeline.engine.decode_engine import DecodeEngine
    from pipeline.engine.requests import GenerationRequest, TokenEvent
    from pipeline.llm import load_llm

    ids = {}
    for dtype in (torch.float32, BF16):
        engine = DecodeEngine(load_llm(tiny_models / "llm", dtype=dtype), dtype=dtype, max_batch_size=4)
        assert engine.dtype == dtype
        for mode in ("vanilla", "boost"):
            events = engine.stream(GenerationRequest(prompt_ids=list(range(5, 37)), mode=mode, max_new_tokens=48,
                                                     stop_ids=[]))
            ids[dtype, mode] = [e.token_id for e in events if isinstance(e, TokenEvent)]
    for mode in ("vanilla", "boost"):
        a, b = ids[torch.float32, mode], ids[BF16, mode]
        assert len(a) == len(b) == 48
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        same = np.mean(np.equal(a, b))
        print(f"\nengine {mode}, bf16 vs fp32 greedy: first {prefix} of 48 ids identical, {same:.0%} position-wise")
        assert prefix >= 1  # the first token comes from the prompt alone; later ones follow earlier choices


def test_decoder_bf16_mel_close_to_float32(tiny_models):
    from pipeline.decoder.speech_decoder import load_decoder

    codes = list(np.random.default_rng(0).integers(0, 16384, 40))
    d32 = load_decoder(tiny_models / "decoder", dtype=torch.float32)
    d16 = load_decoder(tiny_models / "decoder", dtype=BF16)
    _assert_all_bf16(d16.flow, "flow")
    _assert_all_bf16(d16.hift, "hift")
    off = _watch(d16.flow, d16.hift)
    r32, r16 = d32.decode_details(codes), d16.decode_details(codes)
    assert set(off) <= DELIBERATE_FLOAT32, f"decoder upcasts: {dict(off)}"
    rel = lambda a, b: ((a - b).norm() / a.norm()).item()  # noqa: E731
    mel, f0 = rel(r32.mel, r16.mel), rel(r32.f0, r16.f0)
    assert r32.speech.shape == r16.speech.shape and torch.isfinite(r16.speech).all()
    stream = d16.stream(kind="incremental", n_steps=10, seed=42)
    pcm = [stream.push(codes[:20], False), stream.push(codes[20:], True)]
    assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in pcm)
    assert sum(len(p) for p in pcm) == r16.speech.shape[-1]
    print(f"\ndecoder bf16 vs fp32 (40 codes, 10 steps): mel relative error {mel:.1%}, F0 {f0:.1%}; "
          f"incremental bf16 stream {sum(len(p) for p in pcm)} samples")
    assert mel < 0.10


def test_staged_pipeline_in_bf16(tiny_models):
    """The three stage objects in bf16 through the one request path (`LocalPipeline`): text + speech out, in
    the task's layout like fp32; the ids' agreement with fp32 is printed."""
    from actors.config import PipelineConfig
    from actors.local import LocalPipeline
    from actors.results import collect

    results = {}
    for dtype in (torch.float32, BF16):
        pipe = LocalPipeline(PipelineConfig.from_models_dir(tiny_models), dtype=dtype)
        try:
            results[dtype] = collect(pipe.tts("Hello there, how are you?", max_new_tokens=64))
        finally:
            close = getattr(pipe, "close", None)
            if close is not None:
                close()
    r32, r16 = results[torch.float32], results[BF16]
    assert r16.ok and r16.error is None, r16.error
    assert len(r16.pcm) > 0 and r16.pcm.dtype == np.float32 and np.isfinite(r16.pcm).all()
    same = np.mean(np.equal(r32.token_ids[: len(r16.token_ids)], r16.token_ids[: len(r32.token_ids)]))
    print(f"\nstaged pipeline TTS, bf16 vs fp32: {len(r16.token_ids)} vs {len(r32.token_ids)} ids, {same:.0%} "
          f"position-wise equal; {len(r16.audio_codes)} vs {len(r32.audio_codes)} audio codes; "
          f"{len(r16.pcm)} vs {len(r32.pcm)} PCM samples")
    assert r16.sample_rate == r32.sample_rate and r16.audio_codes and r32.audio_codes
