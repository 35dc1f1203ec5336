"""`SpeechDecoder`: the audio decoder (audio codes -> 22.05 kHz waveform), whole or streamed, and its loader.

Layers, bottom up: `core` (`DecoderCore`: flow mel, vocoder, whole decode), `stream` (the stream protocol and
the incremental stream), `original_streams` (the originals' schedules), then this module: the decoder that
opens streams of each kind and batches their pushes, and the loader of the released folder.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.decoder.config import DecoderConfig, DecoderError, load_decoder_config
from pipeline.decoder.core import DecodeResult, DecoderCore, make_generator  # noqa: F401  (public names here too)
from pipeline.decoder.flow import FlowModel
from pipeline.decoder.hift import HiFTGenerator
from pipeline.decoder.original_streams import GLM4VoiceStream, VitaPrefixStream
from pipeline.decoder.stream import DecoderStream, IncrementalStream, decode_batch

STREAM_KINDS = {"incremental": IncrementalStream, "glm4voice": GLM4VoiceStream, "vita_prefix": VitaPrefixStream}


class SpeechDecoder(DecoderCore):
    """The GLM-4-Voice speech decoder (flow matching + HiFT), weight-compatible with the release."""

    def stream(self, kind: str = "incremental", n_steps: int = 10, seed: int = 42, *, mode: str | None = None,
               **options) -> DecoderStream:
        """A new stream of `kind` (one of `STREAM_KINDS`) with its own state; `mode=` is the old name of `kind`."""
        if mode is not None:
            kind = mode
        if kind not in STREAM_KINDS:
            raise DecoderError(f"stream kind must be one of {tuple(STREAM_KINDS)}, got {kind!r}")
        try:
            return STREAM_KINDS[kind](self, n_steps=n_steps, seed=seed, **options)
        except TypeError as err:
            raise DecoderError(f"bad option for a {kind!r} stream: {err}") from err

    def decode_batch(self, items: list) -> list[np.ndarray]:
        """Push several streams' chunks at once: `[(stream, codes, final), ...]` -> new PCM per item.

        Incremental streams whose flow (or HiFT) windows have the same shapes share one forward."""
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
