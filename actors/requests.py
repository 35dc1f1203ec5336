"""The one request policy: what a user's request means, checked once for every front end.

    options = request_options(mode="boost", max_new_tokens=64, temperature=0.8, caps=caps)
    run_request(clients, limits, "tts", text=text, **options.run_args())

The CLI (tts / asr / chat / batch / generate), the Python API (`SpeechAPI`), Serve HTTP, realtime and the batch
job all parse and check a request here: the decode mode (a name or a list such as "1,10,4,10", checked with the
rules of `pipeline.engine.schedules`, so "0,10" is refused at the edge), sampling (one builder of
`SamplingParams`; every field settable everywhere), text, voice codes, max tokens against the caps (the model's
positions, an operator's max_tokens) and the output layout ("auto": the LLM stage forces the task's layout
only on a random tiny set, so no front end can force it on a trained model). A refusal is one `InputError`
naming the field: the front ends differ only in the field's name (`--top-p` on the CLI, `top_p` over HTTP)
and in how they show it (exit 2, HTTP 400, a realtime error event, a batch error row).

Torch- and Ray-free: a driver, the ingress and a test import it cheaply.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import operator
from dataclasses import dataclass
from pathlib import Path

from actors.errors import InputError
from actors.payloads import LAYOUT_AUTO, TASKS, SpeechRequest
from pipeline.engine.sampling_params import SamplingParams
from pipeline.engine.schedules import EXACT, check_mode_list
from pipeline.tokens.chat import MODES
from pipeline.tokens.vocab import AUDIO_PLACEHOLDER

MODE_NAMES = (*MODES, EXACT)  # every mode name a user may give
MAX_MODE_VALUE = max(max(values) for values in MODES.values())  # vanilla's 8192: larger counts are typos
MAX_TEMPERATURE = 2.0  # OpenAI's range; beyond it the distribution is noise
MAX_SEED = 2**63 - 1
PROMPT_RESERVE = 64  # chat-template tokens around the user's text
DEFAULT_MAX_NEW_TOKENS = 256
# output layouts a request may ask for: "auto" (the LLM stage decides by the checkpoint), "task" (force the
# task's layout), "interleaved" / "text" (force that one), None (the model's own)
LAYOUTS = (LAYOUT_AUTO, "task", "interleaved", "text", None)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")


def refuse(name: str, why: str) -> InputError:
    return InputError(f"{name}: {why}", field=name)


# ---------------------------------------------------------------------------------------------------------
# mode


def parse_mode(value, name: str = "mode"):
    """None (the checkpoint's default), a mode name, or a schedule list [M1, m1, M2, m2, ...].

    Accepts a name (any case), a string "1,10,4,10" (optionally in brackets) or a list of integers.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in MODE_NAMES:
            return text
        parts = [p.strip() for p in text.strip("[]() ").split(",")]
        if len(parts) < 2:
            raise refuse(name, f"unknown mode {value!r}: use one of {', '.join(MODE_NAMES)} or a list like 1,10,4,10")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise refuse(name, f"{value!r}: a list must be integers like 1,10,4,10") from None
    elif isinstance(value, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
            raise refuse(name, f"{list(value)!r}: a list must be integers like [1, 10, 4, 10]")
        values = [operator.index(v) for v in value]
    else:
        raise refuse(name, f"must be a name ({', '.join(MODE_NAMES)}) or a list like 1,10,4,10, "
                           f"got {type(value).__name__}")
    if any(v > MAX_MODE_VALUE for v in values):
        raise refuse(name, f"{values}: counts above {MAX_MODE_VALUE} are not schedules")
    try:
        return check_mode_list(values)
    except ValueError as err:
        raise refuse(name, str(err).removeprefix("mode ")) from None


# ---------------------------------------------------------------------------------------------------------
# sampling


def build_sampling(temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None, *,
                   names: dict | None = None) -> SamplingParams | None:
    """The request's SamplingParams; None for plain greedy decoding.

    temperature None or 0: greedy (top_k, top_p and seed then do not apply and are refused when set to
    anything but their off value); temperature in (0, 2]: sampling. repetition_penalty applies either way.
    `names` maps a field to the front end's name for it (e.g. {"top_k": "--top-k"}).
    """
    names = {f: (names or {}).get(f, f) for f in SAMPLING_FIELDS}
    if temperature is not None:
        if not _real(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise refuse(names["temperature"], f"must be a number in [0, {MAX_TEMPERATURE:g}] (0: greedy), "
                                               f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise refuse(names["top_k"], f"must be an integer >= 0 (0: off), got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):
        raise refuse(names["top_p"], f"must be a number in (0, 1] (1: off), got {top_p!r}")
    if repetition_penalty is not None and (not _real(repetition_penalty) or not repetition_penalty > 0):
        raise refuse(names["repetition_penalty"], f"must be a number > 0 (1: off), got {repetition_penalty!r}")
    check_seed(seed, names["seed"])
    penalty = 1.0 if repetition_penalty is None else float(repetition_penalty)
    if not temperature:
        ignored = [names[f] for f, value, off in (("top_k", top_k, 0), ("top_p", top_p, 1.0), ("seed", seed, None))
                   if value is not None and value != off]
        if ignored:
            verb = "apply" if len(ignored) > 1 else "applies"
            raise InputError(f"{', '.join(ignored)}: only {verb} when sampling; set {names['temperature']} > 0 "
                             f"(e.g. 0.8)", field=ignored[0])
        return None if penalty == 1.0 else SamplingParams(repetition_penalty=penalty)
    return SamplingParams(greedy=False, temperature=float(temperature), top_k=int(top_k or 0),
                          top_p=1.0 if top_p is None else float(top_p), repetition_penalty=penalty,
                          seed=None if seed is None else int(seed))


def check_seed(seed, name: str = "seed"):
    """A sampling seed: None or an integer in [0, 2**63 - 1]."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed <= MAX_SEED):
        raise refuse(name, f"must be an integer in [0, 2**63 - 1], got {seed!r}")
    return seed


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------
# caps, max tokens, text, voice


@dataclass(frozen=True)
class Caps:
    """What a request may ask of this model and this front end (None: no cap)."""

    positions: int | None = None  # the LLM's max_position_embeddings (prompt + generated ids)
    max_new_tokens: int | None = None  # an operator's cap (Serve's max_tokens)
    max_text_chars: int | None = None  # an operator's cap on each text (Serve's max_text_chars)
    tokenizer: str | None = None  # tokenizer.json of the LLM: counts a text's tokens against `positions`

    def count_tokens(self, text: str) -> int:
        return _token_counter(self.tokenizer)(text)


def model_caps(llm_dir, **operator_caps) -> Caps:
    """The caps of the LLM folder (read without torch: config.json, tokenizer.json) plus an operator's."""
    llm_dir = Path(llm_dir)
    path = llm_dir / "config.json"
    try:
        positions = int(json.loads(path.read_text())["max_position_embeddings"])
    except FileNotFoundError:
        raise InputError(f"{path}: missing (the llm/ folder needs its config.json)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a valid model config ({type(err).__name__}: {err})") from None
    tokenizer = llm_dir / "tokenizer.json"
    caps = Caps(positions=positions, tokenizer=str(tokenizer) if tokenizer.is_file() else None, **operator_caps)
    if caps.tokenizer:
        _token_counter(caps.tokenizer)  # a broken tokenizer.json is refused now
    return caps


@functools.lru_cache(maxsize=8)
def _token_counter(path: str | None):
    if path is None:
        return lambda text: len(text.encode())  # at least one token per byte's worth: an upper bound
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # noqa: BLE001 - a broken tokenizer.json is the user's file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InputError(f"{path}: cannot be read ({first})") from None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def check_max_new_tokens(value, caps: Caps = Caps(), name: str = "max_new_tokens") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise refuse(name, f"must be an integer >= 1, got {value!r}")
    if caps.max_new_tokens is not None and value > caps.max_new_tokens:
        raise refuse(name, f"{value} exceeds max_tokens={caps.max_new_tokens}")
    if caps.positions is not None and value > caps.positions:
        raise refuse(name, f"{value} is more than the model's {caps.positions} positions "
                           "(llm/config.json max_position_embeddings)")
    return int(value)


def check_text(text, name: str, caps: Caps = Caps(), max_new_tokens: int | None = None,
               system: bool = False) -> str:
    """A user's text: a non-empty valid Unicode string without the audio placeholder (a system turn may hold
    it), within max_text_chars and, with `max_new_tokens`, fitting the model's positions beside the answer."""
    if not isinstance(text, str):
        raise refuse(name, f"must be a string, got {type(text).__name__}")
    if not text.strip():
        raise refuse(name, "must be a non-empty text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise refuse(name, f"is not valid Unicode text: {err.reason} at character {err.start}") from None
    if not system and AUDIO_PLACEHOLDER in text:
        raise refuse(name, f"contains {AUDIO_PLACEHOLDER}, which marks audio in the prompt")
    if caps.max_text_chars is not None and len(text) > caps.max_text_chars:
        raise refuse(name, f"{len(text)} characters exceed max_text_chars={caps.max_text_chars}")
    if caps.positions is not None and max_new_tokens is not None:
        tokens = caps.count_tokens(text)
        if tokens + max_new_tokens + PROMPT_RESERVE > caps.positions:
            raise refuse(name, f"{tokens} tokens ({len(text)} characters) with max_new_tokens {max_new_tokens} do "
                               f"not fit the model's {caps.positions} positions")
    return text


def check_voice_codes(codes, name: str = "voice") -> list[int]:
    """A voice prompt given as audio codes: a non-empty list of integers >= 0."""
    if (not isinstance(codes, (list, tuple)) or not codes
            or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in codes)):
        raise refuse(name, "voice codes must be a non-empty list of integers >= 0")
    return [int(c) for c in codes]


def check_layout(layout, name: str = "layout"):
    """The output layout a request asks for (`LAYOUTS`); "none" is None."""
    layout = None if layout == "none" else layout
    if layout not in LAYOUTS:
        raise refuse(name, f"{layout!r}: expected one of auto, task, interleaved, text, none")
    return layout


# ---------------------------------------------------------------------------------------------------------
# the whole request


@dataclass(frozen=True)
class RequestOptions:
    """A checked request's decoding options (what every front end passes on to `run_request`)."""

    mode: object = None  # None | a name | [M1, m1, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams | None = None  # None: greedy
    layout: str | None = LAYOUT_AUTO

    def run_args(self) -> dict:
        """`run_request` / `SpeechAPI` keyword arguments."""
        return {"mode": self.mode, "max_new_tokens": self.max_new_tokens, "sampling": self.sampling,
                "constraint": self.layout}


def request_options(*, mode=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=None, top_k=None,
                    top_p=None, repetition_penalty=None, seed=None, sampling: SamplingParams | None = None,
                    layout=LAYOUT_AUTO, caps: Caps = Caps(), names: dict | None = None) -> RequestOptions:
    """Parse and check a request's options (raw user values; `sampling` instead of the five fields for a
    caller that built SamplingParams already). `names`: the front end's name of each field."""
    names = names or {}
    if sampling is not None:
        if not isinstance(sampling, SamplingParams):
            raise refuse(names.get("sampling", "sampling"), f"must be a SamplingParams or None, got "
                                                            f"{type(sampling).__name__}")
        if any(v is not None for v in (temperature, top_k, top_p, repetition_penalty, seed)):
            raise InputError("give either sampling or its fields (temperature, top_k, ...), not both",
                             field="sampling")
    else:
        sampling = build_sampling(temperature, top_k, top_p, repetition_penalty, seed, names=names)
    return RequestOptions(mode=parse_mode(mode, names.get("mode", "mode")),
                          max_new_tokens=check_max_new_tokens(max_new_tokens, caps,
                                                              names.get("max_new_tokens", "max_new_tokens")),
                          sampling=sampling, layout=check_layout(layout, names.get("layout", "layout")))


def build_request(task: str, *, request_id: str = "", text: str | None = None, codes=None, history=(),
                  voice_codes=None, system: str | None = None, options: RequestOptions = RequestOptions(),
                  caps: Caps = Caps()) -> SpeechRequest:
    """The LLM stage's SpeechRequest of a checked request (the inputs' checks here, InputError naming them)."""
    if task not in TASKS:
        raise refuse("task", f"{task!r}; expected one of {TASKS}")
    check_max_new_tokens(options.max_new_tokens, caps)
    if task == "tts" or (task == "chat" and not codes):
        check_text(text, "text", caps, options.max_new_tokens)
    if system is not None:
        check_text(system, "system", caps, system=True)
    if task == "asr" and not codes:
        raise refuse("codes", "ASR needs the speech as audio codes (run the encoder first)")
    if voice_codes is not None:
        voice_codes = check_voice_codes(voice_codes)
    return SpeechRequest(task=task, request_id=request_id, text=text, codes=codes, history=tuple(history),
                         voice_codes=voice_codes, system=system, mode=options.mode,
                         max_new_tokens=options.max_new_tokens, sampling=options.sampling,
                         constraint=options.layout)

