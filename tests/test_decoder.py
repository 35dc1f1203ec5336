"""Speech decoder: parity with the original GLM-4-Voice decoder fixtures, safe loading, tiny writer."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.decoder.config import DecoderError
from pipeline.decoder.speech_decoder import load_decoder
from pipeline.decoder.tiny import write_tiny_decoder
from pipeline.decoder.config import load_yaml


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codec(shared_dir) -> Path:
    return shared_dir / "parity" / "codec"


@pytest.fixture(scope="module")
def fixture_decoder(codec):
    return load_decoder(codec / "decoder")


@pytest.fixture(scope="module")
def fixture_tokens(codec) -> np.ndarray:
    return np.load(codec / "inputs" / "decoder_tokens.npy")


@pytest.fixture(scope="module")
def offline(fixture_decoder, fixture_tokens):
    return fixture_decoder.decode_details(fixture_tokens)


# ---- parity with the original ----------------------------------------------------------------


def test_offline_decode_matches_original(offline, codec):
    exp = np.load(codec / "expected" / "decoder_offline.npz")
    np.testing.assert_array_equal(offline.noise.numpy(), exp["call0_noise"])  # our generator = torch's stream
    np.testing.assert_allclose(offline.mel.numpy(), exp["call0_mel"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(offline.f0.numpy(), exp["call0_f0"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(offline.source.numpy(), exp["call0_source"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(offline.speech.numpy(), exp["call0_speech"], atol=1e-3, rtol=0)
    assert offline.speech.shape[1] == 256 * offline.mel.shape[-1] == 141056


def test_decode_returns_float32_pcm(fixture_decoder, fixture_tokens, offline):
    pcm = fixture_decoder.decode(fixture_tokens[:20], n_steps=2)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert pcm.size == 256 * fixture_decoder.n_frames(20)
    assert fixture_decoder.sample_rate == 22050 and fixture_decoder.codebook_size == 2048


def test_hift_alone_with_stored_source(fixture_decoder, codec):
    exp = np.load(codec / "expected" / "decoder_offline.npz")
    with torch.inference_mode():
        speech = fixture_decoder.hift.synthesize(torch.from_numpy(exp["call0_mel"]), torch.from_numpy(exp["call0_source"]))
    np.testing.assert_allclose(speech.numpy(), exp["call0_speech"], atol=1e-4, rtol=0)


def test_encoder_tokens_decode(fixture_decoder, codec):
    exp = np.load(codec / "expected" / "decoder_offline_encoder_tokens.npz")
    result = fixture_decoder.decode_details(exp["call0_tokens"][0])
    np.testing.assert_allclose(result.mel.numpy(), exp["call0_mel"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(result.f0.numpy(), exp["call0_f0"], atol=1e-2, rtol=0)


def _check_glm_calls(stream, pcm, exp):
    assert len(stream.calls) == len([k for k in exp.files if k.endswith("_mel")])
    for i, call in enumerate(stream.calls):
        np.testing.assert_array_equal(call["tokens"], exp[f"call{i}_tokens"][0])
        np.testing.assert_allclose(call["mel"].numpy(), exp[f"call{i}_mel"], atol=1e-3, rtol=0)
        np.testing.assert_allclose(call["f0"].numpy(), exp[f"call{i}_f0"], atol=1e-2, rtol=0)
    expected = np.concatenate([exp[f"call{i}_speech"][0] for i in range(len(stream.calls))])
    np.testing.assert_allclose(pcm, expected, atol=1e-3, rtol=0)


def test_glm4voice_webdemo_schedule_matches_original(fixture_decoder, fixture_tokens, codec):
    """Ids arrive one by one; the web demo's 25/50/... schedule and final flag decide the calls."""
    exp = np.load(codec / "expected" / "decoder_stream_webdemo.npz")
    stream = fixture_decoder.stream("glm4voice", schedule="webdemo")
    pcm = np.concatenate([stream.push(fixture_tokens[i: i + 1]) for i in range(len(fixture_tokens))] + [stream.finish()])
    _check_glm_calls(stream, pcm, exp)


