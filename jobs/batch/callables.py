"""Ray Data callable classes, one per pipeline stage, over the stage classes of `actors/` (not copies).

    SpeechEncoder  rows (id, path)        -> + audio_seconds, segments' times and audio codes  (EncoderStage)
    SpeechLLM      rows (codes or text)   -> + transcript / audio chunks                        (LLMStage)
    AudioDecoder   rows (audio chunks)    -> + a FLAC file under DIR/audio/, its duration       (DecoderStage)

A row with a `spec` is a request line of the OpenAI Batch API (`jobs.batch.lines`, task "requests"): the encoder
admits its clips with the endpoint's limits and encodes each whole, the LLM builds its request with the one
request builder from the line's own options (as `actors.orchestration.run_request` does online: same history,
voice, system, layout, mode), the decoder writes its spoken answer as float32 PCM (.npy), and the row keeps the
token ids and the usage the online answer reports. Audio files are written through `jobs.storage`, so DIR/audio
may be on an object store (each file one object).

Each class loads its stage once in `__init__` (Ray Data keeps it in an actor of a pool) and maps a batch of
rows (a pyarrow table, or a list of dicts when tested on `take_batch`-style input without Ray). The stage
objects are async: their calls for the whole batch are issued at once on the class's event-loop thread, so
the encoder's micro-batcher shares forwards between windows, the LLM stage's engine loop decodes every
request of the batch in one continuously batched engine, and the decoder batches chunks of different rows.

The LLM stream and the decoder's chunk protocol are the ones every request uses (`actors.streams`: the LLM
fold; chunks numbered in order, the final flush, close on error). A bad row never fails the batch: it leaves
a stage with `status` "error" and `error` naming the stage and the reason, and later stages pass it through;
when a failed engine step dropped every request of the batch (out of memory, ...), each runs again alone, so
only the request that cannot run fails. Timings are each row's share of the stage's wall time for the
batch (by audio seconds, generated tokens, output seconds), so they add up to the time the stage was busy.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from actors.aio import LoopThread
from actors.config import DecoderStageConfig, EncoderStageConfig, LLMStageConfig
from actors.payloads import LAYOUT_AUTO, AudioPayload, SpeechRequest
from actors.requests import (
    RequestOptions,
    build_request,
    check_seed,
    model_caps,
    parse_mode,
    request_options,
)
from actors.streams import DecoderFeed, concatenate, fold_llm
from jobs.batch.inputs import TASKS, read_audio_bytes
from jobs.batch.lines import admit_line, line_request_inputs, write_pcm
from jobs.batch.segments import Segment, WindowConfig, plan_windows, stitch
from jobs.storage import location, write_atomic

SEGMENT = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string())])
# Every column a row may carry between the stages; a stage fills its own and passes the others on.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("text", pa.string()), ("reference", pa.string()),
    ("audio", pa.string()), ("audio_seconds", pa.float64()), ("status", pa.string()), ("error", pa.string()),
    ("segments", pa.list_(SEGMENT)), ("tokens", pa.int64()), ("finish_reason", pa.string()),
    ("encode_s", pa.float64()), ("llm_s", pa.float64()), ("decode_s", pa.float64()),
    # request lines only (task "requests"): what the online answer reports, and the refused field
    ("token_ids", pa.list_(pa.int64())), ("audio_codes", pa.int64()), ("sample_rate", pa.int64()),
    ("usage", pa.string()), ("error_param", pa.string()), ("error_code", pa.string()),
    # in flight only (dropped from the result files): per-segment (per-clip) audio codes, the LLM's audio chunks,
    # a request line's spec (JSON)
    ("seg_codes", pa.list_(pa.list_(pa.int32()))), ("chunks", pa.list_(pa.list_(pa.int32()))), ("spec", pa.string()),
])
IN_FLIGHT = ("seg_codes", "chunks", "spec")
REQUEST_COLUMNS = ("token_ids", "audio_codes", "sample_rate", "usage", "error_param", "error_code")


@dataclass(frozen=True)
class DecodeOptions:
    """How the LLM decodes every request of the job (the same for each, so results do not depend on batching).
    Checked by the one request policy (actors.requests) when made: a bad value is an InputError naming it."""

    mode: object = None  # None: the checkpoint's default schedule; a name or a list like [1, 10, 4, 10]
    max_new_tokens: int = 256
    temperature: float | None = None  # None or 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0  # with sampling: each request's seed is derived from this and its id (batch-independent)
    constraint: str | None = LAYOUT_AUTO  # "auto": the LLM stage forces the task's layout on a tiny set only

    def __post_init__(self):
        object.__setattr__(self, "mode", parse_mode(self.mode))
        check_seed(self.seed)  # the base of each request's seed (stands without sampling)
        self.options()

    def options(self, request_id: str | None = None) -> RequestOptions:
        """The request policy's options of one request (its sampling seed derived from `seed` and the id)."""
        sampling = bool(self.temperature)
        seed = zlib.crc32(f"{self.seed}:{request_id}".encode()) & 0x7FFFFFFF if sampling else None
        return request_options(mode=self.mode, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                               seed=seed, layout=self.constraint)

    def sampling(self, request_id: str):
        return self.options(request_id).sampling


