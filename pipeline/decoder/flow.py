"""Flow-matching model: audio codes -> 80-bin mel at 22050/256 frames per second.

Data path (GLM-4-Voice `MaskedDiffWithXvec.inference`, eval mode):
  ids -> input_embedding -> BlockConformerEncoder (relative positions, block-causal attention)
      -> encoder_proj (to 80) -> InterpolateRegulator (nearest to the frame count + convs) = mu
  noise z ~ N(0, 1) -> Euler ODE over a cosine time grid, the velocity from the U-Net estimator
      with classifier-free guidance: v = (1 + r) est(x, mu, spk, cond) - r est(x, 0, 0, 0)
Module attribute names follow the released `flow.pt` keys so the state dict loads by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.decoder.config import FlowConfig


def frames_for_tokens(n_tokens: int, input_frame_rate: float = 12.5) -> int:
    """Mel frames for n tokens, computed as the original does (int32 tensor / rate, float32)."""
    length = torch.tensor([n_tokens], dtype=torch.int32)
    return int((length / input_frame_rate * 22050 / 256).int().item())


# ----------------------------------------------------------------------------------------------
# Encoder: BlockConformerEncoder (no conv module, not macaron, pre-norm)
# ----------------------------------------------------------------------------------------------


def rel_positional_encoding(length: int, d_model: int, device=None, dtype=None) -> torch.Tensor:
    """ESPnet relative positions for `length` queries: (1, 2*length-1, d), from +(T-1) down to -(T-1)."""
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe_positive = torch.zeros(length, d_model)
    pe_negative = torch.zeros(length, d_model)
    pe_positive[:, 0::2] = torch.sin(position * div_term)
    pe_positive[:, 1::2] = torch.cos(position * div_term)
    pe_negative[:, 0::2] = torch.sin(-1 * position * div_term)
    pe_negative[:, 1::2] = torch.cos(-1 * position * div_term)
    pe = torch.cat([torch.flip(pe_positive, [0]), pe_negative[1:]], dim=0).unsqueeze(0)
    return pe.to(device=device, dtype=dtype)


def block_causal_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(T, T) bool: query i sees key j when j is in i's block of `block_size` or any earlier one."""
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


class LinearEmbed(nn.Module):
    """`input_layer: linear`: Linear + LayerNorm (+ dropout); then x * sqrt(d)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-5), nn.Dropout(0.0))
        self.xscale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class BlockRelPositionAttention(nn.Module):
    """Transformer-XL style attention with relative positions (matrix a+c and b+d) and a block mask."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.h, self.d_k = n_head, dim // n_head
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, 2T-1) scores over relative positions -> (B, H, T, T) over key positions."""
        b, h, t, p = x.shape
        x = torch.cat([x.new_zeros(b, h, t, 1), x], dim=-1)  # (B, H, T, 2T)
        x = x.view(b, h, p + 1, t)[:, :, 1:].reshape(b, h, t, p)
        return x[:, :, :, : p // 2 + 1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)  # (B, T, H, dk)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)  # (B, H, T, dk)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, dk)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, dk)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, T, T)
        matrix_bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))  # (B, H, T, T)
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        blocked = ~mask[:, None]  # (B, 1, T, T)
        scores = scores.masked_fill(blocked, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = BlockRelPositionAttention(dim, heads)
        self.feed_forward = FeedForward(dim, ffn)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-5)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, mask, pos_emb):
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class BlockConformerEncoder(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.block_size = cfg.block_size
        self.dim = cfg.encoder_dim
        self.embed = LinearEmbed(cfg.input_size, cfg.encoder_dim)
        self.encoders = nn.ModuleList(
            ConformerBlock(cfg.encoder_dim, cfg.encoder_heads, cfg.encoder_ffn) for _ in range(cfg.encoder_blocks)
        )
        self.after_norm = nn.LayerNorm(cfg.encoder_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, input_size) token embeddings -> (B, T, d); every item has the full length T."""
        B, T, _ = x.shape
        x = self.embed(x)
        pos_emb = rel_positional_encoding(T, self.dim, x.device, x.dtype)
        mask = block_causal_mask(T, self.block_size, x.device)[None].expand(B, T, T)
        for layer in self.encoders:
            x = layer(x, mask, pos_emb)
        return self.after_norm(x)


