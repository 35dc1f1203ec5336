"""What the LLM engine takes and gives: a generation request, the streamed events, a one-shot result."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.engine.sampling import SamplingParams



@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    mode: str | list[int] | None = None  # None = checkpoint default; "exact" = lossless; "1,10,4,10" or a list
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: list[int] | None = None  # None = the layout's eos ids (<|im_end|>, <|endoftext|>)
    constraint: str | None = None  # None | "text" | "interleaved"
    request_id: str = ""  # auto uuid if empty
    verify: bool = False  # verify MCTP drafts with the backbone (lossless) under any MCTP schedule
    constraint_ratio: list[int] | None = None  # "interleaved" layout; None = the mode's list or [1, 10, 4, 10]


@dataclass
class TokenEvent:
    request_id: str
    token_id: int
    is_audio: bool
    producer: str  # "backbone" | "mtp{k}"


@dataclass
class AudioChunkEvent:
    request_id: str
    codes: list[int]  # codebook indices (id - audio_offset)


@dataclass
class EndEvent:
    request_id: str
    reason: str  # "stop" | "length" | "aborted"
    usage: dict


@dataclass
class GenerationResult:
    ids: list[int]
    end_reason: str
    backbone_forwards: int
    mtp_forwards: int
    usage: dict
    trace: dict | None = None


def check_prompt_ids(prompt, vocab_size: int) -> list[int]:
    """Prompt ids (a list or tensor of integers in [0, vocab_size)) as a list of ints; ValueError otherwise."""
    original = prompt
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.flatten().tolist()
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or len(prompt) == 0:
        raise ValueError(f"prompt_ids must be a non-empty list of token ids, got {str(prompt)[:60]!r}")
    try:
        prompt = [operator.index(t) for t in prompt]
    except TypeError:
        raise ValueError(f"prompt_ids must hold integers, got {str(original)[:60]!r}") from None
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids out of range [0, {vocab_size}): {bad[:5]}")
    return prompt
