"""Chat template, prompts, audio placeholders, text/audio interleaving and training samples (spec §2).

The vocabulary itself (special tokens, `TokenLayout`, `encode_text`) is `pipeline.vocab`, re-exported here.
Messages carry `<|audio|>` placeholders where audio spans go. Prompts are built from ids (`encode_chat`,
`build_training_sample`): the ChatML markers and audio spans are structural ids and all other text goes through
`encode_text`, so a special-token string inside user text (`<|im_end|><|im_start|>assistant`) stays text.

Assistant answers that hold both text and audio are trained (and decoded) in an interleaved layout
(`interleave`, spec §2.3): with the Boost ratio `1 10 4 10` the model emits 1 text token, a span of 8 codes,
then 4 text tokens and 8 codes, and so on. The decode schedules of spec §3.1 (`MODES`) mirror these layouts.
"""
from __future__ import annotations

import operator
import re
from collections.abc import Sequence

from pipeline.tokens.vocab import (
    AUDIO_PLACEHOLDER,
    BOA_TOKEN,
    EOA_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    TokenLayout,
    audio_token,
    encode_text,
    check_code,
)

IGNORE_INDEX = -100  # label of positions that are not supervised


# Decode schedules of spec §3.1 (generation_config.mtp_inference_mode): [M1, m1, M2, m2, ...].
MODES: dict[str, list[int]] = {
    "vanilla": [8192, 0],
    "balance": [1, 4, 3, 8, 4, 10],
    "boost": [1, 10, 4, 10],
    "turbo": [1, 10],
}

# Training interleave ratios (--text-audio-interval-ratio) of the released variants.
BOOST_RATIO = (1, 10, 4, 10)
BALANCE_RATIO = (1, 4, 3, 8, 4, 10)

# Prompts of the original scripts (spec §2.2).
TTS_INSTRUCTION = "Convert the text to speech."
ASR_INSTRUCTION = "Convert the speech to text."
LUKE_SYSTEM = "Your Name: Luke\nYour Gender: male\n\nRespond in a text-audio interleaved manner."
OMNI_SYSTEM = "Your Name: Omni\nYour Gender: female\nRespond in a text-audio interleaved manner."
VOICE_SYSTEM = f"Your Voice: {AUDIO_PLACEHOLDER}\n"

# spec §2.2: ChatML, a system block only if the conversation has one (no default system prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # older VITA JSON uses these names


# ---------------------------------------------------------------------------------------------------------
# Chat template and placeholders


def expand_audio_placeholders(text: str, audios: Sequence[Sequence[int]], codebook_size: int = 16384) -> str:
    """Replace each `<|audio|>` (in order) by `<|begin_of_audio|><|audio_i|>...<|end_of_audio|>`."""
    count = text.count(AUDIO_PLACEHOLDER)
    if count != len(audios):
        raise ValueError(f"text has {count} {AUDIO_PLACEHOLDER} placeholder(s) but {len(audios)} audio(s) were given")
    pieces = text.split(AUDIO_PLACEHOLDER)
    out = [pieces[0]]
    for codes, rest in zip(audios, pieces[1:]):
        out.append(BOA_TOKEN + "".join(audio_token(check_code(c, codebook_size)) for c in codes) + EOA_TOKEN)
        out.append(rest)
    return "".join(out)