class InterpolateRegulator(nn.Module):
    """Nearest interpolation of token states to the mel frame count, then 4 x (conv, GroupNorm(1), Mish), 1x1 conv."""

    def __init__(self, channels: int, n_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n_layers):
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(1, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, n_frames: int) -> torch.Tensor:
        """(B, T_tokens, C) -> (B, C, n_frames)."""
        x = F.interpolate(h.transpose(1, 2).contiguous(), size=n_frames, mode="nearest")
        return self.model(x)


# ----------------------------------------------------------------------------------------------
# Estimator: Matcha-TTS ConditionalDecoder (1-D U-Net with transformer blocks)
# ----------------------------------------------------------------------------------------------


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) or () time -> (B, dim): [sin, cos] of scale * t * exp(-log(1e4) k / (dim/2 - 1))."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    emb = scale * t.unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x):
        return self.block(x)


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x, time_emb):
        h = self.block1(x) + self.mlp(time_emb).unsqueeze(-1)
        return self.block2(h) + self.res_conv(x)


class Downsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Attention(nn.Module):
    """diffusers `Attention` as used by Matcha: no q/k/v bias, output Linear (+ dropout)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd); the original's all-ones mask is a no-op
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x))


class TransformerBlock(nn.Module):
    """Matcha `BasicTransformerBlock` (self-attention + GELU feed-forward, pre-LayerNorm)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GELUProj(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim)])

    def forward(self, x):
        x = self.attn1(self.norm1(x)) + x
        h = self.norm3(x)
        for layer in self.ff.net:
            h = layer(h)
        return h + x


