"""The named model sizes, in one place: "tiny" (the built-in test set `vita-audio tiny` writes), "small" (the
training acceptance's LLM: the 7B's proportions at a CPU-trainable width), "bench" (the benchmark size of
../shared/research/original-speed.md) and "7B" (the released VITA-Audio, spec §1).

`llm_size(name)` gives an LLM's shape, `encoder_shape(name)` the speech encoder's, `decoder_shape(name)` the
audio decoder's (as `FlowConfig` / `HiFTConfig` arguments; `pipeline.decoder.tiny.decoder_config(name)` builds the config); the random writers
(`pipeline.tiny.write_model_set`) put a set of a size on disk in the released formats; `build_llm` builds a
random LLM of a size in memory; `make_drafting_model` turns one into a model whose MCTP drafts agree with
its backbone (lossless decoding's good case). Plain data, below every model module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.tokens.chat import MODES

__all__ = ["LLMSize", "LLM_SIZES", "SIZES", "llm_size", "decoder_shape", "encoder_shape", "ENCODER_SIZES", "build_llm", "make_drafting_model",
           "RELEASE_VOCAB_SIZE", "CODEBOOK_SIZE"]

CODEBOOK_SIZE = 16384  # GLM-4-Voice VQ: the encoder's, the decoder's and the LLM's audio codebook
RELEASE_VOCAB_SIZE = 168072  # the released LLM's rows (spec §2)


@dataclass(frozen=True)
class LLMSize:
    """Shape of a Qwen2-MTP LLM, plus how the random writer initialises it (defaults: the tiny set, sized like
    the parity fixtures' `mtp10` model)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    backbone_layers: int = 2
    mtp_modules: int = 10
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 1e6
    logit_std: float = 4.0  # random writer: lm_head ~ N(0, logit_std^2 / hidden), logits with std ~4
    eos_row_scale: float = 0.25  # random writer: shrink the EOS rows so the random model rarely stops at once
    mode: tuple[int, ...] = tuple(MODES["boost"])  # generation_config.mtp_inference_mode


LLM_SIZES: dict[str, LLMSize] = {
    "tiny": LLMSize(),
    # A deep backbone against 1-layer modules, as in the 7B (28 layers, intermediate 5.3x hidden): measured on
    # this CPU with the tiny tokenizer's 17144 rows, a module forward costs 0.26 of a 1-token backbone forward
    # (tiny: 0.99, where drafting cannot pay off); benchmarks/train-acceptance.md trains it.
    "small": LLMSize(hidden_size=128, intermediate_size=688, backbone_layers=12, mtp_modules=10,
                     num_attention_heads=4, num_key_value_heads=1),
    "bench": LLMSize(hidden_size=256, intermediate_size=1376, backbone_layers=28, mtp_modules=10,
                     num_attention_heads=4, num_key_value_heads=1),
    "7B": LLMSize(hidden_size=3584, intermediate_size=18944, backbone_layers=28, mtp_modules=10,
                  num_attention_heads=28, num_key_value_heads=4),
}

# speech decoder: FlowConfig / HiFTConfig arguments (the codebook's 16384 codes, blocks of 10 ids, in every size)
_DECODER = {
    "tiny": {"flow": dict(input_size=32, encoder_dim=32, encoder_heads=2, encoder_ffn=64, encoder_blocks=2,
                          channels=(32, 32), attention_head_dim=8, n_blocks=1, num_mid_blocks=2, num_heads=2),
             "hift": dict(base_channels=32, f0_cond_channels=32)},
    "bench": {"flow": dict(input_size=128, encoder_dim=128, encoder_heads=2, encoder_ffn=512, encoder_blocks=6,
                           channels=(64, 64), attention_head_dim=16, num_heads=2, n_blocks=4, num_mid_blocks=12),
              "hift": dict(base_channels=128, f0_cond_channels=128)},
    "7B": {"flow": {}, "hift": {}},  # the released glm-4-voice-decoder: the configs' defaults
}
# speech encoder: overrides of `pipeline.encoder.tiny_encoder_config` (the released structure at small widths)
_ENCODER = {
    "tiny": {},  # d_model 32, 2 heads, FFN 64
    "bench": dict(d_model=256, encoder_attention_heads=4, encoder_ffn_dim=1024, encoder_layers=4,
                  quantize_position=4, pooling_position=4),
}
SIZES = tuple(LLM_SIZES)
ENCODER_SIZES = tuple(_ENCODER)


def llm_size(name: str) -> LLMSize:
    if name not in LLM_SIZES:
        raise ValueError(f"unknown LLM size {name!r}: use one of {sorted(LLM_SIZES)}")
    return LLM_SIZES[name]


def decoder_shape(name: str) -> dict[str, dict]:
    """{"flow": FlowConfig arguments, "hift": HiFTConfig arguments} of the speech decoder of a size."""
    if name not in _DECODER:
        raise ValueError(f"unknown decoder size {name!r}: use one of {sorted(_DECODER)}")
    shape = _DECODER[name]
    return {"flow": dict(vocab_size=CODEBOOK_SIZE, block_size=10, **shape["flow"]), "hift": dict(shape["hift"])}


def encoder_shape(name: str) -> dict:
    """`tiny_encoder_config(**overrides)` overrides of the speech encoder of a size (tiny, bench; 7B: the release)."""
    if name not in _ENCODER:
        raise ValueError(f"unknown encoder size {name!r}: use one of {sorted(_ENCODER)}")
    return dict(_ENCODER[name])


def build_llm(size: str | LLMSize, vocab_size: int = 69632, seed: int = 11):
    """A random Qwen2-MTP LLM of a size in memory (float32, the model's own init after `manual_seed(seed)`),
    with the release's id layout at the end of the vocabulary: 16384 codes + 3 padding rows, the specials
    before them. The default vocabulary is that of ../shared/research/original-speed.md's benchmark."""
    from pipeline.llm import Qwen2MTPConfig, Qwen2MTPForCausalLM

    shape = llm_size(size) if isinstance(size, str) else size
    offset = vocab_size - (CODEBOOK_SIZE + 3)
    config = Qwen2MTPConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.backbone_layers + shape.mtp_modules, num_nextn_predict_layers=shape.mtp_modules,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=32768, rope_theta=shape.rope_theta, rms_norm_eps=1e-6, tie_word_embeddings=False,
        speech_token_offset=offset, bos_token_id=offset - 42, eos_token_id=offset - 40, pad_token_id=offset - 42,
    )
    torch.manual_seed(seed)
    return Qwen2MTPForCausalLM(config).eval().set_decode_kernels("auto")  # as load_llm does


def make_drafting_model(model, broken_modules=(), backbone_scale: float = 0.05):
    """Make MCTP drafts agree with the backbone, training-free (lossless decoding's good case).

    The backbone's attention / MLP outputs are scaled by `backbone_scale` so its next token depends mostly
    (0.0: only) on the current token; each module's projection passes the embedding half through and its
    decoder layer is zeroed to an identity, so module k at row t outputs norm(embed(x_{t+k+1})), the
    backbone's (near-)prediction of x_{t+k+2}. Modules in `broken_modules` keep their weights (their drafts
    are rejected). Every layer still runs, so forward costs are unchanged.
    """
    H = model.config.hidden_size
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            scale = backbone_scale if i < model.num_backbone_layers else 0.0
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
        for k in range(model.num_mtp_modules):
            if k in broken_modules:
                continue
            model.mtp_projs[k].weight.zero_()
            model.mtp_projs[k].weight[:, :H] = torch.eye(H)
            model.mtp_embed_norms[k].weight.fill_(1.0)
    return model