def test_glm4voice_block_schedule_matches_original(fixture_decoder, fixture_tokens, codec):
    exp = np.load(codec / "expected" / "decoder_stream_blocks.npz")
    stream = fixture_decoder.stream("glm4voice", schedule="blocks")
    pcm = np.concatenate([stream.push(fixture_tokens[:33]), stream.push(fixture_tokens[33:]), stream.finish()])
    _check_glm_calls(stream, pcm, exp)


def test_vita_prefix_schedule_matches_original(fixture_decoder, fixture_tokens, codec):
    """Segments of 10 ids: decodes at 10, 30, 50, 70 ids and the final 80, with 1, 3, 5, 7, 9 ODE steps."""
    exp = np.load(codec / "expected" / "decoder_vita_prefix.npz")
    stream = fixture_decoder.stream("vita_prefix")
    pieces = [stream.push(fixture_tokens[i: i + 10], final=i + 10 >= len(fixture_tokens)) for i in range(0, 80, 10)]
    assert [(d["codes"], d["steps"]) for d in stream.decodes] == [(10, 1), (30, 3), (50, 5), (70, 7), (80, 9)]
    np.testing.assert_allclose(np.concatenate(pieces), exp["emitted_speech"], atol=1e-3, rtol=0)
    assert stream.finished and stream.finish().size == 0


# ---- determinism without global side effects ------------------------------------------------