def _transformers(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    x = x.transpose(1, 2)  # (B, C, T) -> (B, T, C)
    for block in blocks:
        x = block(x)
    return x.transpose(1, 2).contiguous()


class ConditionalDecoder(nn.Module):
    """The velocity estimator: input [x, mu, spks, cond] stacked on channels -> (B, 80, T)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        channels = tuple(cfg.channels)
        in_channels = cfg.estimator_in_channels
        self.time_dim = in_channels
        time_embed_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_embed_dim)

        def transformers(dim):
            return nn.ModuleList(TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks))

        self.down_blocks = nn.ModuleList()
        out_ch = in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            is_last = i == len(channels) - 1
            down = nn.Conv1d(out_ch, out_ch, 3, padding=1) if is_last else Downsample1D(out_ch)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_embed_dim), transformers(out_ch), down]))
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], channels[-1], time_embed_dim), transformers(channels[-1])])
            for _ in range(cfg.num_mid_blocks)
        )
        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            in_ch, out_ch = up_channels[i] * 2, up_channels[i + 1]
            is_last = i == len(up_channels) - 2
            up = nn.Conv1d(out_ch, out_ch, 3, padding=1) if is_last else Upsample1D(out_ch)
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_embed_dim), transformers(out_ch), up]))
        self.final_block = Block1D(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], cfg.output_size, 1)

    def forward(self, x, mu, t, spks, cond):
        """x, mu, cond: (B, 80, T); t: () time; spks: (B, 80). Masks are all ones (full-length items) and omitted."""
        t = self.time_mlp(sinusoidal_time_embedding(t, self.time_dim).to(x.dtype))  # (1, 4 * channels[0])
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)  # (B, 320, T)
        hiddens = []
        for resnet, blocks, downsample in self.down_blocks:
            x = _transformers(blocks, resnet(x, t))
            hiddens.append(x)
            x = downsample(x)
        for resnet, blocks in self.mid_blocks:
            x = _transformers(blocks, resnet(x, t))
        for resnet, blocks, upsample in self.up_blocks:
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = upsample(_transformers(blocks, resnet(x, t)))
        return self.final_proj(self.final_block(x))


class ConditionalCFM(nn.Module):
    """Euler solver of the flow ODE with classifier-free guidance (the noise is passed in)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg_rate = cfg.inference_cfg_rate
        self.estimator = ConditionalDecoder(cfg)

    def forward(self, noise, mu, spks, cond, n_steps: int) -> torch.Tensor:
        t_span = torch.linspace(0, 1, n_steps + 1, device=mu.device, dtype=mu.dtype)
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        x, t, dt = noise, t_span[0], t_span[1] - t_span[0]
        zeros_mu, zeros_spks, zeros_cond = torch.zeros_like(mu), torch.zeros_like(spks), torch.zeros_like(cond)
        for step in range(1, n_steps + 1):
            if self.cfg_rate > 0:
                # the conditional and unconditional passes in one batch of 2B (same math as two calls)
                both = self.estimator(torch.cat([x, x]), torch.cat([mu, zeros_mu]), t,
                                      torch.cat([spks, zeros_spks]), torch.cat([cond, zeros_cond]))
                v, v_uncond = both.chunk(2)
                v = (1.0 + self.cfg_rate) * v - self.cfg_rate * v_uncond
            else:
                v = self.estimator(x, mu, t, spks, cond)
            x = x + dt * v
            t = t + dt
            if step < n_steps:
                dt = t_span[step + 1] - t
        return x


# ----------------------------------------------------------------------------------------------
# The flow model
# ----------------------------------------------------------------------------------------------


class FlowModel(nn.Module):
    """`MaskedDiffWithXvec` (inference only); the speaker x-vector is zeros as in GLM-4-Voice/VITA-Audio."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = BlockConformerEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.encoder_dim, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.output_size, cfg.regulator_layers)
        self.decoder = ConditionalCFM(cfg)

    def n_frames(self, n_tokens: int) -> int:
        return frames_for_tokens(n_tokens, self.cfg.input_frame_rate)

    def mu(self, tokens: torch.Tensor, n_frames: int | None = None) -> torch.Tensor:
        """(B, N) ids -> mu (B, 80, n_frames): the conditioning mean the ODE is steered by.

        n_frames defaults to the original's frames(N); streaming windows pass their own count."""
        h = self.encoder(self.input_embedding(tokens.clamp(min=0)))
        return self.length_regulator(self.encoder_proj(h), n_frames or self.n_frames(tokens.shape[1]))

    def speaker(self, batch: int, device, dtype) -> torch.Tensor:
        """Zero x-vector -> L2-normalised (stays 0) -> affine = the bias, (B, 80)."""
        xvec = F.normalize(torch.zeros(batch, self.cfg.spk_embed_dim, device=device, dtype=dtype), dim=1)
        return self.spk_embed_affine_layer(xvec)

    def forward(self, tokens: torch.Tensor, noise: torch.Tensor, prompt_feat: torch.Tensor | None, n_steps: int) -> torch.Tensor:
        """tokens (B, N) = prompt + new ids; noise (B, 80, T); prompt_feat (B, P, 80) or None
        -> mel (B, 80, T - P): the frames after the P prompt frames. The noise length T sets the
        frame count (the original's frames(N) for a plain decode)."""
        mu = self.mu(tokens, noise.shape[-1])
        B, C, T = mu.shape
        cond = torch.zeros(B, T, C, device=mu.device, dtype=mu.dtype)
        P = 0 if prompt_feat is None else prompt_feat.shape[1]
        if P > T:
            raise ValueError(f"prompt_feat has {P} frames, more than the {T} frames of prompt + new tokens")
        if P:
            cond[:, :P] = prompt_feat
        spks = self.speaker(B, mu.device, mu.dtype)
        mel = self.decoder(noise, mu, spks, cond.transpose(1, 2), n_steps)
        return mel[:, :, P:]
