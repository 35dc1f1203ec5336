"""The OpenAI Batch API's lines as the batch job takes them (task "requests"): specs in, result rows out.

The endpoint (`serve.routes_batch`) checks every line of a batch's input file with the online routes' own body
models and request policy, and writes the lines it accepts to `FOLDER/requests.jsonl`, one *spec* a line:

    {"custom_id": "q1", "task": "tts" | "asr" | "chat", "text": ..., "audio": REF | null, "system": ...,
     "history": [{"role", "content", "audios": [REF, ...]}], "voice": [codes] | null,
     "options": {"mode", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "layout"}}

    REF: {"path": a local file} | {"url": a URL pyarrow's filesystems read (s3://, gs://, file://)} | {"b64": data}

A line's clips (history's first, then the new turn's) are admitted with the endpoint's limits (`admit_line`),
its request built by the one request builder from its own options (`jobs.batch.callables.SpeechLLM`), its
spoken answer written as float32 PCM in one `.npy` file (`write_pcm`; `read_pcm` opens it wherever it lies).
`result_row` turns a job's result row into the row the endpoint reads (`RESULT_SCHEMA`).
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa

from jobs.storage import location, write_atomic

REQUESTS = "requests.jsonl"
ENCODER_RATE = 16000
UPLOAD_DECODED_BYTES = 64 << 20  # the endpoint's cap on one clip's decoded samples (serve.uploads.UPLOAD_LIMITS)
RESULT_SCHEMA = pa.schema([
    ("custom_id", pa.string()), ("status", pa.string()),  # "ok" | "error"
    ("error_stage", pa.string()), ("error", pa.string()), ("error_param", pa.string()), ("error_code", pa.string()),
    ("text", pa.string()), ("token_ids", pa.list_(pa.int64())), ("audio_codes", pa.int64()),
    ("audio", pa.string()),  # the answer's PCM: a local path or a URL (s3://...) of a .npy file; read_pcm opens it
    ("sample_rate", pa.int64()), ("reason", pa.string()),
    ("usage", pa.string()),  # the request's usage as run_request's Done.usage, as JSON
    ("audio_seconds", pa.float64()),  # seconds of the input clips
])


# ---------------------------------------------------------------------------------------------------------
# specs


def read_specs(folder) -> list[dict]:
    """FOLDER/requests.jsonl (a local path or a URL)."""
    return load_specs(location(folder) / REQUESTS)


def load_specs(path) -> list[dict]:
    text = location(path, "--input").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_specs(folder, specs: list[dict]) -> None:
    write_atomic(location(folder) / REQUESTS, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in specs))


# ---------------------------------------------------------------------------------------------------------
# audio in


class LineError(ValueError):
    """A line the job refuses (unreadable or too long audio): an error row, 400 or 413 with `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def read_ref(ref: dict, param: str) -> bytes:
    """The bytes of an audio reference: a local path, a URL of a filesystem pyarrow knows, or base64."""
    try:
        if "b64" in ref:
            return base64.b64decode(ref["b64"], validate=True)
        if "path" in ref:
            return location(ref["path"]).read_bytes()
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(ref["url"])
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, ValueError, pa.ArrowException) as err:
        raise LineError(f"{param}: cannot read the audio ({type(err).__name__}: {err})", param) from None


def admit_clip(data: bytes, max_seconds: float, param: str):
    """Encoded bytes -> a 16 kHz AudioPayload by the one audio admission, with the endpoint's upload limits."""
    from actors.payloads import AudioPayload
    from pipeline.audio import DEFAULT_LIMITS, AudioError, admit_audio

    if not data:
        raise LineError(f"{param}: the audio is empty (0 bytes)", param)
    limits = DEFAULT_LIMITS.with_(max_decoded_bytes=UPLOAD_DECODED_BYTES, max_seconds=float(max_seconds))
    try:
        audio = admit_audio(data, limits=limits, target_sample_rate=ENCODER_RATE, name="the audio")
    except AudioError as err:
        code = {"max_seconds": "max_audio_seconds"}.get(err.limit, err.limit) if err.too_large else None
        raise LineError(f"{param}: {err.message({'max_seconds': 'max_audio_seconds'})}", param, code) from None
    return AudioPayload(audio.pcm, ENCODER_RATE, param)


def admit_line(spec: dict, max_seconds: float) -> list:
    """Every clip of the line, history's first, then the new turn's: admitted with the endpoint's limits (each
    decoded once), their seconds together within `max_seconds`."""
    refs = [(ref, f"history[{i}].audio") for i, e in enumerate(spec.get("history") or []) for ref in e.get("audios") or []]
    if spec.get("audio"):
        refs.append((spec["audio"], spec.get("audio_param") or "audio"))
    clips = [admit_clip(read_ref(ref, param), max_seconds, param) for ref, param in refs]
    seconds = sum(c.seconds for c in clips)
    if seconds > max_seconds:
        raise LineError(f"the request holds {seconds:.1f} s of audio, over max_audio_seconds={max_seconds:g}",
                        "messages", "max_audio_seconds")
    return clips


def line_request_inputs(spec: dict, codes: list[list[int]]) -> tuple[list[dict], list[int] | None]:
    """(history, the new turn's codes) of a line whose clips were encoded to `codes` (in `admit_line`'s order):
    each earlier turn's clips replaced by their codes, as the online chat route passes them to run_request."""
    history, k = [], 0
    for entry in spec.get("history") or []:
        entry = dict(entry)
        if entry.get("audios"):
            n = len(entry["audios"])
            entry["audios"], k = [list(c) for c in codes[k : k + n]], k + n
        history.append(entry)
    return history, (list(codes[k]) if spec.get("audio") else None)


# ---------------------------------------------------------------------------------------------------------
# results


def write_pcm(path, pcm: np.ndarray) -> None:
    """A spoken answer as float32 PCM in one .npy file (local: renamed into place; object store: one PUT)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(pcm, np.float32))
    write_atomic(location(path), buffer.getvalue())


def read_pcm(audio: str) -> np.ndarray:
    """A result row's `audio` (a local path or a URL, e.g. s3://bucket/batches/b1/audio/ab12.npy) as float32 PCM."""
    return np.load(io.BytesIO(location(audio).read_bytes()))


def result_row(row: dict) -> dict:
    """A job result row (`jobs.batch.results`, task "requests") as the endpoint's row (`RESULT_SCHEMA`)."""
    stage, _, message = (row.get("error") or "").partition(": ")
    failed = row["status"] != "ok"
    return {"custom_id": row["id"], "status": row["status"], "error_stage": stage if failed else None,
            "error": message if failed else None, "error_param": row.get("error_param"),
            "error_code": row.get("error_code"), "text": row.get("text"), "token_ids": row.get("token_ids") or [],
            "audio_codes": row.get("audio_codes"), "audio": row.get("audio"), "sample_rate": row.get("sample_rate"),
            "reason": row.get("finish_reason"), "usage": row.get("usage"), "audio_seconds": row.get("audio_seconds")}
