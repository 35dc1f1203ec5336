"""What flows between the stages, as typed dataclasses, and the named glue functions that convert them.

    wav --load_waveform--> AudioPayload --EncoderStage--> codes
    SpeechRequest --build_prompt/to_generation_request--> GenerationRequest --LLMStage--> LLMOutput ...
    LLMOutput.audio_chunks --DecoderStage.push--> PCMChunk ...           (the decoder starts on chunk 1)
    everything --StagedPipeline--> TextDelta | AudioChunk | Done | ErrorEvent  (what a client sees)

Token ids come from `pipeline.tokens.TokenLayout` (read from the tokenizer), never literals. The same glue
runs in the Ray stages and in the in-process composition (`actors.local`), so both give the same output.
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pipeline.generate is imported lazily: actors import cheaply in drivers and tests
    from pipeline.engine.requests import GenerationRequest
    from pipeline.engine.sampling import SamplingParams

TASKS = ("tts", "asr", "chat")
# The output layout each task asks of the decode engine. A trained model follows the layout by itself;
# the constraint makes random (tiny) weights follow it too (audio chunks for TTS/chat, plain text for ASR).
TASK_CONSTRAINTS = {"tts": "interleaved", "asr": "text", "chat": "interleaved"}
TASK_DEFAULT = "task"  # constraint value meaning "the task's entry in TASK_CONSTRAINTS"
# constraint value meaning "decided where the checkpoint is known" (the LLM stage): the task's layout on a
# random tiny set (`pipeline.tiny.is_tiny_set`), else the model's own. No front end forces a layout by default.
LAYOUT_AUTO = "auto"


def new_request_id(task: str) -> str:
    return f"{task}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------------------
# Stage inputs


@dataclass
class AudioPayload:
    """A mono float32 waveform at the encoder's sample rate (checked and resampled by the driver)."""

    pcm: np.ndarray  # (T,) float32 in [-1, 1]
    sample_rate: int = 16000
    name: str = ""  # file name or "array", for error messages

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclass
class SpeechRequest:
    """One request to the LLM stage: the task's inputs plus decoding settings (prompt built in the stage)."""

    task: str  # "tts" | "asr" | "chat"
    request_id: str = ""
    text: str | None = None  # tts: the text to speak; chat: a text turn
    codes: list[int] | None = None  # asr / chat: the user's speech as codebook indices
    history: tuple = ()  # chat: earlier turns ({"role", "content", optional "audios"})
    voice_codes: list[int] | None = None  # tts / chat: voice prompt as codebook indices
    system: str | None = None  # chat: system turn (None: the default persona)
    mode: Any = None  # None (the checkpoint's default) | "vanilla" | "balance" | "boost" | "turbo" | "exact" | [..]
    max_new_tokens: int = 256
    sampling: "SamplingParams | None" = None  # None: greedy
    constraint: str | None = LAYOUT_AUTO  # "auto" | "task" | "interleaved" | "text" | None (the model's own)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}; expected one of {TASKS}")
        if not self.request_id:
            self.request_id = new_request_id(self.task)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if self.task == "tts" and (not isinstance(self.text, str) or not self.text.strip()):
            raise ValueError(f"text={self.text!r}: TTS needs a non-empty text")
        if self.task == "asr" and not self.codes:
            raise ValueError("codes: ASR needs the speech as audio codes (run the encoder first)")
        if self.task == "chat" and not self.codes and not (isinstance(self.text, str) and self.text.strip()):
            raise ValueError("chat needs speech (codes) or a non-empty text turn")

    def output_layout(self, random_weights: bool) -> str | None:
        """The layout the engine enforces: "auto" is the task's on random (tiny-set) weights, else none."""
        if self.constraint == LAYOUT_AUTO:
            return TASK_CONSTRAINTS[self.task] if random_weights else None
        return TASK_CONSTRAINTS[self.task] if self.constraint == TASK_DEFAULT else self.constraint


@dataclass
class CodesChunk:
    """Audio codes for one request's decoder stream; `final` flushes the stream's tail and frees it.

    `seq` numbers a request's chunks 0, 1, 2, ...: Ray does not keep the order of calls to an async actor,
    so the DecoderStage feeds each stream its chunks by `seq`, whatever order they arrive in.
    """

    request_id: str
    codes: list[int]
    final: bool = False
    seq: int = 0


# ---------------------------------------------------------------------------------------------------------
# Stage outputs


