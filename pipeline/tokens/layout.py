"""The token layout of a loaded model: from the tokenizer saved next to its weights, else from its config."""
from __future__ import annotations

import json
import os
import weakref

from pipeline.tokens.vocab import TokenLayout, load_tokenizer

__all__ = ["default_layout"]

_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_layout(model) -> TokenLayout:
    """The model's token layout: from the tokenizer saved next to the weights, else derived from the config in
    the released id order (`TokenLayout.from_config`, spec §2.1)."""
    if model in _LAYOUTS:
        return _LAYOUTS[model]
    layout = None
    path = str(getattr(model, "name_or_path", "") or "")
    if path and any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        layout = TokenLayout.from_tokenizer(load_tokenizer(path))
    if layout is None:
        layout = TokenLayout.from_config(model.config, _generation_eos(model))
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