class _AsyncStage:
    """A stage object whose async methods run on this class's own event-loop thread."""

    def __init__(self, name: str):
        self.bridge = LoopThread(f"batch-{name}")

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.bridge.loop).result()

    def run_all(self, coroutines) -> list:
        """Run the coroutines concurrently on the stage's loop; their results in order."""
        async def together():
            return await asyncio.gather(*coroutines)

        return self.run(together())


class SpeechEncoder(_AsyncStage):
    """Reads each row's audio, cuts it into windows (`WindowConfig`) and encodes every window of the batch; a
    request line's clips are admitted with the endpoint's limits (`max_audio_seconds`) and each encoded whole."""

    def __init__(self, config: EncoderStageConfig, windows: WindowConfig = WindowConfig(),
                 max_audio_seconds: float | None = 4 * 3600.0):
        from actors.encoder_stage import EncoderStage
        from actors.ray_runtime import ray_device

        super().__init__("encoder")
        self.stage = EncoderStage(config, *ray_device())  # the GPU Ray gave this actor, else CPU
        self.windows, self.max_audio_seconds = windows, max_audio_seconds

    def __call__(self, batch) -> pa.Table:
        rows = to_rows(batch)
        start = time.perf_counter()
        waves, clips = {}, {}
        for i, row in enumerate(rows):
            try:
                if row["spec"]:
                    clips[i] = admit_line(json.loads(row["spec"]), self.max_audio_seconds)
                    row["audio_seconds"] = sum(c.seconds for c in clips[i])
                    continue
                if not row["path"]:
                    raise ValueError("the input has no audio path")
                waves[i] = self._load(row["path"])
                row["audio_seconds"] = len(waves[i]) / self.stage.sample_rate
            except (ValueError, OSError) as err:  # AudioError is a ValueError
                fail(row, "input", err)
        self.run_all([self._encode(rows, waves), self._encode_lines(rows, clips)])
        total = sum(row["audio_seconds"] or 0.0 for i, row in enumerate(rows) if i in waves or i in clips) or 1
        elapsed = time.perf_counter() - start
        for i in (*waves, *clips):
            rows[i]["encode_s"] = elapsed * (rows[i]["audio_seconds"] or 0.0) / total
        return to_table(rows)

    def _load(self, path: str):
        """The one audio admission (`pipeline.audio.admit_audio`): refused by its header before decoding when it
        would decode too large; an AudioError's message names the flag that accepts the file."""
        from pipeline.audio import DEFAULT_LIMITS, AudioError, admit_audio

        limits = DEFAULT_LIMITS.with_(max_seconds=self.max_audio_seconds)
        try:
            return admit_audio(read_audio_bytes(path, limits.max_decoded_bytes), limits=limits,
                               target_sample_rate=self.stage.sample_rate, name=path).pcm
        except AudioError as err:
            raise ValueError(err.message({"max_seconds": "--max-audio-seconds"})) from None

    async def _encode(self, rows: list[dict], waves: dict) -> None:
        rate = self.stage.sample_rate

        async def one(row, wave):
            spans = plan_windows(len(wave), rate, self.windows)
            try:
                codes = await asyncio.gather(*(self.stage.encode(AudioPayload(wave[a:b], rate, row["id"]))
                                               for a, b in spans))
            except Exception as err:  # noqa: BLE001 - one row's failure, reported in its row
                return fail(row, "encoder", err)
            if not all(codes):
                return fail(row, "encoder", f"no audio codes for {row['audio_seconds']:.2f} s of audio (too short?)")
            row["seg_codes"] = [list(c) for c in codes]
            row["segments"] = [{"start": a / rate, "end": b / rate, "text": ""} for a, b in spans]

        await asyncio.gather(*(one(rows[i], wave) for i, wave in waves.items()))

    async def _encode_lines(self, rows: list[dict], clips: dict) -> None:
        """Each request line's clips, each encoded whole (as the online routes encode a clip); the usage counts
        the new turn's clip as run_request's does."""
        async def one(row, payloads):
            try:
                codes = [list(c) for c in await asyncio.gather(*(self.stage.encode(p) for p in payloads))]
            except Exception as err:  # noqa: BLE001 - one line's failure, reported in its row
                return fail(row, "encoder", err)
            spec = json.loads(row["spec"])
            usage = {}
            if spec.get("audio"):
                if not codes[-1]:
                    return fail(row, "encoder", f"the encoder produced no codes for {payloads[-1].name!r} "
                                                f"({payloads[-1].seconds:.2f} s)")
                usage = {"waveforms": 1, "seconds_of_audio": payloads[-1].seconds, "codes": len(codes[-1])}
            row["seg_codes"] = codes
            row["usage"] = json.dumps({"encoder": usage})

        await asyncio.gather(*(one(rows[i], payloads) for i, payloads in clips.items() if payloads))