@dataclass
class LLMEnd:
    reason: str  # "stop" | "length" | "aborted"
    usage: dict  # the engine's usage (backbone_forwards, mtp_forwards, ...) plus the stage's counters
    token_ids: list[int]  # every generated id, in order (for checks and logs)
    finished_at: float  # wall-clock time.time() in the stage when the engine finished this request


@dataclass
class LLMOutput:
    """One streamed item of the LLM stage: what was generated since the previous item."""

    request_id: str
    text: str = ""  # detokenized text delta
    text_ids: list[int] = field(default_factory=list)
    audio_chunks: list[list[int]] = field(default_factory=list)  # codebook indices, one list per chunk
    end: LLMEnd | None = None


@dataclass
class PCMChunk:
    request_id: str
    pcm: np.ndarray  # (T,) float32
    sample_rate: int
    forwards: int = 0  # decoder forwards this request's stream took part in so far (batched calls count once)
    compute_s: float = 0.0  # seconds of the decoder forward that produced this chunk (shared if batched)


# ---------------------------------------------------------------------------------------------------------
# What a client of the StagedPipeline sees


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]


@dataclass
class AudioChunk:
    pcm: np.ndarray  # (T,) float32
    sample_rate: int
    index: int  # 0, 1, ... per request


@dataclass
class Done:
    reason: str  # "stop" | "length" | "aborted"
    text: str
    token_ids: list[int]
    audio_codes: list[int]  # every codebook index sent to the decoder
    usage: dict  # per stage: {"encoder": {...}, "llm": {...}, "decoder": {...}}
    timings: dict  # seconds from submission: time_to_first_text, time_to_first_audio, llm_done, total


@dataclass
class ErrorEvent:
    """The request failed; the message says which stage and why. Always the last event of a request."""

    stage: str  # "input" | "encoder" | "llm" | "decoder" | "pipeline"
    message: str
    request_id: str = ""
    busy: bool = False  # the stage refused the request at capacity (StageBusy): the same request may succeed later


PipelineEvent = TextDelta | AudioChunk | Done | ErrorEvent


# ---------------------------------------------------------------------------------------------------------
# Glue: request -> prompt ids -> engine request


def load_waveform(audio, sample_rate: int | None = None, target_sample_rate: int = 16000,
                  limits=None) -> AudioPayload:
    """Path / bytes / array -> a checked 16 kHz mono AudioPayload by the one audio admission
    (`pipeline.audio.admit_audio` with `limits`, default `DEFAULT_LIMITS`; raises its typed AudioError).
    An AudioPayload (a clip a front end already admitted, e.g. off its event loop) is passed through: each
    file is decoded once."""
    from pipeline.audio import DEFAULT_LIMITS, AudioError, admit_audio

    if isinstance(audio, AudioPayload):
        if audio.sample_rate != target_sample_rate:
            raise AudioError(f"{audio.name or 'audio'}: an admitted clip at {audio.sample_rate} Hz, the encoder "
                             f"takes {target_sample_rate} Hz")
        return audio
    name = os.fspath(audio) if isinstance(audio, (str, os.PathLike)) else type(audio).__name__
    admitted = admit_audio(audio, sample_rate, limits=limits or DEFAULT_LIMITS, target_sample_rate=target_sample_rate)
    return AudioPayload(pcm=admitted.pcm, sample_rate=target_sample_rate, name=name)


def admit_input(audio, *, max_seconds: float | None, min_seconds: float = 0.0, names: dict | None = None,
                field: str | None = None, target_sample_rate: int = 16000) -> AudioPayload:
    """A user's audio file or bytes, admitted once (`pipeline.audio.admit_audio` with the default limits and
    these seconds): the AudioPayload a front end passes to `run_request` / the pipeline, which does not decode
    it again. Refused as the InputError naming the front end's settings (`names`, e.g.
    {"max_seconds": "--max-audio-seconds"}); the typed AudioError is its `__cause__` (too long / too large:
    `err.__cause__.too_large`)."""
    from actors.errors import InputError
    from pipeline.audio import DEFAULT_LIMITS, AudioError

    try:
        limits = DEFAULT_LIMITS.with_(max_seconds=max_seconds, min_seconds=min_seconds)
        return load_waveform(audio, target_sample_rate=target_sample_rate, limits=limits)
    except AudioError as err:
        refusal = InputError(err.message(names))
        refusal.field = field
        raise refusal from err