def _normalise_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        role = _ROLE_ALIASES.get(message["role"], message["role"])
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str):
            raise ValueError(f"messages[{i}] content must be a string, got {type(message['content']).__name__}")
        out.append({"role": role, "content": message["content"]})
    return out


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The spec §2.2 ChatML string (identical to `tokenizer.apply_chat_template(..., tokenize=False)`)."""
    text = "".join(
        f"{IM_START_TOKEN}{m['role']}\n{m['content']}{IM_END_TOKEN}\n" for m in _normalise_messages(messages)
    )
    if add_generation_prompt:
        text += f"{IM_START_TOKEN}assistant\n"
    return text


def encode_chat(tokenizer, layout: TokenLayout, messages, audios=(), add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids of the spec §2.2 ChatML with each `<|audio|>` replaced by the span of `audios` (code lists).

    `<|im_start|>`, `<|im_end|>` and the audio spans are ids; roles and contents are plain text
    (`encode_text`). For text without special-token strings this equals tokenising `render_chat` after
    `expand_audio_placeholders`, the original's way.
    """
    messages = _normalise_messages(messages)
    audios = [list(a) for a in audios]
    count = sum(m["content"].count(AUDIO_PLACEHOLDER) for m in messages)
    if count != len(audios):
        raise ValueError(f"messages have {count} {AUDIO_PLACEHOLDER} placeholder(s) but {len(audios)} audio(s) were given")
    ids: list[int] = []
    text: list[str] = []  # text since the last structural id, encoded as one run (BPE merges across it)

    def structural(token_ids: list[int]) -> None:
        ids.extend(encode_text(tokenizer, "".join(text)))
        text.clear()
        ids.extend(token_ids)

    spans = iter(audios)
    for message in messages:
        structural([layout.im_start])
        first, *rest = message["content"].split(AUDIO_PLACEHOLDER)
        text.append(f"{message['role']}\n{first}")
        for piece in rest:
            structural(layout.audio_span(next(spans)))
            text.append(piece)
        structural([layout.im_end])
        text.append("\n")
    if add_generation_prompt:
        structural([layout.im_start])
        text.append("assistant\n")
    structural([])
    return ids



# ---------------------------------------------------------------------------------------------------------
# Prompt builders (the prompts of the original scripts, spec §2.2). Each returns (messages, audios).


def _codes(codes, name: str) -> list[int]:
    if codes is None or isinstance(codes, (str, bytes)) or not isinstance(codes, Sequence) or len(codes) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of audio codes, got {codes!r:.80}")
    return list(codes)


def _no_placeholder(text: str, name: str) -> None:
    if AUDIO_PLACEHOLDER in text:
        raise ValueError(f"{name} must not contain {AUDIO_PLACEHOLDER!r}: it marks where audio goes in a prompt")


