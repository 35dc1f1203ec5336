"""The VITA-Audio vocabulary: its special tokens, the audio codebook's ids (`TokenLayout`, read from a
tokenizer, never hard-coded) and plain-text encoding of user text.

The audio codebook sits in the LLM vocabulary: `<|audio_i|>` = `audio_offset + i`, spans are wrapped in
`<|begin_of_audio|>` (BOA) ... `<|end_of_audio|>` (EOA). The Plus variants insert `<|context_of_audio|>` after
EOA, which shifts `<|audio_0|>` by one. `encode_text` never reads a special or audio token out of text.
"""
from __future__ import annotations

import json
import operator
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

AUDIO_PLACEHOLDER = "<|audio|>"
BOA_TOKEN = "<|begin_of_audio|>"
EOA_TOKEN = "<|end_of_audio|>"
CONTEXT_OF_AUDIO_TOKEN = "<|context_of_audio|>"  # Plus variants only
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"


def audio_token(code: int) -> str:
    """The vocabulary entry of codebook index `code`."""
    return f"<|audio_{code}|>"


# Qwen2.5's 22 special tokens, in id order (151643..151664 in the released vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# The 20 special tokens VITA-Audio adds (spec §2.1 table order; 151665..151684 in the released vocabulary).
VITA_SPECIAL_TOKENS = (
    "<|begin_of_image|>", "<|end_of_image|>", "<|context_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|context_of_video|>",
    "<|begin_of_patch|>", "<|end_of_patch|>", "<|context_of_patch|>",
    "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|begin_of_quad|>", "<|end_of_quad|>", "<|begin_of_ref|>", "<|end_of_ref|>",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>", "<|audio|>",
)


def vita_special_tokens(plus: bool = False) -> tuple[str, ...]:
    """The VITA specials in id order; Plus variants add `<|context_of_audio|>` right after EOA."""
    if not plus:
        return VITA_SPECIAL_TOKENS
    i = VITA_SPECIAL_TOKENS.index(EOA_TOKEN) + 1
    return VITA_SPECIAL_TOKENS[:i] + (CONTEXT_OF_AUDIO_TOKEN,) + VITA_SPECIAL_TOKENS[i:]