class SpeechLLM(_AsyncStage):
    """ASR rows: one request per segment (codes -> text), stitched; TTS rows: text -> audio chunks; request
    lines: the line's request, built from its spec and its own options (`caps`: the endpoint's caps).

    Every request of the batch goes to the LLM stage at once; its engine loop runs them continuously
    batched (up to `LLMStageConfig.max_batch_size` per step, the rest joining as others finish).
    """

    def __init__(self, config: LLMStageConfig, task: str, options: DecodeOptions = DecodeOptions(),
                 caps: dict | None = None):
        from actors.llm_stage import LLMStage
        from actors.ray_runtime import ray_device

        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {TASKS}")
        super().__init__("llm")
        self.stage = LLMStage(config, *ray_device())  # the GPU Ray gave this actor, else CPU
        self.task, self.options = task, options
        # the request policy's caps (the model's and an operator's): a text too long is the row's error
        self.caps = model_caps(config.path, **(caps or {}))

    def __call__(self, batch) -> pa.Table:
        rows = to_rows(batch)
        start = time.perf_counter()
        requests = []  # (row, segment index, SpeechRequest)
        for row in rows:
            if row["status"] != "ok":
                continue
            try:
                if row["spec"]:
                    requests.append((row, 0, self._line_request(row)))
                    continue
                inputs = row["seg_codes"] if self.task == "asr" else [None]
                for k, codes in enumerate(inputs):
                    request_id = f"{row['id']}#{k}"
                    requests.append((row, k, build_request(
                        self.task, request_id=request_id, text=row["text"] if self.task == "tts" else None,
                        codes=codes, options=self.options.options(request_id), caps=self.caps)))
            except ValueError as err:
                fail(row, "input", err)
        outputs = self.run_all([self._generate(request) for _, _, request in requests])
        if len(requests) > 1:  # a failed engine step failed every request in it: each runs again alone, so a
            # request that cannot run (too long, out of memory) fails only its own row
            for i, out in enumerate(outputs):
                if out.get("shared_failure"):
                    outputs[i] = self.run(self._generate(requests[i][2]))
        for (row, k, _), out in zip(requests, outputs):
            self._fold(row, k, out)
        for row in rows:
            if row["status"] != "ok" or row["spec"]:
                pass
            elif self.task == "asr":
                row["text"] = stitch([Segment(**s) for s in row["segments"]])
            elif not row["chunks"]:
                fail(row, "llm", f"no audio in {row['tokens']} generated tokens (raise --max-new-tokens?)")
            row["seg_codes"] = None
        total = sum(row["tokens"] or 0 for row in rows) or 1
        elapsed = time.perf_counter() - start
        for row in rows:
            if row["tokens"]:
                row["llm_s"] = elapsed * row["tokens"] / total
        return to_table(rows)

    def _line_request(self, row: dict) -> SpeechRequest:
        """A request line's request, as run_request builds the same request online (InputError naming a field)."""
        spec = json.loads(row["spec"])
        history, codes = line_request_inputs(spec, row["seg_codes"] or [])
        return build_request(spec["task"], request_id=f"{row['id']}#{uuid.uuid4().hex[:8]}", text=spec.get("text"),
                             codes=codes, history=history, voice_codes=spec.get("voice"), system=spec.get("system"),
                             options=request_options(**spec["options"], caps=self.caps), caps=self.caps)

    async def _generate(self, request: SpeechRequest) -> dict:
        from actors.llm_stage import EngineStepFailed

        try:
            fold = await fold_llm(self.stage.generate(request))
        except Exception as err:  # noqa: BLE001 - reported in the request's row
            return {"error": f"{type(err).__name__}: {err}", "shared_failure": isinstance(err, EngineStepFailed)}
        return {"text": fold.text, "chunks": fold.audio_chunks, "token_ids": list(fold.end.token_ids),
                "tokens": len(fold.end.token_ids), "reason": fold.end.reason, "usage": fold.end.usage}

    def _fold(self, row: dict, k: int, out: dict) -> None:
        if row["status"] != "ok":
            return
        if "error" in out:
            fail(row, "llm", out["error"])
            return
        if row["spec"]:  # what run_request's Done says (the decoder adds its usage)
            usage = {"encoder": {}, **json.loads(row["usage"] or "{}")}  # run_request's: every stage named
            usage.update(llm=out["usage"], decoder={"chunks": 0, "forwards": 0})
            row.update(text=out["text"], token_ids=out["token_ids"], tokens=out["tokens"], chunks=out["chunks"],
                       audio_codes=sum(map(len, out["chunks"])), finish_reason=out["reason"],
                       usage=json.dumps(usage, default=float))
            return
        row["tokens"] = (row["tokens"] or 0) + out["tokens"]
        reasons = {r for r in ((row["finish_reason"] or "").split(",") + [out["reason"]]) if r}
        row["finish_reason"] = ",".join(sorted(reasons))
        if self.task == "asr":
            row["segments"][k]["text"] = out["text"].strip()
        else:
            row["chunks"] = out["chunks"]


