"""pipeline.encoder: parity with the original GLM-4-Voice tokenizer, batching, loading, tiny checkpoints."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from safetensors.torch import load_file, save_file

from pipeline.audio import AudioError
from pipeline.encoder.speech_encoder import (
    SpeechEncoder,
    load_encoder,
    tiny_encoder_config,
    write_random_encoder,
    write_tiny_encoder,
)
from pipeline.encoder.whisper_vq import WhisperVQConfig

CODEC = "parity/codec"
CORPUS = "corpora/mini-speech/LibriSpeech"


@pytest.fixture(scope="module")
def codec(shared_dir):
    return shared_dir / CODEC


@pytest.fixture(scope="module")
def fixture_tokenizer(codec) -> SpeechEncoder:
    return load_encoder(codec / "encoder")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny") / "encoder", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> SpeechEncoder:
    return load_encoder(tiny_dir)


@pytest.fixture(scope="module")
def corpus_files(shared_dir):
    return sorted((shared_dir / CORPUS).rglob("*.flac"))


def expected_token_count(n_samples: int, window: int = 480000, per_token: int = 1280) -> int:
    """The original keeps ceil(n / 1280) tokens for every 30 s window."""
    return sum(math.ceil(min(window, n_samples - start) / per_token) for start in range(0, n_samples, window))


# --- parity with the original (parity/codec) --------------------------------------------------


def test_fixture_tokens_per_file_and_batched(codec, fixture_tokenizer):
    expected = json.loads((codec / "expected/encoder_tokens.json").read_text())
    names = list(expected["per_file"])
    for name in names:
        assert fixture_tokenizer.encode(codec / name) == expected["per_file"][name], name
    batched = fixture_tokenizer.encode_batch([codec / name for name in names])
    assert batched == [expected["batched_call"][name] for name in names]
    assert [len(ids) for ids in batched] == [36, 62, 416]  # audio_2 is 33.2 s: two 30 s windows


def test_fixture_features_and_pre_vq_states(codec, fixture_tokenizer):
    ref = np.load(codec / "expected/encoder_features_audio_1.npz")
    waveform = fixture_tokenizer.load(codec / "inputs/audio_1.flac")
    inputs = fixture_tokenizer.features(waveform)
    np.testing.assert_allclose(inputs["input_features"].numpy(), ref["input_features"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(inputs["attention_mask"].numpy(), ref["attention_mask"])
    with torch.inference_mode():
        out = fixture_tokenizer.model(**inputs)
    np.testing.assert_allclose(out.pre_vq_hidden.numpy(), ref["pre_vq_hidden"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out.token_ids[0].numpy(), ref["token_ids"])
    # from the fixture's own features too, so a feature difference cannot hide a model difference
    with torch.inference_mode():
        out = fixture_tokenizer.model(torch.from_numpy(ref["input_features"]), torch.from_numpy(ref["attention_mask"]))
    np.testing.assert_allclose(out.pre_vq_hidden.numpy(), ref["pre_vq_hidden"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out.token_ids[0].numpy(), ref["token_ids"])


def test_tokenizer_rates(fixture_tokenizer):
    assert fixture_tokenizer.sample_rate == 16000
    assert fixture_tokenizer.tokens_per_second == 12.5
    assert fixture_tokenizer.codebook_size == 2048
    assert fixture_tokenizer.device == torch.device("cpu")


# --- an independent reference of the original forward -----------------------------------------


def reference_forward(model, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original WhisperVQEncoder forward for ONE window (n_mels, T_f), written out with eager attention."""
    cfg = model.config
    mask = frame_mask[::2].bool()

    def conv(layer, x):
        pad = (2, 0) if cfg.encoder_causal_convolution else (1, 1)
        return torch.nn.functional.conv1d(torch.nn.functional.pad(x, pad), layer.weight, layer.bias, layer.stride)

    def block_causal(n, block):
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
        if cfg.encoder_causal_attention:
            return allowed
        if block is None:
            return torch.ones(n, n, dtype=torch.bool)
        blocks = [torch.ones(min(block, n - s), min(block, n - s), dtype=torch.bool) for s in range(0, n, block)]
        return allowed | torch.block_diag(*blocks)

    x = torch.nn.functional.gelu(conv(model.conv1, features[None]))
    x = torch.nn.functional.gelu(conv(model.conv2, x)).transpose(1, 2)[0]
    x = x + model.embed_positions.weight[: x.shape[0]]
    heads, block = cfg.encoder_attention_heads, cfg.quantize_causal_block_size
    allowed = block_causal(x.shape[0], block) & mask[None]
    for i, layer in enumerate(model.layers):
        att = layer.self_attn
        h = layer.self_attn_layer_norm(x)
        q, k, v = (p(h).reshape(len(h), heads, -1).transpose(0, 1) for p in (att.q_proj, att.k_proj, att.v_proj))
        scores = (q * att.scaling) @ k.transpose(1, 2)
        scores = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + att.out_proj((scores @ v).transpose(0, 1).reshape(len(h), -1))
        x = x + layer.fc2(torch.nn.functional.gelu(layer.fc1(layer.final_layer_norm(x))))
        if i + 1 == cfg.pooling_position:
            k_pool = cfg.pooling_kernel_size
            x = torch.nn.functional.pad(x.T, (0, -x.shape[0] % k_pool))
            x = torch.nn.functional.avg_pool1d(x[None], k_pool)[0].T
            mask = mask[::k_pool]
            allowed = block_causal(x.shape[0], block // k_pool if block else None) & mask[None]
    distances = ((x[:, None, :] - model.codebook.weight[None]) ** 2).sum(-1)
    return x, distances.argmin(-1)


VARIANTS = {
    "released": {},
    "pool_before_quantize": dict(pooling_position=1, quantize_position=3),
    "non_causal_conv": dict(encoder_causal_convolution=False),
    "no_block": dict(quantize_causal_block_size=None),
    "causal_attention": dict(encoder_causal_attention=True),
    "block_40": dict(quantize_causal_block_size=40, pooling_position=1, quantize_position=2),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory) -> SpeechEncoder:
    config = tiny_encoder_config(quantize_vocab_size=512, **VARIANTS[request.param])
    return load_encoder(write_random_encoder(tmp_path_factory.mktemp(request.param), config, seed=3))


def test_model_matches_reference_forward(variant, corpus_files):
    speech = np.concatenate([variant.load(f) for f in corpus_files[:4]])
    for waveform in (speech[: 1280 * 60], speech[: 1280 * 60 - 1000]):  # 4.8 s: two attention blocks
        inputs = variant.features(waveform)
        with torch.inference_mode():
            out = variant.model(**inputs)
            hidden, ids = reference_forward(variant.model, inputs["input_features"][0], inputs["attention_mask"][0])
        torch.testing.assert_close(out.pre_vq_hidden[0], hidden, atol=1e-4, rtol=1e-4)
        assert (out.token_ids[0] == ids).float().mean() > 0.95  # argmin of a differently rounded distance


# --- batching ------------------------------------------------------------------------------------


def _clips(corpus_files, n=3):
    """Clips with awkward lengths: tails just under a token (reflect padding reaches the signal), tiny,
    exact multiples, and one over 30 s."""
    speech = np.concatenate([sf.read(f, dtype="float32")[0] for f in corpus_files[:12]])
    assert len(speech) > 16000 * 31
    return [
        speech[: 1280 * 11 - 50],
        speech[16000 : 16000 + 300],
        speech[: 16000 * 31 + 777],
        speech[5000 : 5000 + 1280 * 25],
        speech[777 : 777 + 16000 * 2 + 1],
    ]


def test_batched_equals_one_by_one(variant, corpus_files):
    clips = _clips(corpus_files)
    one_by_one = [variant.encode(clip, 16000) for clip in clips]
    assert [len(ids) for ids in one_by_one] == [expected_token_count(len(c)) for c in clips]
    assert variant.encode_batch(clips, [16000] * len(clips)) == one_by_one
    assert variant.encode_batch(clips[::-1], [16000] * len(clips)) == one_by_one[::-1]


def test_batched_equals_one_by_one_in_small_groups(tiny, corpus_files):
    clips = _clips(corpus_files)
    one_by_one = [tiny.encode(clip, 16000) for clip in clips]
    tiny.max_batch_windows = 2
    try:
        assert tiny.encode_batch(clips, [16000] * len(clips)) == one_by_one
    finally:
        tiny.max_batch_windows = 128
    assert tiny.encode_batch([]) == []


# --- the corpus at several rates --------------------------------------------------------------


def test_corpus_tokens_at_12_5_hz(tiny, corpus_files):
    files = corpus_files[:8]
    ids = tiny.encode_batch(files)
    for path, tokens in zip(files, ids):
        n = sf.info(path).frames
        assert len(tokens) == expected_token_count(n)
        assert abs(len(tokens) - n / 16000 * 12.5) < 1
        assert all(0 <= t < 16384 for t in tokens)
        assert len(set(tokens)) > 0.5 * len(tokens)  # non-degenerate codes on speech


@pytest.mark.parametrize("rate, channels, fmt", [(8000, 1, "wav"), (22050, 1, "flac"), (44100, 1, "ogg"),
                                                 (48000, 1, "wav"), (48000, 2, "flac")])
def test_resampled_copies_are_accepted(tiny, corpus_files, tmp_path, rate, channels, fmt):
    pcm, _ = sf.read(corpus_files[1], dtype="float32")
    copy = soxr.resample(pcm, 16000, rate)
    if channels == 2:
        copy = np.stack([copy, 0.5 * copy[::-1]], axis=1)
    path = tmp_path / f"copy.{fmt}"
    sf.write(path, copy, rate)
    tokens = tiny.encode(path)
    duration = sf.info(path).duration
    assert abs(len(tokens) - duration * 12.5) <= 1
    assert len(tokens) == expected_token_count(len(tiny.load(path)))
    if rate == 48000 and channels == 1:  # the same speech resampled back gives mostly the same codes
        original = tiny.encode(corpus_files[1])
        n = min(len(original), len(tokens))
        assert np.mean(np.array(original[:n]) == np.array(tokens[:n])) > 0.5


def test_bytes_and_arrays(tiny, corpus_files):
    path = corpus_files[2]
    pcm, rate = sf.read(path, dtype="float32")
    by_path = tiny.encode(path)
    assert tiny.encode(path.read_bytes()) == by_path
    assert tiny.encode(pcm, rate) == by_path
    assert tiny.encode(torch.from_numpy(pcm), rate) == by_path


def test_malformed_inputs_raise_audio_errors(tiny, corpus_files):
    with pytest.raises(AudioError, match="cannot decode"):
        tiny.encode(b"definitely not audio" * 20)
    with pytest.raises(AudioError, match="sample_rate is required"):
        tiny.encode(np.zeros(1600, np.float32))
    with pytest.raises(AudioError, match=r"audios\[1\]: audio contains 1 NaN"):
        tiny.encode_batch([corpus_files[0], np.array([0.0, np.nan], np.float32)], [None, 16000])
    with pytest.raises(AudioError, match="over the limit"):
        SpeechEncoder(tiny.model, tiny.feature_extractor, max_seconds=1.0).encode(corpus_files[0])
    with pytest.raises(ValueError, match="sample_rates has 1 entries for 2 audios"):
        tiny.encode_batch([corpus_files[0], corpus_files[1]], [None])
    with pytest.raises(ValueError, match="more than max_source_positions"):
        tiny.model(torch.zeros(1, 128, 3008), torch.ones(1, 3008, dtype=torch.long))
    assert tiny.encode(np.zeros(16000, np.float32), 16000)  # silence is valid audio: 13 tokens
    assert len(tiny.encode(np.zeros(1, np.float32), 16000)) == 1


# --- tiny checkpoints in the released format ------------------------------------------------------


def test_tiny_encoder_format(tiny_dir, codec):
    config = json.loads((tiny_dir / "config.json").read_text())
    released = json.loads((codec / "encoder/config.json").read_text())
    assert set(config) == set(released)
    assert config["model_type"] == "whisper" and config["architectures"] == ["WhisperVQEncoder"]
    assert config["quantize_vocab_size"] == 16384 and config["quantize_encoder_only"] is True
    for field in ("pooling_kernel_size", "pooling_type", "quantize_causal_block_size", "encoder_causal_convolution",
                  "num_mel_bins", "max_source_positions", "quantize_ema_decay"):
        assert config[field] == released[field], field
    assert (tiny_dir / "preprocessor_config.json").read_text().count('"feature_size": 128') == 1
    state = load_file(str(tiny_dir / "model.safetensors"))
    released_state = load_file(str(codec / "encoder/model.safetensors"))
    assert set(state) == set(released_state)  # no prefix, EMA buffers included
    assert state["codebook.weight"].shape == (16384, 32)
    torch.testing.assert_close(state["ema_weight"], state["codebook.weight"])
    assert torch.equal(state["ema_count"], torch.ones(16384))


def test_tiny_encoder_is_deterministic(tiny_dir, tmp_path):
    again = write_tiny_encoder(tmp_path / "again", seed=0)
    other = write_tiny_encoder(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


# --- loading ------------------------------------------------------------------------------------


def _copy_with_state(src, dst, state):
    dst.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_loader_tolerates_prefix_and_extra_layers(tiny_dir, tiny, corpus_files, tmp_path):
    state = load_file(str(tiny_dir / "model.safetensors"))
    full = {f"model.encoder.{k}": v for k, v in state.items()}
    # a full (not encoder-only) WhisperVQ checkpoint also has later layers, a layer_norm and a decoder
    full.update({f"model.encoder.layers.5.{k[9:]}": v.clone() for k, v in state.items() if k.startswith("layers.0.")})
    full["model.encoder.layer_norm.weight"] = torch.ones(32)
    full["model.decoder.embed_tokens.weight"] = torch.zeros(4, 32)
    loaded = load_encoder(_copy_with_state(tiny_dir, tmp_path / "prefixed", full))
    assert loaded.encode(corpus_files[0]) == tiny.encode(corpus_files[0])
    no_ema = {k: v for k, v in state.items() if not k.startswith("ema_")}
    assert load_encoder(_copy_with_state(tiny_dir, tmp_path / "no_ema", no_ema)).codebook_size == 16384


def test_loader_rejects_bad_checkpoints(tiny_dir, tmp_path):
    state = load_file(str(tiny_dir / "model.safetensors"))
    bad_shape = dict(state, **{"codebook.weight": torch.zeros(100, 32)})
    with pytest.raises(ValueError, match=r"codebook.weight: shape \(100, 32\), expected \(16384, 32\)"):
        load_encoder(_copy_with_state(tiny_dir, tmp_path / "shape", bad_shape))
    missing = {k: v for k, v in state.items() if not k.startswith("layers.1.fc1")}
    with pytest.raises(ValueError, match="lacks 2 key"):
        load_encoder(_copy_with_state(tiny_dir, tmp_path / "missing", missing))
    with pytest.raises(ValueError, match="unexpected key.*'mystery'"):
        load_encoder(_copy_with_state(tiny_dir, tmp_path / "extra", dict(state, mystery=torch.zeros(1))))
    with pytest.raises(ValueError, match="is not a folder"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_encoder(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        load_encoder(tiny_dir, dtype="int8")
    corrupt = _copy_with_state(tiny_dir, tmp_path / "corrupt", state)
    (corrupt / "model.safetensors").write_bytes(b"123")
    with pytest.raises(ValueError, match="cannot read"):
        load_encoder(corrupt)
    config = json.loads((tiny_dir / "config.json").read_text())
    for field, value in (("quantize_position", "two"), ("d_model", "wide"), ("model_type", "qwen2")):
        broken = _copy_with_state(tiny_dir, tmp_path / f"cfg_{field}", state)
        (broken / "config.json").write_text(json.dumps(dict(config, **{field: value})))
        with pytest.raises(ValueError, match=field):
            load_encoder(broken)


def test_device_and_dtype_parameters(tiny_dir, corpus_files):
    half = load_encoder(tiny_dir, device=torch.device("cpu"), dtype="bfloat16")
    assert half.model.conv1.weight.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    tokens = half.encode(corpus_files[0])
    assert len(tokens) == expected_token_count(sf.info(corpus_files[0]).frames)
    assert load_encoder(tiny_dir, device="cpu", dtype=torch.float32).device.type == "cpu"
    import pipeline

    assert isinstance(pipeline.load_encoder(tiny_dir), SpeechEncoder)  # the package-level entry point


def test_config_validation():
    with pytest.raises(ValueError, match="pooling_position 3 must not exceed quantize_position 2"):
        from pipeline.encoder.whisper_vq import WhisperVQEncoder

        WhisperVQEncoder(tiny_encoder_config(pooling_position=3, quantize_position=2))
    assert isinstance(tiny_encoder_config(), WhisperVQConfig)



@pytest.mark.parametrize("shards", [1, 2])
def test_loader_reads_pytorch_model_bin_like_safetensors(tiny_dir, tiny, corpus_files, tmp_path, shards):
    from pipeline.checkpoints import convert_to_bin

    folder = tmp_path / f"bin{shards}"
    shutil.copytree(tiny_dir, folder)
    written = convert_to_bin(folder, shards=shards)
    assert not list(folder.glob("*.safetensors")) and len(written) == shards
    assert (folder / "pytorch_model.bin.index.json").is_file() == (shards > 1)
    assert load_encoder(folder).encode(corpus_files[0]) == tiny.encode(corpus_files[0])
    state = torch.load(written[0], weights_only=True)
    key = next(iter(state))
    torch.save(dict(state, **{key: torch.zeros(3, 3)}), written[0])  # same strict shape check as safetensors
    with pytest.raises(ValueError, match=rf"{key}: shape \(3, 3\)"):
        load_encoder(folder)
    written[0].write_bytes(written[0].read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="cannot read"):
        load_encoder(folder)