# ---------------------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class TokenLayout:
    """The ids VITA-Audio code needs, read from a tokenizer."""

    boa: int
    eoa: int
    audio_offset: int  # id of <|audio_0|> (config `speech_token_offset`)
    codebook_size: int  # number of contiguous <|audio_i|> tokens (16384 for GLM-4-Voice)
    audio_placeholder: int  # id of <|audio|>; appears in JSON text, never fed to the model
    im_start: int
    im_end: int
    endoftext: int
    eos_ids: tuple[int, ...]  # (<|im_end|>, <|endoftext|>), the generation_config order
    vocab_size: int  # tokenizer length (the model's embedding is padded to a multiple of 8)
    context_of_audio: int | None = None  # Plus variants only

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenLayout":
        vocab = tokenizer.get_vocab()

        def need(token: str) -> int:
            if token not in vocab:
                raise ValueError(f"tokenizer has no {token!r} token; is it a VITA-Audio tokenizer?")
            return vocab[token]

        offset = need(audio_token(0))
        size = 0
        while vocab.get(audio_token(size)) == offset + size:
            size += 1
        if audio_token(size) in vocab:
            raise ValueError(
                f"audio tokens are not contiguous: {audio_token(size)!r} has id {vocab[audio_token(size)]}, "
                f"expected {offset + size}"
            )
        im_end, endoftext = need(IM_END_TOKEN), need(ENDOFTEXT_TOKEN)
        return cls(
            boa=need(BOA_TOKEN),
            eoa=need(EOA_TOKEN),
            audio_offset=offset,
            codebook_size=size,
            audio_placeholder=need(AUDIO_PLACEHOLDER),
            im_start=need(IM_START_TOKEN),
            im_end=im_end,
            endoftext=endoftext,
            eos_ids=(im_end, endoftext),
            vocab_size=len(tokenizer),
            context_of_audio=vocab.get(CONTEXT_OF_AUDIO_TOKEN),
        )

    @classmethod
    def from_config(cls, config, eos_ids=None) -> "TokenLayout":
        """The layout of the released id order (spec §2.1) when no tokenizer is at hand: Qwen's specials from
        `<|endoftext|>` (`bos_token_id`) on, VITA's right after them (`<|context_of_audio|>` after EOA in the
        Plus variants, recognised by the codebook starting one id later), the codebook at
        `speech_token_offset`; its size is the largest power of two in the rows left (padding follows)."""
        endoftext = config.bos_token_id if config.bos_token_id is not None else config.pad_token_id
        if endoftext is None:
            raise ValueError("cannot derive the token layout: the config has no bos_token_id and no tokenizer was found")
        offset = config.speech_token_offset
        rows = config.vocab_size - offset
        if rows <= 0:
            raise ValueError(f"speech_token_offset={offset} is beyond vocab_size={config.vocab_size}")
        first_vita = endoftext + len(QWEN_SPECIAL_TOKENS)
        names = vita_special_tokens(plus=offset - first_vita == len(vita_special_tokens(plus=True)))

        def qwen(token: str) -> int:
            return endoftext + QWEN_SPECIAL_TOKENS.index(token)

        def vita(token: str) -> int:
            return first_vita + names.index(token)

        im_end = qwen(IM_END_TOKEN)
        return cls(
            boa=vita(BOA_TOKEN),
            eoa=vita(EOA_TOKEN),
            audio_offset=offset,
            codebook_size=1 << (rows.bit_length() - 1),
            audio_placeholder=vita(AUDIO_PLACEHOLDER),
            im_start=qwen(IM_START_TOKEN),
            im_end=im_end,
            endoftext=endoftext,
            eos_ids=tuple(eos_ids) if eos_ids else (im_end, endoftext),
            vocab_size=config.vocab_size,
            context_of_audio=vita(CONTEXT_OF_AUDIO_TOKEN) if CONTEXT_OF_AUDIO_TOKEN in names else None,
        )

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.audio_offset + self.codebook_size

    def to_code(self, token_id: int) -> int:
        """LLM id -> codebook index."""
        if not self.is_audio(token_id):
            raise ValueError(
                f"token_id={token_id} is not an audio token "
                f"(audio ids are {self.audio_offset}..{self.audio_offset + self.codebook_size - 1})"
            )
        return int(token_id) - self.audio_offset

    def to_id(self, code: int) -> int:
        """Codebook index -> LLM id."""
        return self.audio_offset + check_code(code, self.codebook_size)

    def audio_span(self, codes: Sequence[int]) -> list[int]:
        """[BOA, ids..., EOA] for a list of codebook indices."""
        return [self.boa, *(self.to_id(c) for c in codes), self.eoa]

    def audio_codes(self, ids: Sequence[int]) -> list[int]:
        """Codebook indices of every audio token in `ids`, in order (other tokens are skipped)."""
        return [int(i) - self.audio_offset for i in ids if self.is_audio(i)]


def check_code(code, codebook_size: int) -> int:
    try:
        value = operator.index(code)
    except TypeError:
        raise ValueError(f"audio code {code!r} is not an integer") from None
    if not 0 <= value < codebook_size:
        raise ValueError(f"audio code {value} is out of range [0, {codebook_size})")
    return value


def load_tokenizer(llm_dir):
    """The tokenizer saved in an LLM folder (offline; no hub access)."""
    from transformers import AutoTokenizer

    path = Path(os.fspath(llm_dir))
    if not path.is_dir():
        raise FileNotFoundError(f"llm_dir {str(path)!r} is not a folder")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"llm_dir {str(path)!r} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


_PLAIN_TEXT = weakref.WeakKeyDictionary()  # tokenizer -> its BPE without added tokens


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` as plain text: no special or added token (`<|im_end|>`, `<|audio_5|>`) is read out of it.

    User text comes from anyone (CLI, corpora, the Serve endpoint); only the prompt builders place special
    ids. The tokenizer's own BPE with its added tokens removed gives exactly the ids the full tokenizer
    gives for text that holds no such strings.
    """
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: special tokens split, added (audio) tokens as the tokenizer reads them
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    try:
        plain = _PLAIN_TEXT.get(tokenizer)
    except TypeError:
        plain = None
    if plain is None:
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        spec["added_tokens"] = []
        plain = Tokenizer.from_str(json.dumps(spec))
        try:
            _PLAIN_TEXT[tokenizer] = plain
        except TypeError:
            pass
    return plain.encode(text, add_special_tokens=False).ids