class AudioDecoder(_AsyncStage):
    """Decodes each row's audio chunks as one incremental stream (as the live pipeline does) and writes
    `audio_dir/<id>.flac` (a request line's answer: `audio_dir/<hash of its id>.npy`, float32 PCM) whole
    (`jobs.storage.write_atomic`: under a temporary name, then moved into place)."""

    def __init__(self, config: DecoderStageConfig, audio_dir: str | os.PathLike):
        from actors.decoder_stage import DecoderStage
        from actors.local import LocalStageClients, LocalStages
        from actors.ray_runtime import ray_device

        super().__init__("decoder")
        self.stage = DecoderStage(config, *ray_device())
        self.clients = LocalStageClients(LocalStages(decoder=self.stage))
        self.audio_dir = location(audio_dir)
        self.audio_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch) -> pa.Table:
        rows = to_rows(batch)
        start = time.perf_counter()
        ready = [row for row in rows if row["status"] == "ok" and (row["chunks"] or not row["spec"])]
        decoded = self.run_all([self._decode(row) for row in ready])
        seconds = {}
        for row, chunks in zip(ready, decoded):
            if isinstance(chunks, Exception):
                fail(row, "decoder", chunks)
                continue
            pcm = concatenate(chunks)
            seconds[row["id"]] = len(pcm) / self.stage.sample_rate
            if row["spec"]:  # a request line: run_request's decoder usage, its input seconds kept
                usage = json.loads(row["usage"])
                usage["decoder"] = {"chunks": len(chunks), "forwards": chunks[-1].forwards,
                                    "compute_s": sum(c.compute_s for c in chunks)}
                row.update(audio=self._write_line(row["id"], pcm), sample_rate=self.stage.sample_rate,
                           usage=json.dumps(usage, default=float))
            else:
                row.update(audio=self._write(row["id"], pcm), audio_seconds=seconds[row["id"]])
            row["chunks"] = None
        total = sum(seconds.values()) or 1
        elapsed = time.perf_counter() - start
        for row in ready:
            if row["id"] in seconds and row["status"] == "ok":
                row["decode_s"] = elapsed * seconds[row["id"]] / total
        return to_table(rows)

    async def _decode(self, row: dict):
        """The row's chunks through the decoder's chunk protocol (`actors.streams.DecoderFeed`, as every request):
        the PCM chunks (the flush's last), or the exception."""
        feed = DecoderFeed(self.clients, f"{row['id']}#{uuid.uuid4().hex[:8]}")
        try:
            return await feed.decode(row["chunks"])
        except Exception as err:  # noqa: BLE001 - reported in the row (the feed closed the decoder's stream)
            return err

    def _write(self, item_id: str, pcm) -> str:
        """`audio_dir/<id>.flac`, written whole (a local file renamed into place, or one object)."""
        from pipeline.audio import write_audio

        final = self.audio_dir / f"{file_stem(item_id)}.flac"
        with tempfile.TemporaryDirectory(prefix="vita-batch-") as scratch:
            encoded = write_audio(Path(scratch) / final.name, pcm, self.stage.sample_rate)
            write_atomic(final, encoded.read_bytes())
        return str(final)

    def _write_line(self, item_id: str, pcm) -> str:
        final = self.audio_dir / f"{hashlib.sha1(item_id.encode()).hexdigest()[:20]}.npy"
        write_pcm(final, pcm)
        return str(final)


