"""The two Ray Data steps of corpus preparation.

    read_and_check   (tasks, CPU)          input rows -> + 16 kHz waveforms, audio seconds, content hash, or an error
    SampleBuilder    (actor pool, GPU/CPU) -> audio codes (speech encoder, loaded once per actor) -> ids + labels

With `read_tasks=0` the actors read and check their rows themselves: no read-task processes (each one imports
torch and transformers: seconds of start-up on a small machine), at the cost of the encoder waiting on reads.

Both map a pyarrow table (or a list of dicts, to be called without Ray) and never raise for one bad row: the
row leaves with status "error", a `reason` and a `detail`, and later steps pass it on. Waveforms travel as
float32 bytes, one per audio of the sample.
"""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pyarrow as pa

from jobs.prepare.checks import TARGET_RATE, AudioChecks, Reject, content_hash, read_checked
from jobs.prepare.recipes import AudioRef
from jobs.prepare.samples import INPUT_SCHEMA, OUT_SCHEMA, build_sample

READ_SCHEMA = pa.schema([*INPUT_SCHEMA, ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                         ("path", pa.string()), ("pcm", pa.list_(pa.binary())), ("audio_seconds", pa.float64()),
                         ("audio_sha1", pa.string()), ("converted", pa.list_(pa.string()))])


def read_and_check(batch, checks: AudioChecks = AudioChecks()) -> pa.Table:
    """Read, resample and check every audio of every row; the content hash of each accepted row's audio. The
    inputs of one utterance (its ASR and TTS samples, next to each other in the plan) read its audio once."""
    rows = _rows(batch, READ_SCHEMA)
    cache: dict[str, object] = {}  # refs JSON -> (waves, converted) or the Reject
    for row in rows:
        row.update(status="ok", pcm=[], converted=[], audio_seconds=0.0)
        refs = json.loads(row["refs"] or "[]")
        row["path"] = ";".join(r["path"] for r in refs)
        if row["error"]:
            _reject(row, "bad_input", row["error"])
            continue
        if not row["messages"]:
            _reject(row, "bad_input", "no transcript or conversation to build a sample from")
            continue
        if row["refs"] not in cache:
            cache[row["refs"]] = _read_all(refs, checks)
        result = cache[row["refs"]]
        if isinstance(result, Reject):
            _reject(row, result.reason, result.detail)
            continue
        waves, row["converted"] = result
        row["pcm"] = [w.astype(np.float32).tobytes() for w in waves]
        row["audio_seconds"] = sum(len(w) for w in waves) / TARGET_RATE
        # dedup key: the task and the audio, or the text of a text-only sample
        row["audio_sha1"] = content_hash(waves) if waves else content_hash([np.frombuffer(
            row["messages"].encode(), np.uint8).astype(np.float32) / 32767])
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def _read_all(refs: list[dict], checks: AudioChecks):
    waves, converted = [], []
    try:
        for ref in refs:
            wave, changes = read_checked(AudioRef(**ref), checks)
            waves.append(wave)
            converted += changes
    except Reject as err:
        return err
    except Exception as err:  # noqa: BLE001 - an unexpected failure is still this row's alone
        return Reject("unreadable", f"{type(err).__name__}: {err}")
    return waves, converted


class SampleBuilder:
    """Loads the speech encoder stage (`actors.encoder_stage.EncoderStage`, on the GPU Ray gave this actor, else
    CPU) and the LLM's tokenizer once; per batch, one batched encoder call for every waveform of the batch
    (`EncoderStage.encode_waveforms`: equal to one clip at a time), then each row's sample."""

    def __init__(self, encoder_dir: str, llm_dir: str, ratio=(1, 10, 4, 10), torch_threads: int | None = 1,
                 max_batch_windows: int = 128, read: AudioChecks | None = None):
        from actors.aio import LoopThread
        from actors.config import EncoderStageConfig, StageResources
        from actors.encoder_stage import EncoderStage
        from actors.ray_runtime import ray_device
        from pipeline.tokens.vocab import TokenLayout, load_tokenizer

        config = EncoderStageConfig(path=encoder_dir, resources=StageResources(torch_threads=torch_threads))
        device, dtype = ray_device()  # cuda:0 in bf16 when Ray gave this actor a GPU, else CPU fp32
        self.stage = EncoderStage(config, device, dtype, max_batch_windows=max_batch_windows)
        self.bridge = LoopThread("prepare-encoder")  # the stage's async calls run on this loop
        self.tokenizer = load_tokenizer(llm_dir)
        self.layout = TokenLayout.from_tokenizer(self.tokenizer)
        self.ratio = tuple(ratio) if ratio else None
        self.read = read  # given: input rows are read and checked here (no separate read tasks)
        self.encode_s = 0.0

    def __call__(self, batch) -> pa.Table:
        if self.read is not None:
            batch = read_and_check(batch, self.read)
        rows = _rows(batch, READ_SCHEMA)
        ready = [row for row in rows if row["status"] == "ok"]
        unique = {}  # an utterance's audio is encoded once for all its samples in the batch
        for row in ready:
            unique.setdefault(row["refs"], row)
        encoded = dict(zip(unique, self._encode([[np.frombuffer(p, np.float32) for p in row["pcm"]]
                                                  for row in unique.values()])))
        codes = [encoded[row["refs"]] for row in ready]
        for row, row_codes in zip(ready, codes):
            if isinstance(row_codes, Exception):
                _reject(row, "encoder", f"{type(row_codes).__name__}: {row_codes}")
                continue
            if any(not c for c in row_codes):
                _reject(row, "too_short", f"{row['path']}: no audio codes (under one 80 ms token)")
                continue
            try:
                row.update(build_sample(self.tokenizer, self.layout, row, row_codes, self.ratio))
            except ValueError as err:
                _reject(row, "bad_sample", str(err))
        out = []
        for row in rows:
            row["paths"] = row["path"].split(";") if row["path"] else []
            out.append({name: row.get(name) for name in OUT_SCHEMA.names})
        return pa.Table.from_pylist(out, schema=OUT_SCHEMA)

    def _encode(self, per_row: list[list[np.ndarray]]) -> list:
        """Codes per row (a list per audio), all rows' audio in one batched call; a failing batch is retried
        row by row so one bad row cannot fail the others."""
        start = time.perf_counter()
        flat = [w for waves in per_row for w in waves]
        try:
            codes = self._encode_waveforms(flat)
            out, i = [], 0
            for waves in per_row:
                out.append(codes[i : i + len(waves)])
                i += len(waves)
        except Exception:  # noqa: BLE001
            out = []
            for waves in per_row:
                try:
                    out.append(self._encode_waveforms(waves))
                except Exception as err:  # noqa: BLE001 - this row's failure, in its row
                    out.append(err)
        self.encode_s += time.perf_counter() - start
        return out

    def _encode_waveforms(self, waveforms: list[np.ndarray]) -> list[list[int]]:
        return asyncio.run_coroutine_threadsafe(self.stage.encode_waveforms(waveforms), self.bridge.loop).result()


def _reject(row: dict, reason: str, detail: str) -> None:
    if row["status"] == "ok":
        row.update(status="error", reason=reason, detail=detail, pcm=[])


def _rows(batch, schema: pa.Schema) -> list[dict]:
    """A pyarrow table or a list of dicts -> dicts with every column of `schema` (missing ones None)."""
    items = batch.to_pylist() if isinstance(batch, pa.Table) else list(batch)
    return [{**dict.fromkeys(schema.names), **item} for item in items]
