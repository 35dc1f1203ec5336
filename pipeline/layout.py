"""The token layout of a loaded model: from the tokenizer saved next to its weights, else from its config."""
from __future__ import annotations

import json
import os
import weakref

from pipeline.tokens import TokenLayout, load_tokenizer

__all__ = ["default_layout"]

_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_layout(model) -> TokenLayout:
    """The model's token layout: from the tokenizer saved next to the weights, else derived from the config.

    Without a tokenizer the released id order is assumed (spec §2.1): Qwen's 22 specials start at
    <|endoftext|> (= bos_token_id), VITA's 20 specials follow (BOA = +31, EOA = +32), then the codebook at
    `speech_token_offset`; the codebook size is the largest power of two that fits in the rows left
    (16384 of the 16387 released rows; the rest are padding).
    """
    if model in _LAYOUTS:
        return _LAYOUTS[model]
    layout = None
    path = str(getattr(model, "name_or_path", "") or "")
    if path and any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        layout = TokenLayout.from_tokenizer(load_tokenizer(path))
    if layout is None:
        layout = _layout_from_config(model.config, _generation_eos(model))
    _LAYOUTS[model] = layout
    return layout


def _generation_eos(model) -> list[int] | None:
    path = os.path.join(str(getattr(model, "name_or_path", "") or ""), "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return None


def _layout_from_config(config, eos: list[int] | None) -> TokenLayout:
    endoftext = config.bos_token_id if config.bos_token_id is not None else config.pad_token_id
    offset = config.speech_token_offset
    if endoftext is None:
        raise ValueError("cannot derive the token layout: the config has no bos_token_id and no tokenizer was found")
    im_end = endoftext + 2
    vita = endoftext + 22
    plus = offset == vita + 21  # Plus variants insert <|context_of_audio|> after EOA
    rows = config.vocab_size - offset
    if rows <= 0:
        raise ValueError(f"speech_token_offset={offset} is beyond vocab_size={config.vocab_size}")
    return TokenLayout(
        boa=vita + 9,
        eoa=vita + 10,
        audio_offset=offset,
        codebook_size=1 << (rows.bit_length() - 1),
        audio_placeholder=offset - 1,
        im_start=endoftext + 1,
        im_end=im_end,
        endoftext=endoftext,
        eos_ids=tuple(eos) if eos else (im_end, endoftext),
        vocab_size=config.vocab_size,
        context_of_audio=vita + 11 if plus else None,
    )