# ---------------------------------------------------------------------------------------------------------
# rows


def new_row(**fields) -> dict:
    row = dict.fromkeys(ROW_SCHEMA.names)
    row.update(status="ok", error="")
    row.update(fields)
    return row


def fail(row: dict, stage: str, err) -> None:
    """Mark a row failed (the first failure wins: later stages pass the row on untouched); an input error's
    field (InputError.field, LineError.param) and code are kept for a request line's error answer."""
    if row["status"] == "ok":
        message = str(err) if not isinstance(err, Exception) or isinstance(err, (ValueError, OSError)) \
            else f"{type(err).__name__}: {err}"
        row.update(status="error", error=f"{stage}: {message}", seg_codes=None, chunks=None)
        if isinstance(err, ValueError):
            row.update(error_param=getattr(err, "param", None) or getattr(err, "field", None),
                       error_code=getattr(err, "code", None))


def to_rows(batch) -> list[dict]:
    """A pyarrow table, a dict of columns or a list of dicts -> full rows (every ROW_SCHEMA column)."""
    if isinstance(batch, pa.Table):
        items = batch.to_pylist()
    elif isinstance(batch, dict):
        keys = list(batch)
        items = [dict(zip(keys, values)) for values in zip(*(list(batch[k]) for k in keys))]
    else:
        items = list(batch)
    return [new_row(**{k: v for k, v in item.items() if k in ROW_SCHEMA.names}) for item in items]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def file_stem(item_id: str) -> str:
    """A file name for an id: kept if it is a plain name, else made safe with a hash of the id (unique)."""
    safe = re.sub(r"[^\w.-]+", "_", item_id).strip("._") or "item"
    if safe == item_id:
        return safe
    return f"{safe[:80]}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"


def with_threads(config, threads: int | None):
    """A stage config whose actor uses `threads` torch threads (None: unchanged)."""
    return config if threads is None else replace(config, resources=replace(config.resources, torch_threads=threads))