def build_prompt(request: SpeechRequest, tokenizer, layout) -> list[int]:
    """The chat prompt ids of a request (spec §2.2 prompts from pipeline.tokens)."""
    from pipeline.tokens import chat as tokens

    if request.task == "tts":
        messages, audios = tokens.tts_messages(request.text, voice_codes=request.voice_codes)
    elif request.task == "asr":
        messages, audios = tokens.asr_messages(request.codes)
    else:
        turn = request.codes if request.codes else request.text
        messages, audios = tokens.chat_messages(
            turn, history=request.history, voice_codes=request.voice_codes, system=request.system
        )
    return tokens.encode_chat(tokenizer, layout, messages, audios)


def random_weights(llm_path) -> bool:
    """The LLM folder belongs to a random tiny set (`vita-audio tiny`): its requests' layout "auto" forces the
    task's layout, which random weights need; a trained checkpoint follows its own. Decided by the stage that
    loads the checkpoint, never by a front end."""
    from pipeline.tiny import is_tiny_set

    return is_tiny_set(os.path.dirname(os.path.abspath(os.fspath(llm_path))))


def to_generation_request(request: SpeechRequest, prompt_ids: Sequence[int],
                          random_weights: bool = False) -> "GenerationRequest":
    """The engine's request; `random_weights`: the checkpoint is a random tiny set (resolves layout "auto")."""
    from pipeline.engine.requests import GenerationRequest
    from pipeline.engine.sampling_params import SamplingParams

    return GenerationRequest(
        prompt_ids=list(prompt_ids),
        mode=request.mode,
        max_new_tokens=request.max_new_tokens,
        sampling=request.sampling or SamplingParams(),
        constraint=request.output_layout(random_weights),
        request_id=request.request_id,
    )


class TextDetokenizer:
    """Incremental detokenization: feed text ids, get the new printable text (holds back split UTF-8).

    Each push decodes a window, the ids of the text returned last (context, so spaces and words split over
    tokens come out as in a whole decode) plus the new ones, instead of every id so far: a long answer costs
    linear time, not quadratic. The returned pieces add up to the whole decode.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:] are decoded; ids[start:done] were returned last time
        self.done = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._new_text(final=False)

    def flush(self) -> str:
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        returned = self.tokenizer.decode(self.ids[self.start : self.done], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.start :], skip_special_tokens=True)
        if len(text) <= len(returned) or text.endswith("\ufffd") and not final:
            return ""  # nothing printable yet (special ids, or a multi-byte character waiting for its next byte)
        self.start, self.done = self.done, len(self.ids)
        return text[len(returned) :]


def engine_events_to_output(request_id: str, events, layout, detok: TextDetokenizer, token_ids: list[int]) -> LLMOutput:
    """Fold the engine events of one request (one or more steps) into one LLMOutput.

    Text ids are the non-audio tokens other than the audio span markers and end-of-turn ids; audio comes
    as whole chunks (the engine emits one at each end-of-audio). `token_ids` collects every id.
    """
    from pipeline.engine.requests import AudioChunkEvent, EndEvent, TokenEvent

    out = LLMOutput(request_id=request_id)
    markers = {layout.boa, layout.eoa, *layout.eos_ids}
    for event in events:
        if isinstance(event, TokenEvent):
            token_ids.append(int(event.token_id))
            if not event.is_audio and int(event.token_id) not in markers:
                out.text_ids.append(int(event.token_id))
        elif isinstance(event, AudioChunkEvent):
            if len(event.codes):
                out.audio_chunks.append([int(c) for c in event.codes])
        elif isinstance(event, EndEvent):
            usage = dict(event.usage) if isinstance(event.usage, dict) else dataclasses.asdict(event.usage)
            out.end = LLMEnd(reason=event.reason, usage=usage, token_ids=list(token_ids), finished_at=time.time())
    out.text = detok.push(out.text_ids) if out.text_ids else ""
    if out.end is not None:
        out.text += detok.flush()
    return out


def merge_outputs(a: LLMOutput, b: LLMOutput) -> LLMOutput:
    """Two consecutive outputs of one request as one (used when a consumer is behind)."""
    return LLMOutput(
        request_id=a.request_id,
        text=a.text + b.text,
        text_ids=a.text_ids + b.text_ids,
        audio_chunks=a.audio_chunks + b.audio_chunks,
        end=b.end or a.end,
    )