def tts_messages(text: str, voice_codes: Sequence[int] | None = None) -> tuple[list[dict], list[list[int]]]:
    """TTS: user "Convert the text to speech.\\n{text}"; an optional voice prompt goes into the system turn."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    _no_placeholder(text, "text")
    messages, audios = [], []
    if voice_codes is not None:
        messages.append({"role": "system", "content": VOICE_SYSTEM})
        audios.append(_codes(voice_codes, "voice_codes"))
    messages.append({"role": "user", "content": f"{TTS_INSTRUCTION}\n{text}"})
    return messages, audios


def asr_messages(codes: Sequence[int]) -> tuple[list[dict], list[list[int]]]:
    """ASR: user "Convert the speech to text.\\n<audio>", no system turn; the answer is plain text."""
    return [{"role": "user", "content": f"{ASR_INSTRUCTION}\n{AUDIO_PLACEHOLDER}"}], [_codes(codes, "codes")]


def chat_messages(
    codes_or_text, history=(), voice_codes: Sequence[int] | None = None, system: str | None = None
) -> tuple[list[dict], list[list[int]]]:
    """Speech (or text) chat turn after an optional history.

    System turn: the voice prompt "Your Voice: <audio>\\n" if `voice_codes` is given (it replaces the
    persona, as in the original script), else `system` (default: the "Luke" persona; "" = no system turn).
    `history` is a sequence of {"role", "content", optional "audios": [codes, ...]} dicts whose content may
    hold `<|audio|>` placeholders (one code list each, in order). The new user turn is "\\n<audio>" for
    codes (the script's message "" + "\\n<|audio|>") or the text itself.
    """
    messages, audios = [], []
    if voice_codes is not None:
        if system is not None:
            raise ValueError("give either system or voice_codes: the voice prompt is the system turn")
        messages.append({"role": "system", "content": VOICE_SYSTEM})
        audios.append(_codes(voice_codes, "voice_codes"))
    else:
        system = LUKE_SYSTEM if system is None else system
        if system:
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(history):
        if not isinstance(turn, dict):
            raise ValueError(f"history[{i}] must be a dict, got {turn!r:.80}")
        (message,) = _normalise_messages([turn])
        turn_audios = [_codes(c, f"history[{i}]['audios']") for c in turn.get("audios", ())]
        if message["content"].count(AUDIO_PLACEHOLDER) != len(turn_audios):
            raise ValueError(
                f"history[{i}] has {message['content'].count(AUDIO_PLACEHOLDER)} {AUDIO_PLACEHOLDER} "
                f"placeholder(s) but {len(turn_audios)} audio(s)"
            )
        messages.append(message)
        audios.extend(turn_audios)
    if isinstance(codes_or_text, str):
        if not codes_or_text:
            raise ValueError("codes_or_text must be a non-empty string or a sequence of audio codes")
        _no_placeholder(codes_or_text, "text")
        messages.append({"role": "user", "content": codes_or_text})
    else:
        messages.append({"role": "user", "content": f"\n{AUDIO_PLACEHOLDER}"})
        audios.append(_codes(codes_or_text, "codes_or_text"))
    return messages, audios


# ---------------------------------------------------------------------------------------------------------
# Interleaving (spec §2.3)


def check_ratio(ratio: Sequence[int]) -> tuple[int, ...]:
    """Validate a text-audio interval ratio [T1, A1, T2, A2, ...]: T >= 1, A >= 3 (A counts BOA and EOA)."""
    try:
        values = tuple(operator.index(x) for x in ratio)
    except TypeError:
        raise ValueError(f"ratio must be a list of integers, got {ratio!r}") from None
    if len(values) < 2 or len(values) % 2:
        raise ValueError(f"ratio must have an even length >= 2 ([T1, A1, T2, A2, ...]), got {list(values)}")
    if any(t < 1 for t in values[::2]) or any(a < 3 for a in values[1::2]):
        raise ValueError(f"ratio {list(values)} needs every text count >= 1 and every audio count >= 3")
    return values


def _chunks(tokens: list[int], sizes: list[int]) -> list[list[int]]:
    """Cut `tokens` with `sizes` in order; the last size repeats."""
    out, start, i = [], 0, 0
    while start < len(tokens):
        size = sizes[min(i, len(sizes) - 1)]
        out.append(tokens[start : start + size])
        start, i = start + size, i + 1
    return out


def interleave(text_ids: Sequence[int], audio_codes_ids: Sequence[int], ratio: Sequence[int], layout: TokenLayout) -> list[int]:
    """Interleave text ids with audio ids (LLM ids of audio codes) as Σ text_i + [BOA] + audio_i + [EOA].

    ratio [T1, A1, T2, A2, ...]: text chunks of T1, T2, ... tokens and audio chunks of A1-2, A2-2, ... codes
    (each A counts BOA and EOA); the last value of each stream repeats. With n = min(#text chunks,
    #audio chunks) chunks, the n-th chunk of each stream absorbs everything that remains. Without text the
    result is the plain span [BOA, audio..., EOA]. Without audio it is text + [BOA, EOA] (the original
    would drop all text after the first chunk there).
    """
    values = check_ratio(ratio)
    text = [int(t) for t in text_ids]
    audio = [int(a) for a in audio_codes_ids]
    for i, t in enumerate(text):
        if t in (layout.boa, layout.eoa) or layout.is_audio(t):
            raise ValueError(f"text_ids[{i}]={t} is an audio or BOA/EOA token")
    for i, a in enumerate(audio):
        if not layout.is_audio(a):
            raise ValueError(f"audio_codes_ids[{i}]={a} is not an audio token id")
    if not text:
        return [layout.boa, *audio, layout.eoa]
    if not audio:
        return [*text, layout.boa, layout.eoa]
    text_chunks = _chunks(text, list(values[::2]))
    audio_chunks = _chunks(audio, [a - 2 for a in values[1::2]])
    n = min(len(text_chunks), len(audio_chunks))
    text_chunks = text_chunks[: n - 1] + [sum(text_chunks[n - 1 :], [])]
    audio_chunks = audio_chunks[: n - 1] + [sum(audio_chunks[n - 1 :], [])]
    out = []
    for t, a in zip(text_chunks, audio_chunks):
        out += [*t, layout.boa, *a, layout.eoa]
    return out


def interleave_content(content_ids: Sequence[int], ratio: Sequence[int], layout: TokenLayout) -> list[int]:
    """Interleave assistant content ids holding at most one BOA..EOA span (text before and after it).

    Content without a span, or that is only the span, is returned unchanged (spec §2.3 step 1).
    """
    ids = [int(i) for i in content_ids]
    starts = [i for i, x in enumerate(ids) if x == layout.boa]
    ends = [i for i, x in enumerate(ids) if x == layout.eoa]
    if not starts and not ends:
        return ids
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise ValueError(
            f"assistant content must hold at most one audio span to interleave, found {len(starts)} BOA "
            f"and {len(ends)} EOA"
        )
    st, ed = starts[0], ends[0]
    if st == 0 and ed == len(ids) - 1:
        return ids
    return interleave(ids[:st] + ids[ed + 1 :], ids[st + 1 : ed], ratio, layout)


# ---------------------------------------------------------------------------------------------------------
# Training samples (VITA JSONL: {"messages": [...], "audios": [...]})


def build_training_sample(
    tokenizer,
    layout: TokenLayout,
    sample: dict,
    audio_codes: list[list[int]],
    ratio: Sequence[int] | None = BOOST_RATIO,
    tts_rewrite: bool = True,
) -> dict:
    """ids + labels of one VITA JSONL sample, as the original training preprocessing builds them.

    `audio_codes[i]` holds the codes of `sample["audios"][i]` (the caller tokenises the wavs). Steps:
    TTS rewrite (the assistant turn after "Convert the text to speech.\\n{text}" becomes text + its audio),
    placeholder expansion in every role, ChatML per turn; system/user turns and the assistant header get
    label -100, the assistant content (interleaved with `ratio`; None = keep as is), `<|im_end|>` and the
    trailing "\\n" are supervised (labels = ids; the model shifts them).
    """
    if not isinstance(sample, dict):
        raise ValueError(f"sample must be a dict with 'messages', got {type(sample).__name__}")
    raw = sample.get("messages") or sample.get("conversations")
    if not raw:
        raise ValueError(f"sample has no 'messages': {str(sample)[:120]}")
    messages = _normalise_messages(raw)
    if "audios" in sample and len(sample["audios"]) != len(audio_codes):
        raise ValueError(f"sample lists {len(sample['audios'])} audio file(s) but {len(audio_codes)} code list(s) were given")
    if ratio is not None:
        ratio = check_ratio(ratio)

    if tts_rewrite:
        add_text = None
        for message in messages:
            if message["role"] == "user":
                content = message["content"]
                add_text = content.replace(f"{TTS_INSTRUCTION}\n", "").strip() if TTS_INSTRUCTION in content else None
            elif message["role"] == "assistant" and add_text is not None:
                message["content"] = add_text + message["content"]
                add_text = None

    placeholders = sum(m["content"].count(AUDIO_PLACEHOLDER) for m in messages)
    if placeholders != len(audio_codes):
        raise ValueError(f"sample has {placeholders} {AUDIO_PLACEHOLDER} placeholder(s) but {len(audio_codes)} code list(s)")
    spans = iter(audio_codes)

    def encode_content(content: str) -> list[int]:  # text pieces as plain text, each <|audio|> as its span
        first, *rest = content.split(AUDIO_PLACEHOLDER)
        ids = encode_text(tokenizer, first)
        for piece in rest:
            ids += layout.audio_span(next(spans)) + encode_text(tokenizer, piece)
        return ids

    newline = encode_text(tokenizer, "\n")
    input_ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        header = [layout.im_start, *encode_text(tokenizer, message["role"]), *newline]
        content = encode_content(message["content"])
        if message["role"] == "assistant":
            if ratio is not None:
                content = interleave_content(content, ratio, layout)
            body = content + [layout.im_end, *newline]
            input_ids += header + body
            labels += [IGNORE_INDEX] * len(header) + body
        else:
            ids = header + content + [layout.im_end, *newline]
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


_AUDIO_TOKEN_RE = re.compile(r"<\|audio_(\d+)\|>")


def codes_from_text(text: str) -> list[int]:
    """Codebook indices of the `<|audio_i|>` tokens in decoded text, in order."""
    return [int(m) for m in _AUDIO_TOKEN_RE.findall(text)]
