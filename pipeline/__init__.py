"""VITA-Audio model core: wav -> audio codes (`encoder/`) -> LLM + MCTP (`llm`, `engine/`) -> audio codes -> wav (`decoder/`).

Pure PyTorch + transformers; never imports Ray. The package itself is light: importing `pipeline` (or its
torch-free parts, such as `pipeline.tokens.vocab` and `pipeline.audio`'s header checks) does not import torch,
so front ends can check a request before any model starts. `pipeline.load_llm` (or `import pipeline.llm`)
registers the `qwen2_mtp` model type with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)`
works on VITA-Audio checkpoints without `trust_remote_code`.
"""
from __future__ import annotations

__all__ = ["Qwen2MTPConfig", "Qwen2MTPForCausalLM", "load_llm", "load_encoder", "load_decoder"]


def load_llm(path, device="cpu", dtype=None):
    """Load a VITA-Audio LLM folder (Qwen2 backbone + MCTP modules; released key names, strict checks)."""
    from pipeline.llm import load_llm as _load

    return _load(path, device=device, dtype=dtype)


def load_encoder(path, device="cpu", dtype=None):
    """Load a glm-4-voice-tokenizer folder as the speech encoder (waveform -> 12.5 Hz audio codes)."""
    from pipeline.encoder.speech_encoder import load_encoder as _load

    return _load(path, device=device, dtype=dtype)


def load_decoder(path, device="cpu", dtype=None):
    """Load a glm-4-voice-decoder folder as the audio decoder (audio codes -> 22.05 kHz waveform)."""
    from pipeline.decoder.speech_decoder import load_decoder as _load

    return _load(path, device=device, dtype=dtype)


def __getattr__(name: str):
    if name in ("Qwen2MTPConfig", "Qwen2MTPForCausalLM"):  # the model classes, imported (with torch) when asked for
        from pipeline import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
