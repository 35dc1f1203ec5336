"""Tiny random GLM-4-Voice decoder written in the released on-disk format (config.yaml, flow.pt, hift.pt).

Real vocabulary (16384 codes, the LLM's audio codebook), small widths like the parity fixture.
Weights are seeded fan-in-scaled Gaussians; the F0 head is rescaled after init so that F0 has
mean 0 and std 40 Hz before `abs` on a random decode, which makes the NSF source voiced most of
the time and the output audible speech-like noise rather than silence.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.decoder.config import DecoderConfig, FlowConfig, HiFTConfig
from pipeline.decoder.flow import FlowModel
from pipeline.decoder.hift import F0Predictor, HiFTGenerator, WNConv1d
from pipeline.sizes import decoder_shape


CONFIG_TEMPLATE = """\
# Tiny random GLM-4-Voice speech decoder (vita-audio-ray `write_tiny_decoder`, seed {seed}). Same
# hyperpyyaml layout as the released glm-4-voice-decoder/config.yaml; widths and depths shrunk.
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: {sample_rate}
text_encoder_input_size: 16
llm_input_size: 16
llm_output_size: 16
spk_embed_dim: {spk_embed_dim}

# model params
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: 16
        attention_heads: 2
        linear_units: 32
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: 2
        linear_units: 32
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {f.input_size}
    output_size: {f.output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {f.vocab_size}
    input_frame_rate: {f.input_frame_rate}
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {f.encoder_dim}
        attention_heads: {f.encoder_heads}
        linear_units: {f.encoder_ffn}
        num_blocks: {f.encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: {f.block_size}
        input_size: {f.input_size}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: {f.output_size}
        sampling_ratios: {sampling_ratios}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: {f.output_size}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: {f.inference_cfg_rate}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {f.estimator_in_channels}
            out_channels: {f.output_size}
            channels: {channels}
            dropout: 0
            attention_head_dim: {f.attention_head_dim}
            n_blocks: {f.n_blocks}
            num_mid_blocks: {f.num_mid_blocks}
            num_heads: {f.num_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {h.in_channels}
    base_channels: {h.base_channels}
    nb_harmonics: {h.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {h.nsf_alpha}
    nsf_sigma: {h.nsf_sigma}
    nsf_voiced_threshold: {nsf_voiced_threshold}
    upsample_rates: {upsample_rates}
    upsample_kernel_sizes: {upsample_kernel_sizes}
    istft_params:
        n_fft: {h.n_fft}
        hop_len: {h.hop_len}
    resblock_kernel_sizes: {resblock_kernel_sizes}
    resblock_dilation_sizes: {resblock_dilation_sizes}
    source_resblock_kernel_sizes: {source_resblock_kernel_sizes}
    source_resblock_dilation_sizes: {source_resblock_dilation_sizes}
    lrelu_slope: {h.lrelu_slope}
    audio_limit: {h.audio_limit}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {h.in_channels}
        cond_channels: {h.f0_cond_channels}
"""


def _list(value) -> str:
    return str([list(v) if isinstance(v, tuple) else v for v in value])


def render_config(config: DecoderConfig, seed: int = 0) -> str:
    """config.yaml text in the released hyperpyyaml layout for `config`."""
    f, h = config.flow, config.hift
    return CONFIG_TEMPLATE.format(
        seed=seed, sample_rate=config.sample_rate, spk_embed_dim=f.spk_embed_dim, f=f, h=h,
        sampling_ratios=_list([1] * f.regulator_layers), channels=_list(f.channels),
        nsf_voiced_threshold=int(h.nsf_voiced_threshold) if float(h.nsf_voiced_threshold).is_integer() else h.nsf_voiced_threshold,
        upsample_rates=_list(h.upsample_rates), upsample_kernel_sizes=_list(h.upsample_kernel_sizes),
        resblock_kernel_sizes=_list(h.resblock_kernel_sizes), resblock_dilation_sizes=_list(h.resblock_dilation_sizes),
        source_resblock_kernel_sizes=_list(h.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=_list(h.source_resblock_dilation_sizes),
    )


@torch.no_grad()
def init_random(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded fan-in-scaled Gaussians for projections/convolutions, perturbed norms, small biases."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight_g":
            continue  # set from weight_v below
        if p.ndim >= 2:
            fan_in = p.shape[1] * (p.shape[2] if p.ndim == 3 else 1)
            if leaf == "weight_v" and ".ups." in f".{name}":
                fan_in = p.shape[0] * p.shape[2] // 8  # transposed conv: input channels x taps per output sample
            std = 1.0 / math.sqrt(max(fan_in, 1))
            if "input_embedding" in name:
                std = 1.0
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        elif leaf in ("alpha",):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
        elif leaf in ("pos_bias_u", "pos_bias_v"):
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        elif leaf == "weight":  # LayerNorm / GroupNorm gains
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
        else:  # biases
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    for sub in module.modules():
        if isinstance(sub, WNConv1d):  # weight norm with g = ||v|| (so the effective weight is v)
            norms = sub.weight_v.flatten(1).norm(dim=1)
            sub.weight_g.copy_(norms.view(-1, 1, 1))


@torch.no_grad()
def calibrate_f0(flow: FlowModel, hift: HiFTGenerator, generator: torch.Generator, f0_std: float = 40.0,
                 target_rms: float = 0.03) -> None:
    """Rescale the F0 head (F0 before `abs`: mean 0, std `f0_std` Hz) and the loudness on a random decode."""
    codes = torch.randint(0, flow.cfg.vocab_size, (1, 30), generator=generator)
    noise = torch.randn((1, flow.cfg.output_size, flow.n_frames(30)), generator=generator)
    mel = flow(codes, noise, None, 2)
    predictor: F0Predictor = hift.f0_predictor
    raw = predictor.classifier(predictor.condnet(mel).transpose(1, 2)).squeeze(-1)
    mean, std = raw.mean(), raw.std().clamp(min=1e-6)
    scale = f0_std / std
    predictor.classifier.weight.mul_(scale)
    predictor.classifier.bias.copy_((predictor.classifier.bias - mean) * scale)
    # loudness: shift the log-magnitude bias of conv_post so the speech rms is about `target_rms`
    half = hift.cfg.n_fft // 2 + 1
    for _ in range(3):
        speech, _, _ = hift(mel, generator)
        rms = speech.pow(2).mean().sqrt().clamp(min=1e-6)
        hift.conv_post.bias[:half] -= torch.log(rms / target_rms)


def decoder_config(size: str = "tiny") -> DecoderConfig:
    """The speech decoder config of a named size (`pipeline.sizes`: tiny, bench, 7B)."""
    shape = decoder_shape(size)
    return DecoderConfig(flow=FlowConfig(**shape["flow"]), hift=HiFTConfig(**shape["hift"]))


def tiny_config() -> DecoderConfig:
    return decoder_config("tiny")


def random_modules(config: DecoderConfig, seed: int = 0) -> tuple[FlowModel, HiFTGenerator]:
    """Flow + HiFT for `config` with seeded random weights (calibrated F0 and loudness), eval mode."""
    generator = torch.Generator().manual_seed(int(seed))
    flow, hift = FlowModel(config.flow), HiFTGenerator(config.hift)
    init_random(flow, generator)
    init_random(hift, generator)
    flow.eval(), hift.eval()
    calibrate_f0(flow, hift, generator)
    return flow, hift


def write_decoder(out_dir, config: DecoderConfig, seed: int = 0) -> Path:
    """Write `config` with seeded random weights as config.yaml + flow.pt + hift.pt into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flow, hift = random_modules(config, seed)
    (out / "config.yaml").write_text(render_config(config, seed))
    torch.save({k: v.contiguous().clone() for k, v in flow.state_dict().items()}, out / "flow.pt")
    torch.save({k: v.contiguous().clone() for k, v in hift.state_dict().items()}, out / "hift.pt")
    return out


def write_tiny_decoder(out_dir, seed: int = 0) -> Path:
    """Tiny decoder (vocab 16384, widths like the parity fixture) in the released format; returns the folder."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return write_decoder(out_dir, tiny_config(), seed)
