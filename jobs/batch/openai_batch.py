"""The OpenAI Batch API's job: checked request lines in, one result row per line out, exactly once, resumable.

    summary = run_openai_batch(OpenAIBatchConfig(folder="files/batches/batch_ab12"))

The endpoint (`serve.routes_batch`) checks every line of a batch's input file with the online routes' own body
models and request policy, and writes the lines it accepts to `FOLDER/requests.jsonl`, one *spec* a line:

    {"custom_id": "q1", "task": "tts" | "asr" | "chat", "text": ..., "audio": REF | null, "system": ...,
     "history": [{"role", "content", "audios": [REF, ...]}], "voice": [codes] | null,
     "options": {"mode", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "layout"}}

    REF: {"path": a local file} | {"url": a URL pyarrow's filesystems read (s3://, gs://, file://)} | {"b64": data}

This job runs each spec through `actors.orchestration.run_request`, the data path of every online request,
over the stage objects of a pool of Ray Data actors (`RequestRunner`: encoder, LLM and decoder in one actor,
its requests continuously batched by the LLM stage's engine), so a greedy line gives what the same request
sent online gives. Its audio is admitted with the endpoint's limits, its options re-checked by the one request
policy. A line that fails (bad audio, a refused option, a stage failure) is an error row naming its stage; it
never fails the job.

Exactly once and resumable by the run-folder module every job uses (`jobs.run_folder`): the specs are cut
into blocks of `block_size` in file order; block b's rows go to `FOLDER/results/part-<b>.parquet`, written
whole once every line of the block has its row. A driver that dies part-way leaves whole blocks only; the next
run processes only the blocks without a file. Cancel (`FOLDER/cancel` exists) stops at a block boundary: the
blocks written stay, the rest is never started. Spoken answers are float32 PCM files under `FOLDER/audio/`
(the endpoint encodes them into the format each request asked for). `FOLDER/progress.json` counts the lines
written so far (the endpoint's `request_counts`).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.pools import PoolConfig
from jobs.run_folder import BlockWriter, RunFolder, block_file, clear_temporaries, write_atomic

REQUESTS = "requests.jsonl"
PROGRESS = "progress.json"
CANCEL = "cancel"
OUTPUTS = ("results", "audio", PROGRESS)
PLAN_VERSION = 1
ENCODER_RATE = 16000
UPLOAD_DECODED_BYTES = 64 << 20  # the endpoint's cap on one clip's decoded samples (serve.uploads.UPLOAD_LIMITS)
RESULT_SCHEMA = pa.schema([
    ("custom_id", pa.string()), ("status", pa.string()),  # "ok" | "error"
    ("error_stage", pa.string()), ("error", pa.string()), ("error_param", pa.string()), ("error_code", pa.string()),
    ("text", pa.string()), ("token_ids", pa.list_(pa.int64())), ("audio_codes", pa.int64()),
    ("audio", pa.string()), ("sample_rate", pa.int64()), ("reason", pa.string()),
    ("usage", pa.string()),  # the run's Done.usage as JSON
    ("audio_seconds", pa.float64()),  # seconds of the input clips
])


@dataclass
class OpenAIBatchConfig:
    folder: str  # the batch's run folder (requests.jsonl in; results/, audio/, progress.json out)
    models: str | None = None  # folder with llm/, encoder/, decoder/ (None: $VITA_AUDIO_MODELS or the tiny set)
    max_new_tokens_cap: int | None = None  # the endpoint's caps (its max_tokens, max_text_chars, max_audio_seconds)
    max_text_chars: int | None = None
    max_audio_seconds: float = 60.0
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(size=1, num_cpus=0.5, batch_size=8))
    block_size: int = 16  # lines per result file (the unit of resumption and of cancel)
    torch_threads: int | None = 1
    request_timeout_s: float | None = None  # None: the pipeline config's

    def __post_init__(self):
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be an integer >= 1")
        if isinstance(self.pool, dict):
            self.pool = PoolConfig(**self.pool)


def read_specs(folder) -> list[dict]:
    path = Path(folder) / REQUESTS
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_specs(folder, specs: list[dict]) -> None:
    write_atomic(Path(folder) / REQUESTS, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in specs))


def result_path(folder, block: int) -> Path:
    return block_file(Path(folder) / "results", block)


def read_results(folder) -> list[dict]:
    """Every result row written so far, in line order."""
    files = sorted((Path(folder) / "results").glob("part-*.parquet"))
    return [r for f in files for r in pq.read_table(f, schema=RESULT_SCHEMA).to_pylist()]


def read_progress(folder) -> dict:
    try:
        return json.loads((Path(folder) / PROGRESS).read_text())
    except (OSError, ValueError):
        return {"completed": 0, "failed": 0}


def request_cancel(folder) -> None:
    """Ask the job to stop at its next block boundary (a file, so it holds across driver restarts)."""
    write_atomic(Path(folder) / CANCEL, f"{time.time()}\n")


def cancel_requested(folder) -> bool:
    return (Path(folder) / CANCEL).exists()


def run_openai_batch(config: OpenAIBatchConfig) -> dict:
    """Run (or resume) the batch's lines; returns {"state": "completed" | "cancelled", "lines", "completed",
    "failed"}. Lines already in a result file are never run again."""
    out = Path(config.folder)
    specs = read_specs(out)
    ids = [s["custom_id"] for s in specs]
    blocks = [ids[i : i + config.block_size] for i in range(0, len(ids), config.block_size)]
    folder = RunFolder(out, "openai batch", OUTPUTS, flag="folder")
    with folder.open(_plan(config, ids)):
        folder.mkdir(out / "results")
        folder.mkdir(out / "audio")
        clear_temporaries(out / "results", out / "audio")
        folder.commit()
        pending = {b: block for b, block in enumerate(blocks) if not _complete(result_path(out, b), len(block))}
        _write_progress(out)
        if pending and not cancel_requested(out):
            wanted = {i for block in pending.values() for i in block}
            _run_pipeline(config, out, [s for s in specs if s["custom_id"] in wanted], pending)
        done = sum(_complete(result_path(out, b), len(block)) for b, block in enumerate(blocks))
        progress = _write_progress(out)
    state = "completed" if done == len(blocks) else "cancelled"
    return {"state": state, "lines": len(ids), **progress}


def _run_pipeline(config: OpenAIBatchConfig, out: Path, specs: list[dict], pending: dict[int, list[str]]) -> None:
    """Stream the pending lines through the runner pool; each block is written once all its rows came."""
    import ray

    from actors.config import PipelineConfig
    from actors.models import resolve_models_dir

    stages = PipelineConfig.from_models_dir(resolve_models_dir(config.models)).with_resources(
        num_gpus=0.0, torch_threads=config.torch_threads)
    if config.request_timeout_s:
        stages = dataclasses.replace(stages, request_timeout_s=config.request_timeout_s)
    caps = {"max_new_tokens": config.max_new_tokens_cap, "max_text_chars": config.max_text_chars}
    rows = [{"custom_id": s["custom_id"], "spec": json.dumps(s)} for s in specs]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), len(pending))))
    ds = ds.map_batches(RequestRunner, fn_constructor_kwargs={
        "config": stages, "caps": caps, "max_audio_seconds": config.max_audio_seconds, "audio_dir": str(out / "audio")},
        compute=ray.data.ActorPoolStrategy(size=config.pool.size), num_cpus=config.pool.num_cpus,
        num_gpus=config.pool.num_gpus, batch_size=config.pool.batch_size, batch_format="pyarrow")
    writer = BlockWriter(None, pending, key="custom_id",
                         write=lambda b, rows: write_atomic(result_path(out, b), pa.Table.from_pylist(rows, RESULT_SCHEMA)))
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        before = len(writer.written)
        writer.add(batch)
        if len(writer.written) != before:
            _write_progress(out)
            if cancel_requested(out):  # a block boundary: what is written stays, nothing else is written
                return
    missing = writer.missing()
    if missing:
        raise RuntimeError(f"{len(missing)} line(s) got no result row, e.g. {missing[:3]}")


def _write_progress(out: Path) -> dict:
    rows = [r for f in sorted((out / "results").glob("part-*.parquet"))
            for r in pq.read_table(f, columns=["status"]).to_pylist()]
    progress = {"completed": sum(r["status"] == "ok" for r in rows), "failed": sum(r["status"] != "ok" for r in rows)}
    write_atomic(out / PROGRESS, json.dumps(progress) + "\n")
    return progress


def _complete(path: Path, n_rows: int) -> bool:
    try:
        return path.exists() and pq.read_metadata(path).num_rows == n_rows
    except (OSError, pa.ArrowInvalid):
        path.unlink(missing_ok=True)
        return False


def _plan(config: OpenAIBatchConfig, ids: list[str]) -> dict:
    return {"version": PLAN_VERSION, "lines": len(ids),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "block_size": config.block_size}


# ---------------------------------------------------------------------------------------------------------
# the runner pool


class RequestRunner:
    """A Ray Data actor holding the three stage objects; runs its batch's specs concurrently through
    `run_request` (the LLM stage's engine batches them) and returns one result row per spec."""

    def __init__(self, config, caps: dict, max_audio_seconds: float, audio_dir: str):
        from actors.local import LocalPipeline
        from actors.ray_runtime import ray_device
        from actors.requests import model_caps

        self.pipe = LocalPipeline(config, *ray_device())  # the GPU Ray gave this actor, else CPU
        self.caps = model_caps(config.llm.path, **caps)
        self.max_audio_seconds = float(max_audio_seconds)
        self.audio_dir = Path(audio_dir)
        self.audio_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch) -> pa.Table:
        specs = [json.loads(s) for s in (batch.column("spec").to_pylist() if hasattr(batch, "column")
                                         else [r["spec"] for r in batch])]

        async def together():
            return await asyncio.gather(*(self.run_line(spec) for spec in specs))

        rows = asyncio.run_coroutine_threadsafe(together(), self.pipe.bridge.loop).result()
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    async def run_line(self, spec: dict) -> dict:
        from actors.orchestration import run_request
        from actors.payloads import AudioChunk, Done, ErrorEvent, TextDelta
        from actors.requests import request_options

        row = dict.fromkeys(RESULT_SCHEMA.names)
        row.update(custom_id=spec["custom_id"], status="ok", token_ids=[])
        try:
            options = request_options(**spec["options"], caps=self.caps)
            clips = await asyncio.to_thread(self._admit_all, spec)
        except LineError as err:
            return _failed(row, "input", str(err), err.param, err.code)
        except ValueError as err:  # the request policy's InputError
            return _failed(row, "input", str(err), getattr(err, "field", None))
        history = []
        for entry in spec.get("history") or []:  # earlier turns' clips: encoded first, as the chat route does
            entry = dict(entry)
            if entry.get("audios"):
                try:
                    entry["audios"] = [await self.pipe.clients.encode(clips.pop(0)) for _ in entry["audios"]]
                except Exception as err:  # noqa: BLE001 - the line's failure
                    return _failed(row, "encoder", f"{type(err).__name__}: {err}")
            history.append(entry)
        audio = clips.pop(0) if spec.get("audio") else None
        pcm, rate = [], 0
        events = run_request(self.pipe.clients, self.pipe.limits, spec["task"], text=spec.get("text"), audio=audio,
                             voice=spec.get("voice"), history=history, system=spec.get("system"),
                             request_id=f"{spec['custom_id']}#{uuid.uuid4().hex[:8]}", caps=self.caps,
                             **options.run_args())
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    row["token_ids"] += list(event.token_ids)
                elif isinstance(event, AudioChunk):
                    pcm.append(np.asarray(event.pcm, np.float32))
                    rate = event.sample_rate
                elif isinstance(event, ErrorEvent):
                    return _failed(row, event.stage, event.message, code="overloaded" if event.busy else None)
                elif isinstance(event, Done):
                    row.update(text=event.text, token_ids=list(event.token_ids), audio_codes=len(event.audio_codes),
                               reason=event.reason, usage=json.dumps(event.usage, default=float))
        finally:
            await events.aclose()
        row["audio_seconds"] = float(spec.get("audio_seconds") or 0.0)
        if pcm:
            row.update(audio=str(self._write_pcm(spec["custom_id"], np.concatenate(pcm))), sample_rate=int(rate))
        return row

    def _admit_all(self, spec: dict) -> list:
        """Every clip of the line, history's first, then the new turn's: admitted with the endpoint's limits
        (each decoded once), their seconds together within max_audio_seconds."""
        refs = [(ref, f"history[{i}].audio") for i, e in enumerate(spec.get("history") or []) for ref in e.get("audios") or []]
        if spec.get("audio"):
            refs.append((spec["audio"], spec.get("audio_param") or "audio"))
        clips = [admit_clip(read_ref(ref, param), self.max_audio_seconds, param) for ref, param in refs]
        seconds = sum(c.seconds for c in clips)
        if seconds > self.max_audio_seconds:
            raise LineError(f"the request holds {seconds:.1f} s of audio, over max_audio_seconds="
                            f"{self.max_audio_seconds:g}", "messages", "max_audio_seconds")
        spec["audio_seconds"] = seconds
        return clips

    def _write_pcm(self, custom_id: str, pcm: np.ndarray) -> Path:
        final = self.audio_dir / f"{hashlib.sha1(custom_id.encode()).hexdigest()[:20]}.npy"
        temp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.tmp")
        with open(temp, "wb") as f:
            np.save(f, pcm.astype(np.float32))
        os.replace(temp, final)
        return final


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
            return Path(ref["path"]).read_bytes()
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


def _failed(row: dict, stage: str, message: str, param: str | None = None, code: str | None = None) -> dict:
    row.update(status="error", error_stage=stage, error=message, error_param=param, error_code=code)
    return row
