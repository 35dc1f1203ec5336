"""The WhisperVQ model of the GLM-4-Voice speech encoder (spec §4): its config and modules, up to the quantizer.

Built on transformers' own `WhisperEncoderLayer` (same weights, names and pre-LN numerics as the original
`WhisperVQEncoderLayer`). `pipeline.encoder` wraps it into the speech encoder (windows, batching, loading).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer


@strict
class WhisperVQConfig(WhisperConfig):
    """`WhisperConfig` plus the GLM-4-Voice pooling/quantizer fields (released config.json, model_type "whisper")."""

    model_type = "whisper"

    pooling_kernel_size: int | None = None
    pooling_type: str = "max"
    pooling_position: int = 0  # pool after this many layers (0: never)
    quantize_vocab_size: int | None = None
    quantize_position: int = 16  # quantize after this many layers
    quantize_commit_coefficient: float | int = 0.25
    quantize_loss_scale: float | int = 1.0
    quantize_ema_decay: float | None = None  # set -> the EMA buffers exist in the state dict
    quantize_restart_interval: int | None = None
    quantize_encoder_only: bool = False  # True: only layers < quantize_position exist, no final layer_norm
    quantize_causal_encoder: bool = False
    quantize_causal_block_size: int | None = None  # in 50 Hz frames; 200 = 4 s
    skip_language_detection: bool = False
    encoder_causal_attention: bool = False
    encoder_causal_convolution: bool = False


def _validate(config: WhisperVQConfig) -> None:
    for name in ("quantize_vocab_size", "quantize_position", "pooling_position", "pooling_kernel_size",
                 "quantize_causal_block_size"):
        value = getattr(config, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"config {name} must be an integer, got {value!r}")
    if config.quantize_vocab_size is None or config.quantize_vocab_size < 1:
        raise ValueError(f"quantize_vocab_size must be a positive int, got {config.quantize_vocab_size!r}")
    if config.quantize_position < 1:
        raise ValueError(f"quantize_position must be >= 1, got {config.quantize_position}")
    if not config.quantize_encoder_only and config.quantize_position > config.encoder_layers:
        raise ValueError(
            f"quantize_position {config.quantize_position} > encoder_layers {config.encoder_layers}"
        )
    if config.pooling_kernel_size is not None:
        if config.pooling_type not in ("avg", "max"):
            raise ValueError(f"pooling_type must be 'avg' or 'max', got {config.pooling_type!r}")
        if config.pooling_position > config.quantize_position:
            raise ValueError(
                f"pooling_position {config.pooling_position} must not exceed quantize_position "
                f"{config.quantize_position} (the quantizer works on pooled frames)"
            )


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only, so frame t never sees frames after t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.left_padding = self.dilation[0] * (kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (self.left_padding, 0)))


class _CenteredConv1d(nn.Conv1d):
    """Whisper's original (non-causal) convolution: padding 1 on both sides."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def attention_bias(
    frame_mask: torch.Tensor, block_size: int | None, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention bias (B, 1, T, T): 0 where query t may see key s, dtype-min elsewhere.

    A query sees a key when the key is a real frame (frame_mask) and, if `causal`, s <= t; with a
    `block_size`, s <= t or s in t's block (block-causal); otherwise every real frame.
    """
    B, T = frame_mask.shape
    t = torch.arange(T, device=frame_mask.device)
    if causal:
        allowed = t[None, :] <= t[:, None]
    elif block_size is not None:
        block = t // block_size
        allowed = (t[None, :] <= t[:, None]) | (block[None, :] == block[:, None])
    else:
        allowed = torch.ones(T, T, dtype=torch.bool, device=frame_mask.device)
    allowed = allowed[None] & frame_mask[:, None, :].bool()  # (B, T, T)
    bias = torch.zeros(B, 1, T, T, dtype=dtype, device=frame_mask.device)
    return bias.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def vector_quantize(hidden: torch.Tensor, codebook: torch.Tensor, rows_per_chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every vector of hidden (..., D) -> (...).

    Uses the original's ||c||^2 + ||x||^2 - 2 x.c in float32 so near-ties resolve the same way.
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).float()  # (N, D)
    codebook = codebook.float()
    codebook_sqr = torch.sum(codebook**2, dim=1)  # (V,)
    ids = []
    for chunk in flat.split(rows_per_chunk):
        distances = torch.addmm(codebook_sqr + torch.sum(chunk**2, dim=1, keepdim=True), chunk, codebook.t(),
                                alpha=-2.0, beta=1.0)  # (n, V)
        ids.append(torch.min(distances, dim=1).indices)
    return torch.cat(ids).reshape(hidden.shape[:-1])


@dataclass
class WhisperVQOutput:
    token_ids: torch.Tensor  # (B, N) long, N = T_f / (conv stride * pooling kernel)
    token_mask: torch.Tensor  # (B, N) bool: token comes from real audio
    pre_vq_hidden: torch.Tensor  # (B, N, D) the states that enter the quantizer


class WhisperVQEncoder(nn.Module):
    """The WhisperVQ encoder up to its quantizer; state-dict names as in the released model.safetensors."""

    def __init__(self, config: WhisperVQConfig):
        super().__init__()
        _validate(config)
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"
        self.config = config
        D = config.d_model
        conv = CausalConv1d if config.encoder_causal_convolution else _CenteredConv1d
        self.conv1 = conv(config.num_mel_bins, D, kernel_size=3)
        self.conv2 = conv(D, D, kernel_size=3, stride=2)
        self.embed_positions = nn.Embedding(config.max_source_positions, D)
        # Only the layers before the quantizer decide the ids; later ones (if a checkpoint has them) are skipped.
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.quantize_position))
        pools = bool(config.pooling_kernel_size) and config.pooling_position >= 1
        self.pool_kernel = config.pooling_kernel_size if pools else 1
        self.pool_after = config.pooling_position if pools else 0  # after this many layers (0: never)
        self.pooling = {"avg": nn.AvgPool1d, "max": nn.MaxPool1d}[config.pooling_type](self.pool_kernel) \
            if self.pool_after else None
        self.codebook = nn.Embedding(config.quantize_vocab_size, D)
        self.embed_positions2 = nn.Embedding(math.ceil(config.max_source_positions / self.pool_kernel), D)
        self.causal = bool(config.encoder_causal_attention or config.quantize_causal_encoder)

    @property
    def frame_stride(self) -> int:
        """Feature frames (100 Hz) per encoder frame."""
        return self.conv1.stride[0] * self.conv2.stride[0]

    @property
    def token_stride(self) -> int:
        """Feature frames (100 Hz) per token."""
        return self.frame_stride * self.pool_kernel

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> WhisperVQOutput:
        """input_features (B, n_mels, T_f), attention_mask (B, T_f) 1 = real frame -> ids (B, T_f / token_stride).

        A row padded with zero features beyond a multiple of `token_stride` frames gives the same
        ids as the row alone: the convolutions' own zero padding sees the same zeros, padded frames
        are never attention keys, and pooling groups stay aligned, so nothing reaches a real token.
        """
        B, _, T_f = input_features.shape
        if T_f % self.frame_stride:
            raise ValueError(f"input_features length {T_f} must be a multiple of {self.frame_stride} frames")
        if T_f // self.frame_stride > self.config.max_source_positions:
            raise ValueError(
                f"input_features has {T_f} frames, more than max_source_positions "
                f"{self.config.max_source_positions} x {self.frame_stride} (30 s windows)"
            )
        if attention_mask is None or attention_mask.shape != (B, T_f):
            raise ValueError(f"attention_mask must have shape {(B, T_f)}, got "
                             f"{None if attention_mask is None else tuple(attention_mask.shape)}")
        dtype = self.conv1.weight.dtype
        x = nn.functional.gelu(self.conv1(input_features.to(dtype)))  # (B, D, T_f)
        x = nn.functional.gelu(self.conv2(x))  # (B, D, T)
        x = x.transpose(1, 2)  # (B, T, D)
        T = x.shape[1]
        x = x + self.embed_positions.weight[:T]

        frame_mask = attention_mask[:, :: self.frame_stride].bool()  # (B, T)
        block = self.config.quantize_causal_block_size
        bias = attention_bias(frame_mask, block, self.causal, dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, bias)
            if i + 1 == self.pool_after:
                x = x.transpose(1, 2)  # (B, D, T)
                if x.shape[-1] % self.pool_kernel:
                    x = nn.functional.pad(x, (0, self.pool_kernel - x.shape[-1] % self.pool_kernel))
                x = self.pooling(x).transpose(1, 2)  # (B, T / k, D)
                frame_mask = frame_mask[:, :: self.pool_kernel]
                bias = attention_bias(frame_mask, block // self.pool_kernel if block else None, self.causal, dtype)
        token_ids = vector_quantize(x, self.codebook.weight)  # (B, N)
        return WhisperVQOutput(token_ids=token_ids, token_mask=frame_mask, pre_vq_hidden=x)
