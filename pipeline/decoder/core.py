"""The speech decoder's core: audio codes -> 22.05 kHz waveform (flow -> mel -> HiFT), whole or by windows.

Randomness: the original reseeds the *global* RNG with 42 inside every decode call, then draws the
flow noise and HiFT's phases/noise from it. We draw the same numbers, in the same order, from a
per-call CPU `torch.Generator` seeded with `seed` (42 by default) and leave the global RNG alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.decoder.config import DecoderConfig, DecoderError
from pipeline.decoder.flow import FlowModel, frames_for_tokens
from pipeline.decoder.hift import HiFTGenerator

__all__ = ["DecoderCore", "DecodeResult", "make_generator"]


@dataclass
class DecodeResult:
    """Everything a whole decode computes (for tests and diagnostics); arrays on CPU."""

    mel: torch.Tensor  # (1, 80, T)
    speech: torch.Tensor  # (1, 256 T)
    f0: torch.Tensor  # (1, T)
    noise: torch.Tensor  # (1, 80, T)
    source: torch.Tensor  # (1, 1, 256 T)


def make_generator(seed: int) -> torch.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise DecoderError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(int(seed))


class DecoderCore:
    """The GLM-4-Voice speech decoder's compute (flow matching + HiFT), weight-compatible with the release:
    input checks, the flow's mel for a window, the vocoder, a whole decode. Streams build on these."""

    sample_rate: int = 22050

    def __init__(self, config: DecoderConfig, flow: FlowModel, hift: HiFTGenerator, device="cpu", dtype=None):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.flow = flow.to(self.device, self.dtype).eval()
        self.hift = hift.to(self.device, self.dtype).eval()
        self.sample_rate = config.sample_rate
        self.codebook_size = config.flow.vocab_size
        self.block_size = config.flow.block_size
        self.samples_per_frame = config.hift.samples_per_frame
        self.mel_bins = config.flow.output_size

    # ---- input checks ------------------------------------------------------------------------

    def check_codes(self, codes, allow_empty: bool = False) -> list[int]:
        """Codes -> list of ints in [0, codebook_size); anything else is a `DecoderError`."""
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu().numpy()
        arr = np.asarray(codes)
        if arr.dtype == object or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise DecoderError(f"codes must be integer codebook indices, got dtype {arr.dtype}")
        arr = arr.reshape(-1) if arr.ndim <= 1 or (arr.ndim == 2 and arr.shape[0] == 1) else None
        if arr is None:
            raise DecoderError(f"codes must be a 1-D sequence of ids, got shape {np.shape(codes)}")
        if arr.size == 0 and not allow_empty:
            raise DecoderError("codes is empty: nothing to decode")
        if arr.size and (arr.min() < 0 or arr.max() >= self.codebook_size):
            bad = int(arr[(arr < 0) | (arr >= self.codebook_size)][0])
            raise DecoderError(f"code {bad} is outside the codebook [0, {self.codebook_size})")
        return [int(x) for x in arr]

    @staticmethod
    def check_steps(n_steps) -> int:
        if not isinstance(n_steps, (int, np.integer)) or isinstance(n_steps, bool) or n_steps < 1:
            raise DecoderError(f"n_steps must be a positive int, got {n_steps!r}")
        return int(n_steps)

    # ---- building blocks ---------------------------------------------------------------------

    def n_frames(self, n_tokens: int) -> int:
        return frames_for_tokens(n_tokens, self.config.flow.input_frame_rate)

    def draw_noise(self, n_frames: int, generator: torch.Generator) -> torch.Tensor:
        """`randn_like(mu)` of the original: (1, 80, T) from the CPU generator, then moved."""
        return torch.randn((1, self.mel_bins, n_frames), generator=generator).to(self.device, self.dtype)

    def tensor(self, codes: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(codes)], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def flow_mel(self, tokens: torch.Tensor, noise: torch.Tensor, prompt_feat: torch.Tensor | None, n_steps: int) -> torch.Tensor:
        """(B, N) ids + (B, 80, T) noise + (B, P, 80) prompt mel -> (B, 80, T - P) new mel frames."""
        if prompt_feat is not None:
            prompt_feat = prompt_feat.to(self.device, self.dtype)
        return self.flow(tokens, noise, prompt_feat, n_steps)

    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor, generator: torch.Generator, cache_source: torch.Tensor | None = None):
        """HiFT `inference(mel, cache_source)` -> (speech (1, S), source (1, 1, S), f0 (1, T))."""
        return self.hift(mel.to(self.device, self.dtype), generator, cache_source)

    @torch.inference_mode()
    def synthesize(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """HiFT from a (B, 80, T) mel and its (B, 1, 256 T) NSF source (the streams compute the source)."""
        return self.hift.synthesize(mel, source)

    # ---- public API --------------------------------------------------------------------------

    @torch.inference_mode()
    def decode_details(self, codes, n_steps: int = 10, seed: int = 42) -> DecodeResult:
        """Whole decode (the original `offline_inference`) returning mel, speech, F0, noise and source."""
        codes = self.check_codes(codes)
        n_steps = self.check_steps(n_steps)
        generator = make_generator(seed)
        noise = self.draw_noise(self.n_frames(len(codes)), generator)
        mel = self.flow_mel(self.tensor(codes), noise, None, n_steps)
        speech, source, f0 = self.vocode(mel, generator)
        return DecodeResult(mel=mel.float().cpu(), speech=speech.float().cpu(), f0=f0.float().cpu(),
                            noise=noise.float().cpu(), source=source.float().cpu())

    def decode(self, codes: Sequence[int] | np.ndarray, n_steps: int = 10, seed: int = 42) -> np.ndarray:
        """Codes (codebook indices) -> float32 waveform at `sample_rate`, 256 samples per mel frame."""
        return self.decode_details(codes, n_steps, seed).speech[0].numpy()