def test_decode_leaves_global_rng_alone(fixture_decoder, fixture_tokens):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = fixture_decoder.decode(fixture_tokens[:12], n_steps=2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    second = fixture_decoder.decode(fixture_tokens[:12], n_steps=2)
    np.testing.assert_array_equal(first, second)
    other_seed = fixture_decoder.decode(fixture_tokens[:12], n_steps=2, seed=7)
    assert not np.allclose(first, other_seed)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("codes, match", [
    ([], "empty"),
    ([1, 2, 2048], "outside the codebook"),
    ([-1, 3], "outside the codebook"),
    ([1.5, 2.0], "integer"),
    (np.zeros((2, 3), dtype=np.int64), "1-D"),
])
def test_bad_codes_are_clear_errors(fixture_decoder, codes, match):
    with pytest.raises(DecoderError, match=match):
        fixture_decoder.decode(codes)


def test_bad_stream_arguments(fixture_decoder):
    with pytest.raises(DecoderError, match="stream kind"):
        fixture_decoder.stream("nope")
    with pytest.raises(DecoderError, match="n_steps"):
        fixture_decoder.decode([1, 2], n_steps=0)
    with pytest.raises(DecoderError, match="option"):
        fixture_decoder.stream("incremental", bogus=1)
    stream = fixture_decoder.stream("incremental")
    with pytest.raises(DecoderError, match="codebook"):
        stream.push([5000])
    stream.finish()
    with pytest.raises(DecoderError, match="finished"):
        stream.push([1])


def _copy_decoder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.yaml", "flow.pt", "hift.pt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("payload", [
    "evil: !!python/object/apply:os.system ['touch {marker}']\n",
    "__evil: !apply:os.system ['touch {marker}']\n",
    "evil: !new:os.system\n    command: 'touch {marker}'\n",
    "evil: !name:subprocess.call\n",
    "evil: !unknowntag 3\n",
])
def test_malicious_or_unknown_yaml_tags_are_refused(codec, tmp_path, payload):
    folder = _copy_decoder(codec / "decoder", tmp_path / "dec")
    marker = tmp_path / "pwned"
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(payload.format(marker=marker) + text)
    with pytest.raises(DecoderError, match="config.yaml"):
        load_decoder(folder)
    assert not marker.exists()


def test_yaml_loader_reads_released_layout_without_executing(codec):
    data = load_yaml(codec / "decoder" / "config.yaml")
    assert data["__set_seed3"].kind == "apply" and data["__set_seed3"].target == "torch.manual_seed"
    assert data["flow"].target == "cosyvoice.flow.flow.MaskedDiffWithXvec"
    assert data["flow"].value["encoder"].value["block_size"] == 10


def test_truncated_or_unsafe_checkpoints_are_refused(codec, tmp_path):
    folder = _copy_decoder(codec / "decoder", tmp_path / "dec")
    data = (folder / "flow.pt").read_bytes()
    (folder / "flow.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecoderError, match="flow.pt"):
        load_decoder(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (folder / "flow.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(DecoderError, match="flow.pt"):
        load_decoder(folder)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(DecoderError, match="not found"):
        load_decoder(tmp_path / "missing")


def test_checkpoint_key_or_shape_mismatch_is_refused(codec, tmp_path):
    folder = _copy_decoder(codec / "decoder", tmp_path / "dec")
    state = torch.load(folder / "hift.pt", weights_only=True)
    state["conv_pre.weight_v"] = state["conv_pre.weight_v"][:, :, :5].clone()
    torch.save(state, folder / "hift.pt")
    with pytest.raises(DecoderError, match="conv_pre.weight_v"):
        load_decoder(folder)
    del state["conv_pre.weight_v"]
    torch.save(state, folder / "hift.pt")
    with pytest.raises(DecoderError, match="missing"):
        load_decoder(folder)


# ---- tiny decoder in the released format ------------------------------------------------------


def test_write_tiny_decoder_released_format(tmp_path, codec):
    out = write_tiny_decoder(tmp_path / "decoder", seed=3)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "flow.pt", "hift.pt"]
    text = (out / "config.yaml").read_text()
    fixture_text = (codec / "decoder" / "config.yaml").read_text()
    # same layout line by line (header comments and the vocabulary aside)
    body, fixture_body = text.splitlines()[2:], fixture_text.splitlines()[2:]
    assert len(body) == len(fixture_body)
    assert [ln.split(":")[0] for ln in body] == [ln.split(":")[0] for ln in fixture_body]
    assert "vocab_size: 16384" in text and "__set_seed1: !apply:random.seed [1986]" in text and "\nllm: !new:" in text
    hift = torch.load(out / "hift.pt", weights_only=True)
    assert "conv_pre.weight_g" in hift and "conv_pre.weight_v" in hift and "conv_pre.weight" not in hift
    flow = torch.load(out / "flow.pt", weights_only=True)
    assert flow["input_embedding.weight"].shape == (16384, 32)

    again = write_tiny_decoder(tmp_path / "again", seed=3)
    flow2 = torch.load(again / "flow.pt", weights_only=True)
    assert all(torch.equal(flow[k], flow2[k]) for k in flow)

    decoder = load_decoder(out)
    assert decoder.codebook_size == 16384
    pcm = decoder.decode(np.random.default_rng(0).integers(0, 16384, 25), n_steps=3)
    rms = float(np.sqrt(np.mean(pcm ** 2)))
    assert 0.005 < rms < 0.2, rms  # audible, not silent, not saturated
    assert np.mean(np.abs(pcm) >= 0.99) < 0.01


def test_dtype_parameter(tmp_path):
    out = write_tiny_decoder(tmp_path / "decoder", seed=1)
    codes = list(range(100, 112))
    ref = load_decoder(out).decode(codes, n_steps=2)
    wide = load_decoder(out, dtype=torch.float64)
    assert wide.dtype == torch.float64 and next(wide.flow.parameters()).dtype == torch.float64
    np.testing.assert_allclose(wide.decode(codes, n_steps=2), ref, atol=2e-3, rtol=1e-2)
    half = load_decoder(out, dtype=torch.bfloat16).decode(codes, n_steps=2)  # runs end to end in bfloat16
    assert half.dtype == np.float32 and half.shape == ref.shape and np.isfinite(half).all()
    with pytest.raises(DecoderError, match="dtype"):
        load_decoder(out, dtype="float77")
