"""`SpeechDecoder`: audio ids -> 22.05 kHz waveform (flow -> mel -> HiFT), and its checkpoint loader.

Randomness: the original reseeds the *global* RNG with 42 inside every decode call, then draws the
flow noise and HiFT's phases/noise from it. We draw the same numbers, in the same order, from a
per-call CPU `torch.Generator` seeded with `seed` (42 by default) and leave the global RNG alone.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.decoder.config import DecoderConfig, DecoderError, load_decoder_config
from pipeline.decoder.flow import FlowModel, frames_for_tokens
from pipeline.decoder.hift import HiFTGenerator


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


class SpeechDecoder:
    """The GLM-4-Voice speech decoder (flow matching + HiFT), weight-compatible with the release."""

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

    def stream(self, mode: str = "incremental", n_steps: int = 10, seed: int = 42, **options):
        """A new `DecoderStream` with its own state (see `pipeline.decoder.stream`)."""
        from pipeline.decoder.stream import make_stream

        return make_stream(self, mode, n_steps=n_steps, seed=seed, **options)

    def decode_batch(self, items: list) -> list[np.ndarray]:
        """Push several streams' chunks at once: `[(stream, codes, final), ...]` -> new PCM per item.

        Incremental streams whose flow (or HiFT) windows have the same shapes share one forward."""
        from pipeline.decoder.stream import decode_batch

        return decode_batch(self, items)


# ----------------------------------------------------------------------------------------------
# Loading the released folder
# ----------------------------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DecoderError(f"decoder checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise DecoderError(f"cannot read decoder checkpoint {str(path)!r} (truncated or not a torch file?): {err}") from err
    except Exception as err:  # the unpickler refuses non-tensor content with assorted error types
        raise DecoderError(f"decoder checkpoint {str(path)!r} was refused by the weights-only loader: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DecoderError(f"decoder checkpoint {str(path)!r} is not a state dict of tensors")
    return state


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Copy a state dict by key name, requiring the same key set and every shape to match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise DecoderError(f"{name}: key mismatch; missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise DecoderError(f"{name}: {key} has shape {tuple(state[key].shape)}, the config implies {tuple(value.shape)}")
    module.load_state_dict(state, strict=True)


def build_modules(config: DecoderConfig) -> tuple[FlowModel, HiFTGenerator]:
    return FlowModel(config.flow), HiFTGenerator(config.hift)


def load_decoder(path, device="cpu", dtype=None) -> SpeechDecoder:
    """Load a glm-4-voice-decoder folder: `config.yaml` (safe-parsed), `flow.pt`, `hift.pt` (weights only)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DecoderError(f"decoder folder {str(folder)!r} not found")
    config = load_decoder_config(folder / "config.yaml")
    flow, hift = build_modules(config)
    load_state_strict(flow, _load_state(folder / "flow.pt"), "flow.pt")
    load_state_strict(hift, _load_state(folder / "hift.pt"), "hift.pt")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise DecoderError(f"dtype must be a torch dtype, got {dtype!r}")
        dtype = resolved
    return SpeechDecoder(config, flow, hift, device=device, dtype=dtype)
