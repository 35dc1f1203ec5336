"""Training samples of corpus preparation: the planned inputs, the shard and error schemas, and one sample's
ids and labels (built by `pipeline.tokens.build_training_sample`, the original's preprocessing).

An *input* is one sample to build: (utterance, task). A recipe utterance with a transcript gives an ASR and a
TTS input; a VITA JSONL line is one input of its own task. Every input ends as exactly one shard row or one
error row, so `rows + error rows == inputs`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from pipeline.tokens.chat import ASR_INSTRUCTION, TTS_INSTRUCTION
from pipeline.tokens.vocab import AUDIO_PLACEHOLDER

TASKS = ("asr", "tts", "sqa", "text")
RECIPE_TASKS = ("asr", "tts")  # what a transcript + its audio can teach
SCHEMA_VERSION = 1

SAMPLE_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("task", pa.string()), ("part", pa.string()),
    ("utterance", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("audio_seconds", pa.float64()), ("audio_codes", pa.list_(pa.list_(pa.int32()))), ("text", pa.string()),
    ("speaker", pa.string()), ("language", pa.string()), ("paths", pa.list_(pa.string())),
    ("num_tokens", pa.int32()), ("num_scored", pa.int32()), ("audio_sha1", pa.string()),
    ("converted", pa.list_(pa.string())),
])
ERROR_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("path", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("task", pa.string()), ("utterance", pa.string()),
])
# An input row as it enters the pipeline (`key`: its index in the plan, which fixes its block).
INPUT_SCHEMA = pa.schema([
    ("key", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("task", pa.string()), ("part", pa.string()),
    ("utterance", pa.string()), ("text", pa.string()), ("messages", pa.string()), ("speaker", pa.string()),
    ("language", pa.string()), ("refs", pa.string()), ("error", pa.string()),
])
# What leaves the last stage: a sample or an error, with its key (the driver splits them).
OUT_SCHEMA = pa.schema([("key", pa.int64()), ("status", pa.string()), *SAMPLE_SCHEMA,
                        *(f for f in ERROR_SCHEMA if f.name not in SAMPLE_SCHEMA.names)])


@dataclass(frozen=True)
class PlannedInput:
    key: int
    id: str
    source: str
    task: str
    part: str
    utterance: str
    text: str | None
    messages: str | None  # JSON of the conversation (recipe tasks: built from the transcript here)
    speaker: str | None
    language: str | None
    refs: str  # JSON list of AudioRef dicts
    error: str | None


def plan_inputs(source: str, utterances, tasks, start_key: int = 0) -> list[PlannedInput]:
    """The inputs of one source's utterances for `tasks`, keys from start_key on."""
    from dataclasses import asdict

    out = []
    for utt in utterances:
        if utt.task:
            chosen = [utt.task]
        elif utt.error and not utt.audio:  # a line that could not be parsed: its task is unknown, keep it once
            chosen = ["unknown"]
        else:
            chosen = list(RECIPE_TASKS)
        for task in chosen:
            if task not in tasks and task != "unknown":
                continue
            messages = utt.messages if utt.task else (recipe_messages(task, utt.text) if utt.text else None)
            out.append(PlannedInput(start_key + len(out), f"{source}/{utt.id}/{task}", source, task, utt.part, utt.id,
                                    utt.text, messages, utt.speaker, utt.language,
                                    json.dumps([asdict(a) for a in utt.audio]), utt.error))
    return out


def recipe_messages(task: str, text: str) -> str:
    """The original's ASR / TTS conversations (spec §6.3) for a transcript, as JSON."""
    if task == "asr":
        messages = [{"role": "user", "content": f"{ASR_INSTRUCTION}\n{AUDIO_PLACEHOLDER}"},
                    {"role": "assistant", "content": text}]
    elif task == "tts":
        messages = [{"role": "user", "content": f"{TTS_INSTRUCTION}\n{text}"},
                    {"role": "assistant", "content": AUDIO_PLACEHOLDER}]
    else:
        raise ValueError(f"task={task!r}: a transcript gives only {RECIPE_TASKS} samples")
    return json.dumps(messages, ensure_ascii=False)


def build_sample(tokenizer, layout, row: dict, codes: list[list[int]], ratio) -> dict:
    """ids and labels of one input (labels -100 where not scored; the assistant turn interleaved with `ratio`)."""
    from pipeline.tokens.chat import IGNORE_INDEX, build_training_sample

    messages = json.loads(row["messages"])
    built = build_training_sample(tokenizer, layout, {"messages": messages, "audios": codes}, codes, ratio=ratio)
    ids, labels = built["input_ids"], built["labels"]
    return {"input_ids": ids, "labels": labels, "audio_codes": codes, "num_tokens": len(ids),
            "num_scored": sum(1 for x in labels if x != IGNORE_INDEX)}
