"""The tiny model set: small random checkpoints in exactly the released on-disk formats (the built-in default).

`write_tiny_set(dir)` writes `llm/` (Qwen2-MTP folder: config.json, generation_config.json,
model.safetensors, tokenizer files), `encoder/` (glm-4-voice-tokenizer layout) and `decoder/`
(glm-4-voice-decoder layout); `write_model_set(dir, llm=, decoder=)` does the same for the other named sizes
of `pipeline.sizes` (the benchmarks' "bench"). The models are real models with small sizes, so every code
path runs on them; they just say nothing meaningful. Same seed -> byte-identical files. No network.

The tokenizer keeps the released id *order* with a small text part: a byte-level BPE trained here on
`pipeline/data/tiny_corpus.txt`, then Qwen2.5's 22 specials, VITA-Audio's 20 specials and the 16384
`<|audio_i|>` tokens (non-special, as in the original). The LLM weights follow the parity fixtures'
recipe (../shared/parity/llm/README.md): logits with std ~4, so greedy decoding is not degenerate.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.sizes import CODEBOOK_SIZE, LLMSize, llm_size
from pipeline.tokens.chat import CHAT_TEMPLATE
from pipeline.tokens.vocab import (
    ENDOFTEXT_TOKEN,
    IM_END_TOKEN,
    QWEN_SPECIAL_TOKENS,
    TokenLayout,
    audio_token,
    vita_special_tokens,
)

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
TINY_MARKER = "tiny-models.json"  # written at the root of a tiny set
BPE_VOCAB = 256 + 2000  # upper bound (bytes + merges); the corpus yields a few hundred merges


TinyLLMConfig = LLMSize  # the old name of an LLM size (defaults: the tiny one)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tiny_tokenizer(plus: bool = False, codebook_size: int = CODEBOOK_SIZE):
    """A Qwen2-style tokenizer with the VITA-Audio vocabulary order and a small trained BPE text part.

    plus=True adds `<|context_of_audio|>` after `<|end_of_audio|>` like the Plus variants (audio ids shift by one).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Same normaliser / pre-tokeniser / decoder as Qwen2's byte-level BPE.
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer=trainer)

    # Appended in the released order: ids text | Qwen specials | VITA specials | audio codes.
    specials = [*QWEN_SPECIAL_TOKENS, *vita_special_tokens(plus)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(audio_token(i), special=False, normalized=True) for i in range(codebook_size)])

    hf = Qwen2Tokenizer(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        unk_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    layout = TokenLayout.from_tokenizer(hf)
    assert layout.codebook_size == codebook_size and len(hf) == tok.get_vocab_size(), "tokenizer layout is off"
    return hf


# ---------------------------------------------------------------------------------------------------------
# LLM


def llm_config_dict(layout: TokenLayout, cfg: LLMSize) -> dict:
    """config.json in the released key set (../shared/parity/llm/model/config.json)."""
    import transformers

    vocab_size = 8 * math.ceil(layout.vocab_size / 8)  # resize_token_embeddings(pad_to_multiple_of=8)
    return {
        "architectures": ["Qwen2MTPForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_qwen2.Qwen2MTPConfig",
            "AutoModelForCausalLM": "modeling_qwen2.Qwen2MTPForCausalLM",
        },
        "bos_token_id": layout.endoftext,
        "eos_token_id": layout.im_end,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": cfg.backbone_layers,
        "model_type": "qwen2_mtp",
        "mtp_loss_weight": 1.0,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.backbone_layers + cfg.mtp_modules,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_nextn_predict_layers": cfg.mtp_modules,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "speech_token_offset": layout.audio_offset,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def generation_config_dict(layout: TokenLayout, cfg: LLMSize) -> dict:
    """generation_config.json with the released sampling defaults and the Boost schedule."""
    import transformers

    return {
        "bos_token_id": layout.endoftext,
        "do_sample": True,
        "eos_token_id": list(layout.eos_ids),
        "mtp_inference_mode": list(cfg.mode),
        "pad_token_id": layout.endoftext,
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": transformers.__version__,
    }


@torch.no_grad()
def init_tiny_weights(model: torch.nn.Module, layout: TokenLayout, seed: int, cfg: LLMSize) -> None:
    """The parity recipe: one seeded generator over `named_parameters()` in order.

    embeddings N(0,1); linear weights N(0, 1/fan_in); q/k/v biases N(0, 0.2^2); RMSNorm weights U(0.7, 1.3)
    (so a swapped norm is visible); lm_head N(0, logit_std^2/hidden), its EOS rows scaled by eos_row_scale
    and its padding rows (ids >= tokenizer length) zeroed so no id without a token is ever likely.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 1.0, generator=g)
        elif name == "lm_head.weight":
            p.normal_(0.0, cfg.logit_std / math.sqrt(p.shape[1]), generator=g)
        elif "norm" in name:
            p.uniform_(0.7, 1.3, generator=g)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.2, generator=g)
        elif p.ndim == 2:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
        else:
            raise ValueError(f"no init rule for parameter {name} {tuple(p.shape)}")
    head = model.get_output_embeddings().weight
    head[list(layout.eos_ids)] *= cfg.eos_row_scale
    head[layout.vocab_size :] = 0.0


def write_tiny_llm(out_dir, seed: int = 0, cfg: LLMSize | str = "tiny") -> Path:
    """Write a random LLM folder (weights, configs, tiny tokenizer) of a size (`pipeline.sizes`) to `out_dir`,
    atomically."""
    from pipeline.llm import Qwen2MTPConfig, Qwen2MTPForCausalLM

    seed = _check_seed(seed)
    cfg = llm_size(cfg) if isinstance(cfg, str) else cfg
    out = Path(os.fspath(out_dir))
    tokenizer = build_tiny_tokenizer()
    layout = TokenLayout.from_tokenizer(tokenizer)
    config_json = llm_config_dict(layout, cfg)
    with _atomic_dir(out) as tmp:
        config = Qwen2MTPConfig.from_dict(config_json)
        model = Qwen2MTPForCausalLM(config).to(torch.float32)
        init_tiny_weights(model, layout, seed, cfg)
        with _quiet_progress():
            model.save_pretrained(tmp, safe_serialization=True)
        # The released key sets, not whatever this transformers version would write.
        _write_json(tmp / "config.json", config_json)
        _write_json(tmp / "generation_config.json", generation_config_dict(layout, cfg))
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # chat template inside tokenizer_config.json
    return out


# ---------------------------------------------------------------------------------------------------------
# The set


@dataclass(frozen=True)
class ModelPaths:
    """The three model folders of a set."""

    llm: Path
    encoder: Path
    decoder: Path

    @classmethod
    def from_root(cls, root) -> "ModelPaths":
        root = Path(os.fspath(root))
        if not root.is_dir():
            raise FileNotFoundError(f"models folder {str(root)!r} does not exist")
        paths = {name: root / name for name in ("llm", "encoder", "decoder")}
        for name, path in paths.items():
            if not path.is_dir():
                raise FileNotFoundError(f"models folder {str(root)!r} has no {name}/ folder (expected llm/, encoder/, decoder/)")
        return cls(**paths)


def write_model_set(out_dir, seed: int = 0, llm: str = "tiny", decoder: str = "tiny") -> dict[str, Path]:
    """Write a random set of named sizes (`pipeline.sizes`): llm/, encoder/ (tiny) and decoder/ under
    `out_dir`, in the released formats; each part appears only once complete."""
    from pipeline.decoder.tiny import decoder_config, write_decoder
    from pipeline.encoder.speech_encoder import write_tiny_encoder

    seed = _check_seed(seed)
    out = Path(os.fspath(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    paths = {"llm": write_tiny_llm(out / "llm", seed, llm)}
    config = decoder_config(decoder)
    for name, writer in (("encoder", write_tiny_encoder), ("decoder", lambda d, s: write_decoder(d, config, s))):
        with _atomic_dir(out / name) as tmp:
            writer(tmp, seed)
        paths[name] = out / name
    return paths


def write_tiny_set(out_dir, seed: int = 0, llm: str = "tiny", decoder: str = "tiny") -> dict[str, Path]:
    """Write the tiny set (`vita-audio tiny`): llm/, encoder/ and decoder/ of the "tiny" size, and its marker.

    `llm` names another LLM size (`vita-audio tiny --llm-size small`: the training acceptance's init) beside the
    same tokenizer, encoder and decoder, so shards prepared with either set fit both; `decoder` another decoder
    size (`bench pipeline`'s random bench-size set)."""
    paths = write_model_set(out_dir, seed, llm=llm, decoder=decoder)
    out = Path(os.fspath(out_dir))
    # Says what this folder is: tools use it to know the weights are random (e.g. to force the output layout).
    marker = {"random_weights": True, "seed": seed, "llm_size": llm, "decoder_size": decoder,
              "writer": "vita-audio tiny"}
    (out / TINY_MARKER).write_text(json.dumps(marker) + "\n")
    return paths


def is_tiny_set(root) -> bool:
    """True for a folder written by `write_tiny_set` (random weights), False for real checkpoints."""
    return (Path(os.fspath(root)) / TINY_MARKER).is_file()


def default_models_dir() -> Path:
    """`VITA_AUDIO_MODELS` if set, else the tiny set (seed 0) built once under $VITA_AUDIO_CACHE/tiny-seed0.

    The cache defaults to ~/.cache/vita-audio; a `.completed` marker and an fcntl lock make the build
    happen once even when several processes start at the same time.
    """
    env = os.environ.get("VITA_AUDIO_MODELS")
    if env:
        ModelPaths.from_root(env)
        return Path(env)
    cache = Path(os.environ.get("VITA_AUDIO_CACHE") or Path.home() / ".cache" / "vita-audio")
    root = cache / "tiny-seed0"
    marker = root / ".completed"
    if marker.is_file() and is_tiny_set(root):  # (a set cached by an older version lacks the tiny marker)
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "tiny-seed0.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (marker.is_file() and is_tiny_set(root)):
            write_tiny_set(root, seed=0)
            marker.write_text("tiny set, seed 0\n")
    return root


# ---------------------------------------------------------------------------------------------------------
# helpers


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _atomic_dir(final: Path):
    """Yield a temp folder next to `final`; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder should not be
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers create private (0600) files; a model folder is read by others
            f.chmod(0o755 if f.is_dir() else 0o644)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
