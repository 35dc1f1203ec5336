"""VITA-Audio model core: wav -> audio codes (speech encoder) -> LLM + MCTP (llm, engine) -> audio codes -> wav (audio decoder).

Pure PyTorch + transformers; never imports Ray. Importing this package registers the `qwen2_mtp`
model type with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` works
on VITA-Audio checkpoints without `trust_remote_code`.
"""
from __future__ import annotations

from pipeline.llm import Qwen2MTPConfig, Qwen2MTPForCausalLM, load_llm

__all__ = ["Qwen2MTPConfig", "Qwen2MTPForCausalLM", "load_llm", "load_encoder", "load_decoder"]


def load_encoder(path, device="cpu", dtype=None):
    """Load a glm-4-voice-tokenizer folder as the speech encoder (waveform -> 12.5 Hz audio codes)."""
    from pipeline.encoder import load_encoder as _load

    return _load(path, device=device, dtype=dtype)


def load_decoder(path, device="cpu", dtype=None):
    """Load a glm-4-voice-decoder folder as the audio decoder (audio codes -> 22.05 kHz waveform)."""
    from pipeline.decoder import load_decoder as _load

    return _load(path, device=device, dtype=dtype)
