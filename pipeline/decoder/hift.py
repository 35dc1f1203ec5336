"""HiFT vocoder (HiFTNet: neural source filter + iSTFTNet): mel (B, 80, T) -> 22050 Hz speech (B, 256 T).

Data path (CosyVoice `HiFTGenerator.forward`):
  mel -> F0 predictor (5 weight-normed convs + ELU, Linear, abs) -> F0 (B, T)
  F0 repeated x256 -> NSF source: 9 harmonics k*F0 with phase 2 pi (cumsum(f/sr) mod 1) + random start phase,
      voiced where F0 > 10 Hz (sine * 0.1 + noise 0.003), else noise 0.1/3; Linear(9, 1) + tanh -> (B, 1, S)
  mel -> conv_pre -> [lrelu, transposed conv x8, + source branch (STFT of the source, downs, resblocks),
      mean of 3 resblocks] x 2 -> lrelu(0.01) -> conv_post -> magnitude exp (<= 100), phase sin -> iSTFT
      (n_fft 16, hop 4) -> clamp +-0.99
The random draws (start phases, sine noise, uv noise) come from an explicit `torch.Generator` in
the original order. Convolutions carry old-style weight norm (`weight_g`, `weight_v`) as in `hift.pt`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.decoder.config import HiFTConfig


class WNConv1d(nn.Module):
    """Conv1d (or ConvTranspose1d) with weight norm over dim 0: weight = g * v / ||v||."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, dilation=1, transpose=False):
        super().__init__()
        shape = (cin, cout, kernel) if transpose else (cout, cin, kernel)
        self.weight_g = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride, self.padding, self.dilation, self.transpose = stride, padding, dilation, transpose

    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x):
        if self.transpose:
            return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding)
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, alpha per channel (linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel, 1, (kernel * d - d) // 2, d) for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel, 1, (kernel - 1) // 2) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x):
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """`ConvRNNF0Predictor`: 5 x (weight-normed conv k3, ELU) -> Linear -> |.| ; (B, 80, T) -> (B, T) Hz."""

    def __init__(self, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [WNConv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, 1, 1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel):
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """NSF harmonic source: holds only the Linear(9, 1) merge; the sine generation is `harmonic_source`."""

    def __init__(self, n_harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(n_harmonics, 1)


def draw_start_phases(batch: int, n_harmonics: int, generator: torch.Generator | None) -> torch.Tensor:
    """`Uniform(-pi, pi).sample((B, H, 1))` from `generator` (CPU float32), fundamental phase 0."""
    low, high = torch.tensor(-np.pi, dtype=torch.float32), torch.tensor(np.pi, dtype=torch.float32)
    phases = low + torch.rand((batch, n_harmonics, 1), generator=generator, dtype=torch.float32) * (high - low)
    phases[:, 0, :] = 0
    return phases


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        self.n_harmonics = cfg.nb_harmonics + 1
        self.m_source = SourceModule(self.n_harmonics)
        self.conv_pre = WNConv1d(cfg.in_channels, base, 7, 1, 3)
        self.ups = nn.ModuleList(
            WNConv1d(base // 2**i, base // 2 ** (i + 1), k, u, (k - u) // 2, transpose=True)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        rates = [1] + list(cfg.upsample_rates)[::-1][:-1]
        cum = np.cumprod(rates)[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            u = int(u)
            ch = base // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(nn.Conv1d(cfg.n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(cfg.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = WNConv1d(ch, cfg.n_fft + 2, 7, 1, 3)
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        n = np.arange(cfg.n_fft)
        # periodic Hann window (scipy get_window("hann", n_fft, fftbins=True)), computed in float64
        self.register_buffer("stft_window", torch.from_numpy((0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.n_fft)).astype(np.float32)),
                             persistent=False)

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    # ---- NSF source --------------------------------------------------------------------------

    def harmonic_source(self, f0: torch.Tensor, generator: torch.Generator | None,
                        start_phases: torch.Tensor | None = None, phase_offset: torch.Tensor | None = None):
        """F0 (B, T) -> source (B, 1, T*256) and the cumulative phase (in turns) at every sample (B, H, T*256).

        Draws, in the original order: start phases (unless given), sine noise, uv noise.
        `phase_offset` (B, H) continues the cumulative phase of an earlier piece (streaming)."""
        B = f0.shape[0]
        f0 = f0.float().repeat_interleave(self.samples_per_frame, dim=1)[:, None, :]  # (B, 1, S); phases in float32
        if phase_offset is not None:
            phase_offset = phase_offset.float()
        harmonics = torch.arange(1, self.n_harmonics + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
        f_mat = f0 * harmonics / self.cfg.sampling_rate  # (B, H, S)
        cum = torch.cumsum(f_mat, dim=-1)
        if phase_offset is not None:
            cum = cum + phase_offset[:, :, None]
        theta = 2 * np.pi * (cum % 1)
        if start_phases is None:
            start_phases = draw_start_phases(B, self.n_harmonics, generator)
        sine = self.cfg.nsf_alpha * torch.sin(theta + start_phases.to(theta.device, theta.dtype))
        uv = (f0 > self.cfg.nsf_voiced_threshold).to(sine.dtype)  # (B, 1, S)
        noise_amp = uv * self.cfg.nsf_sigma + (1 - uv) * self.cfg.nsf_alpha / 3
        noise = torch.randn(sine.shape, generator=generator, dtype=torch.float32).to(sine.device, sine.dtype)
        sine = sine * uv + noise_amp * noise
        torch.randn((B, sine.shape[-1], 1), generator=generator)  # the original's unused uv noise draw
        merged = torch.tanh(self.m_source.l_linear(sine.transpose(1, 2).to(self.m_source.l_linear.weight.dtype)))  # (B, S, 1)
        return merged.transpose(1, 2), cum

    # ---- filter ------------------------------------------------------------------------------

    def _stft(self, x):  # (I)STFT in float32 whatever the module dtype
        spec = torch.stft(x, self.cfg.n_fft, self.cfg.hop_len, self.cfg.n_fft, window=self.stft_window.float(), return_complex=True)
        spec = torch.view_as_real(spec)  # (B, F, frames, 2)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude, phase):
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.cfg.n_fft, self.cfg.hop_len, self.cfg.n_fft, window=self.stft_window.float())

    def synthesize(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) + source (B, 1, 256 T) -> speech (B, 256 T)."""
        s_stft = self._stft(source.squeeze(1).float()).to(mel.dtype)
        x = self.conv_pre(mel)
        n_kernels = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = None
            for j in range(n_kernels):
                y = self.resblocks[i * n_kernels + j](x)
                xs = y if xs is None else xs + y
            x = xs / n_kernels
        x = self.conv_post(F.leaky_relu(x))
        half = self.cfg.n_fft // 2 + 1
        speech = self._istft(torch.exp(x[:, :half, :]).float(), torch.sin(x[:, half:, :]).float())
        return torch.clamp(speech, -self.cfg.audio_limit, self.cfg.audio_limit)

    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None,
                cache_source: torch.Tensor | None = None):
        """The original `inference(mel, cache_source)`: -> (speech (B, S), source (B, 1, S), f0 (B, T))."""
        f0 = self.f0_predictor(mel)
        source, _ = self.harmonic_source(f0, generator)
        if cache_source is not None and cache_source.shape[-1]:
            source[:, :, : cache_source.shape[-1]] = cache_source
        return self.synthesize(mel, source), source, f0
