"""pipeline.tiny: the tiny LLM in the released format, determinism, the set, the cached default."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import pipeline.llm  # noqa: F401  (registers qwen2_mtp with the Auto classes)
from pipeline import tiny
from pipeline.tiny import ModelPaths, default_models_dir, write_tiny_llm
from pipeline.tokens.chat import CHAT_TEMPLATE, MODES
from pipeline.tokens.vocab import TokenLayout, load_tokenizer

LLM_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-llm")
    return {
        "a": write_tiny_llm(root / "a" / "llm", seed=0),
        "b": write_tiny_llm(root / "b" / "llm", seed=0),
        "seed1": write_tiny_llm(root / "c" / "llm", seed=1),
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_llm_folder_is_in_the_released_format(llm_dirs, shared_dir):
    llm = llm_dirs["a"]
    assert sorted(p.name for p in llm.iterdir()) == LLM_FILES
    config = json.loads((llm / "config.json").read_text())
    parity = json.loads((shared_dir / "parity" / "llm" / "model" / "config.json").read_text())
    assert sorted(config) == sorted(parity)  # same key set as a config written by the original code
    layout = TokenLayout.from_tokenizer(load_tokenizer(llm))
    assert config["model_type"] == "qwen2_mtp" and config["architectures"] == ["Qwen2MTPForCausalLM"]
    assert config["num_nextn_predict_layers"] == 10 and config["num_hidden_layers"] == 12
    assert (config["hidden_size"], config["intermediate_size"]) == (64, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["rope_theta"] == 1e6 and config["torch_dtype"] == "float32"
    assert config["speech_token_offset"] == layout.audio_offset
    assert config["vocab_size"] % 8 == 0 and 0 <= config["vocab_size"] - layout.vocab_size < 8
    assert (config["bos_token_id"], config["eos_token_id"]) == (layout.endoftext, layout.im_end)
    for key in ("hidden_act", "rms_norm_eps", "tie_word_embeddings", "use_sliding_window", "sliding_window", "max_position_embeddings"):
        assert config[key] == parity[key], key

    gen = json.loads((llm / "generation_config.json").read_text())
    assert gen["mtp_inference_mode"] == MODES["boost"]
    assert gen["eos_token_id"] == [layout.im_end, layout.endoftext] and gen["pad_token_id"] == layout.endoftext
    assert {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")} == {
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05
    }
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(llm).mtp_inference_mode == [1, 10, 4, 10]


def test_tokenizer_loads_offline_with_the_chat_template(llm_dirs, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(llm_dirs["a"]))
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert json.loads((llm_dirs["a"] / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    text = "Hello there.<|begin_of_audio|><|audio_0|><|audio_16383|><|end_of_audio|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # audio tokens are not special: skip_special_tokens drops BOA/EOA but keeps the codes (spec §2.1)
    assert tok.decode(ids, skip_special_tokens=True) == "Hello there.<|audio_0|><|audio_16383|>"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(llm_dirs["a"] / "missing")


def test_same_seed_same_bytes_other_seed_other_weights(llm_dirs):
    a, b, c = llm_dirs["a"], llm_dirs["b"], llm_dirs["seed1"]
    for name in LLM_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (c / name).read_bytes(), name
    ta, tc = _tensors(a), _tensors(c)
    assert ta.keys() == tc.keys()
    assert all(not torch.equal(ta[k], tc[k]) for k in ta)


def test_weights_follow_the_parity_recipe(llm_dirs):
    t = _tensors(llm_dirs["a"])
    layout = TokenLayout.from_tokenizer(load_tokenizer(llm_dirs["a"]))
    assert all(v.dtype == torch.float32 for v in t.values())
    assert {f"mtp_projs.{k}.weight" for k in range(10)} <= t.keys() and "model.layers.11.mlp.down_proj.weight" in t
    assert abs(t["model.embed_tokens.weight"].std().item() - 1.0) < 0.05
    norms = [v for k, v in t.items() if "norm" in k]
    assert len(norms) == 2 * 12 + 1 + 2 * 10 and all(0.7 <= v.min() and v.max() <= 1.3 for v in norms)
    q = t["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - 64**-0.5) < 0.02 and abs(t["model.layers.0.self_attn.q_proj.bias"].std() - 0.2) < 0.1
    head = t["lm_head.weight"]
    rows = head[: layout.vocab_size].norm(dim=1)
    eos = head[list(layout.eos_ids)].norm(dim=1)
    assert (eos < 0.5 * rows.median()).all()  # EOS rows scaled by 0.25
    assert (head[layout.vocab_size :] == 0).all()  # padding rows (no token) are never likely


def test_automodel_loads_and_gives_std4_logits(llm_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_dirs["a"])
    assert isinstance(model, pipeline.Qwen2MTPForCausalLM) and model.num_mtp_modules == 10
    same = pipeline.load_llm(llm_dirs["a"])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, same(ids).logits)
    assert 3.0 < logits.std().item() < 5.0


def test_model_paths_from_root(tmp_path):
    for name in ("llm", "encoder"):
        (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError, match="decoder/"):
        ModelPaths.from_root(tmp_path)
    (tmp_path / "decoder").mkdir()
    paths = ModelPaths.from_root(tmp_path)
    assert (paths.llm, paths.encoder, paths.decoder) == (tmp_path / "llm", tmp_path / "encoder", tmp_path / "decoder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelPaths.from_root(tmp_path / "nope")


def test_bad_seed_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        write_tiny_llm(tmp_path / "llm", seed=-1)
    assert not (tmp_path / "llm").exists()


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "part"
    with pytest.raises(RuntimeError):
        with tiny._atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with tiny._atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with tiny._atomic_dir(final) as tmp:  # rewriting replaces the old folder as a whole
        (tmp / "b").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["part"] and [p.name for p in final.iterdir()] == ["b"]


def test_default_models_dir_env_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "models"
    for name in ("llm", "encoder", "decoder"):
        (root / name).mkdir(parents=True)
    monkeypatch.setenv("VITA_AUDIO_MODELS", str(root))
    assert default_models_dir() == root
    monkeypatch.setenv("VITA_AUDIO_MODELS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        default_models_dir()

    # Without VITA_AUDIO_MODELS: built once under $VITA_AUDIO_CACHE/tiny-seed0, even with concurrent callers.
    monkeypatch.delenv("VITA_AUDIO_MODELS")
    monkeypatch.setenv("VITA_AUDIO_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_write(out, seed=0):
        calls.append(seed)
        for name in ("llm", "encoder", "decoder"):
            (Path(out) / name).mkdir(parents=True)
        (Path(out) / tiny.TINY_MARKER).write_text("{}")
        return {}

    monkeypatch.setattr(tiny, "write_tiny_set", fake_write)
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_models_dir())) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert calls == [0] and set(results) == {tmp_path / "cache" / "tiny-seed0"}
    assert (tmp_path / "cache" / "tiny-seed0" / ".completed").is_file()
    ModelPaths.from_root(results[0])


def test_write_tiny_set_and_cli(tmp_path):
    from cli.main import main

    paths = tiny.write_tiny_set(tmp_path / "set", seed=0)
    assert set(paths) == {"llm", "encoder", "decoder"}
    ModelPaths.from_root(tmp_path / "set")
    assert tiny.is_tiny_set(tmp_path / "set") and not tiny.is_tiny_set(paths["llm"])  # the set says it is random
    assert [p.name for p in (tmp_path / "set").iterdir() if p.name.startswith(".")] == []  # no temp folders left
    assert main(["tiny", str(tmp_path / "cli"), "--seed", "0"]) == 0
    for name in LLM_FILES:
        assert (tmp_path / "cli" / "llm" / name).read_bytes() == (paths["llm"] / name).read_bytes()


def test_named_sizes_are_shared(llm_dirs):
    """One table of sizes (pipeline.sizes): the tiny set is its "tiny" size, the benchmarks build "bench"."""
    from pipeline.decoder.tiny import decoder_config, tiny_config
    from pipeline.sizes import LLM_SIZES, build_llm, decoder_shape, llm_size

    config = json.loads((llm_dirs["a"] / "config.json").read_text())
    tiny_size = LLM_SIZES["tiny"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_nextn_predict_layers"]) == (
        tiny_size.hidden_size, tiny_size.backbone_layers + tiny_size.mtp_modules, tiny_size.mtp_modules)
    assert tiny_config() == decoder_config("tiny")
    assert decoder_config("bench").flow.encoder_dim == decoder_shape("bench")["flow"]["encoder_dim"] == 128
    seven = llm_size("7B")
    assert (seven.hidden_size, seven.intermediate_size, seven.num_attention_heads, seven.num_key_value_heads) == (
        3584, 18944, 28, 4)
    small = build_llm(LLM_SIZES["tiny"], vocab_size=16387 + 64)
    assert small.num_mtp_modules == tiny_size.mtp_modules and small.config.speech_token_offset == 64
    with pytest.raises(ValueError, match="unknown LLM size"):
        llm_size("13B")


def test_cli_writes_a_set_with_another_llm_size(tmp_path):
    """`vita-audio tiny --llm-size small`: the training acceptance's init, the small LLM beside the tiny tokenizer,
    encoder and decoder (so shards prepared with the tiny set fit it)."""
    from cli.main import main
    from pipeline.sizes import LLM_SIZES

    assert main(["tiny", str(tmp_path / "small"), "--llm-size", "small", "--json"]) == 0
    model = pipeline.load_llm(tmp_path / "small" / "llm")
    shape, config = LLM_SIZES["small"], model.config
    assert (config.hidden_size, config.intermediate_size, config.num_key_value_heads) == (
        shape.hidden_size, shape.intermediate_size, shape.num_key_value_heads)
    assert (model.num_backbone_layers, model.num_mtp_modules) == (shape.backbone_layers, shape.mtp_modules) == (12, 10)
    assert json.loads((tmp_path / "small" / tiny.TINY_MARKER).read_text())["llm_size"] == "small"
    default = default_models_dir()
    for name in ("llm/tokenizer.json", "encoder/model.safetensors", "decoder/flow.pt"):
        assert (tmp_path / "small" / name).read_bytes() == (default / name).read_bytes(), name
    assert main(["tiny", str(tmp_path / "big"), "--llm-size", "7B"]) == 2  # the 7B is never written at random
