"""The OpenAI Batch API's job without Serve: the lines run as the batch job of `vita-audio batch` (task "requests":
its stage pools, block files, resume, cancel), each greedy line equal to the same request through run_request
in process; a bad line is one error row naming its field; cancel stops at a block boundary; a killed driver
resumes without running a written line again; spoken answers and `batch tts` audio written to s3:// on a local
S3-compatible server (moto on loopback, started and stopped by this module: tests/test_object_store's `s3` fixture,
module-scoped, so this module gets its own)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import numpy as np
import pytest
import soundfile
from serve_testing import clip, local_pipeline
from test_object_store import BUCKET, s3  # noqa: F401 - the fixture: this module's own moto server on loopback

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIPS = (clip(1.0, seed=1), clip(1.5, seed=2))
B64 = [base64.b64encode(c).decode() for c in CLIPS]
GREEDY = {"max_new_tokens": 24, "layout": "auto"}
SPEAK = {"max_new_tokens": 40, "layout": "auto"}


def _specs(tmp_path) -> list[dict]:
    """A mixed set: speech, transcriptions (base64, a path), chat with an audio history, a system turn and audio
    in and out, text chat; and three bad lines the job finds (unreadable audio, too long, a refused option)."""
    (tmp_path / "clip1.wav").write_bytes(CLIPS[1])
    return [
        {"custom_id": "tts", "task": "tts", "text": "Hello there.", "voice": None, "options": SPEAK},
        {"custom_id": "asr", "task": "asr", "audio": {"b64": B64[0]}, "audio_param": "file", "options": GREEDY},
        {"custom_id": "asr-path", "task": "asr", "audio": {"path": str(tmp_path / "clip1.wav")},
         "audio_param": "file", "options": GREEDY},
        {"custom_id": "bad-audio", "task": "asr", "audio": {"b64": base64.b64encode(b"no audio" * 9).decode()},
         "audio_param": "file", "options": GREEDY},
        {"custom_id": "chat-history", "task": "chat", "system": "You are terse.", "audio": {"b64": B64[1]},
         "audio_param": "messages.input_audio", "options": SPEAK,
         "history": [{"role": "user", "content": "Listen.\n<|audio|>", "audios": [{"b64": B64[0]}]},
                     {"role": "assistant", "content": "I heard it."}]},
        {"custom_id": "chat-text", "task": "chat", "text": "Say something.", "options": {**GREEDY, "layout": "text"}},
        {"custom_id": "too-long", "task": "asr", "audio": {"b64": base64.b64encode(clip(3.0)).decode()},
         "audio_param": "file", "options": GREEDY},
        {"custom_id": "bad-option", "task": "tts", "text": "Hi.", "options": {**SPEAK, "temperature": 7}},
    ]


def _config(folder, models, **kw):
    from jobs.batch.openai_batch import OpenAIBatchConfig

    settings = {"max_audio_seconds": 2.8, "block_size": 3, "pool": {"size": 1, "num_cpus": 0.6, "batch_size": 4}}
    return OpenAIBatchConfig(folder=str(folder), models=str(models), **{**settings, **kw})


@pytest.fixture(scope="module")
def mixed(ray_session, tiny_models, tmp_path_factory):
    """The mixed set run once (shared by the checks of its rows)."""
    from jobs.batch.openai_batch import read_results, run_openai_batch, write_specs

    folder = tmp_path_factory.mktemp("openai-batch")
    specs = _specs(folder)
    write_specs(folder, specs)
    summary = run_openai_batch(_config(folder, tiny_models))
    return {"folder": folder, "specs": specs, "summary": summary, "rows": read_results(folder)}


def test_one_row_per_line_and_bad_lines_name_their_field(mixed):
    rows, specs = mixed["rows"], mixed["specs"]
    assert mixed["summary"] == {"state": "completed", "lines": 8, "completed": 5, "failed": 3}
    assert [r["custom_id"] for r in rows] == [s["custom_id"] for s in specs]  # each exactly once, in line order
    by_id = {r["custom_id"]: r for r in rows}
    bad = {k: by_id[k] for k in ("bad-audio", "too-long", "bad-option")}
    assert all(r["status"] == "error" and r["error_stage"] == "input" for r in bad.values()), bad
    assert bad["bad-audio"]["error_param"] == "file" and bad["bad-audio"]["error"].startswith("file: ")
    assert (bad["too-long"]["error_param"], bad["too-long"]["error_code"]) == ("file", "max_audio_seconds")
    assert bad["bad-option"]["error_param"] == "temperature"
    assert sorted(p.name for p in (mixed["folder"] / "results").iterdir()) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]


def test_greedy_lines_equal_run_request_in_process(mixed, tiny_models):
    """Each ok line against the same request through run_request (the online data path) on local stages: the
    same token ids, text, usage counts, and the same audio up to the decoder's batching noise."""
    from actors.orchestration import run_request
    from actors.payloads import AudioChunk, Done
    from actors.requests import request_options
    from jobs.batch.lines import admit_clip, read_pcm, read_ref

    rows = {r["custom_id"]: r for r in mixed["rows"] if r["status"] == "ok"}
    assert set(rows) == {"tts", "asr", "asr-path", "chat-history", "chat-text"}
    with local_pipeline(tiny_models) as pipe:
        async def online(spec):
            history = []
            for entry in spec.get("history") or []:  # as the chat route: earlier clips encoded first
                entry = dict(entry)
                if entry.get("audios"):
                    entry["audios"] = [await pipe.clients.encode(admit_clip(read_ref(r, "a"), 60, "a"))
                                       for r in entry["audios"]]
                history.append(entry)
            audio = admit_clip(read_ref(spec["audio"], "a"), 60, "a") if spec.get("audio") else None
            options = request_options(**spec["options"], caps=pipe.caps)
            pcm, done = [], None
            async for event in run_request(pipe.clients, pipe.limits, spec["task"], text=spec.get("text"),
                                           audio=audio, history=history,
                                           system=spec.get("system"), voice=spec.get("voice"), caps=pipe.caps,
                                           **options.run_args()):
                if isinstance(event, AudioChunk):
                    pcm.append(event.pcm)
                elif isinstance(event, Done):
                    done = event
            assert done is not None
            return done, (np.concatenate(pcm) if pcm else None)

        for spec in mixed["specs"]:
            if spec["custom_id"] not in rows:
                continue
            row = rows[spec["custom_id"]]
            done, pcm = asyncio.run_coroutine_threadsafe(online(spec), pipe.bridge.loop).result()
            assert (row["token_ids"], row["text"], row["reason"]) == (list(done.token_ids), done.text, done.reason), \
                spec["custom_id"]
            usage = json.loads(row["usage"])
            assert usage["llm"]["prompt_tokens"] == done.usage["llm"]["prompt_tokens"]
            assert usage["encoder"].get("codes") == done.usage["encoder"].get("codes")
            assert row["audio_codes"] == len(done.audio_codes)
            if pcm is None:
                assert row["audio"] is None
                continue
            got = read_pcm(row["audio"])
            assert row["sample_rate"] == pipe.stages.decoder.sample_rate and len(got) == len(pcm)
            assert np.abs(got - pcm).max() <= 0.01, spec["custom_id"]
    assert rows["tts"]["audio"] and rows["chat-history"]["audio"]  # the set exercises spoken answers


@pytest.mark.slow  # three runs of the job, each starting its pools
def test_cancel_stops_at_a_block_boundary_and_a_rerun_resumes(ray_session, tiny_models, tmp_path, monkeypatch):
    """Cancel seen after the first block: that block stays, nothing else is written, a rerun while cancelled
    runs nothing; once the cancel is gone the rerun writes only the other blocks (the first one untouched)."""
    from jobs.batch import job
    from jobs.batch.openai_batch import (
        cancel_requested,
        read_results,
        request_cancel,
        run_openai_batch,
        write_specs,
    )

    specs = [{"custom_id": f"t{i}", "task": "asr", "audio": {"b64": B64[i % 2]}, "options": GREEDY} for i in range(9)]
    write_specs(tmp_path, specs)
    write = job.write_block

    def write_then_cancel(out, b, rows, schema):
        written = write(out, b, rows, schema)
        request_cancel(tmp_path)
        return written

    monkeypatch.setattr(job, "write_block", write_then_cancel)
    assert run_openai_batch(_config(tmp_path, tiny_models))["state"] == "cancelled"
    monkeypatch.setattr(job, "write_block", write)
    first = sorted((tmp_path / "results").glob("part-*.parquet"))
    assert len(first) == 1 and cancel_requested(tmp_path)
    stamp = first[0].stat().st_mtime_ns
    assert [r["custom_id"] for r in read_results(tmp_path)] == ["t0", "t1", "t2"]
    assert run_openai_batch(_config(tmp_path, tiny_models)) == {"state": "cancelled", "lines": 9, "completed": 3,
                                                                 "failed": 0}
    (tmp_path / "cancel").unlink()
    assert run_openai_batch(_config(tmp_path, tiny_models))["state"] == "completed"
    assert [r["custom_id"] for r in read_results(tmp_path)] == [s["custom_id"] for s in specs]
    assert first[0].stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_killed_driver_actor_resumes_without_running_a_written_line(ray_session, tiny_models, tmp_path):
    """The endpoint's driver (jobs.batch.driver) killed part-way as ray.kill does (SIGKILL); a new one writes only
    the blocks that were missing: each custom_id once, the blocks written before the kill untouched."""
    import ray

    from jobs.batch.driver import (
        NAMESPACE,
        driver_alive,
        driver_name,
        ended,
        start_driver,
    )
    from jobs.batch.openai_batch import read_results, write_specs

    specs = [{"custom_id": f"k{i:02d}", "task": "asr", "audio": {"b64": B64[i % 2]}, "options": GREEDY}
             for i in range(18)]
    write_specs(tmp_path, specs)
    results = tmp_path / "results"
    start_driver("b-kill", _config(tmp_path, tiny_models, block_size=2))
    deadline = time.monotonic() + 240
    while not list(results.glob("part-*.parquet")):
        assert time.monotonic() < deadline and ended(tmp_path) is None
        time.sleep(0.05)
    ray.kill(ray.get_actor(driver_name("b-kill"), namespace=NAMESPACE), no_restart=True)
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("part-*.parquet")}
    while driver_alive("b-kill"):
        time.sleep(0.1)
    assert ended(tmp_path) is None and len(before) < 9  # killed part-way
    start_driver("b-kill", _config(tmp_path, tiny_models, block_size=2))
    while ended(tmp_path) is None:
        assert time.monotonic() < deadline + 240
        time.sleep(0.2)
    assert ended(tmp_path)["state"] == "completed"
    assert [r["custom_id"] for r in read_results(tmp_path)] == [s["custom_id"] for s in specs]
    after = {p.name: p.stat().st_mtime_ns for p in results.glob("part-*.parquet")}
    assert len(after) == 9 and all(after[name] == stamp for name, stamp in before.items())


# ---------------------------------------------------------------------------------------------------------
# object storage


@pytest.mark.slow  # two runs of the job, each starting its pools
def test_spoken_answers_and_batch_tts_write_their_audio_to_s3(ray_session, tiny_models, tmp_path, s3):  # noqa: F811
    """An s3:// batch folder: specs, result blocks, progress and each spoken answer as one object (read_pcm opens
    it by its URL); `batch tts --out s3://...`: one FLAC object per text."""
    from jobs.batch.callables import DecodeOptions
    from jobs.batch.job import BatchConfig, read_results, run_batch
    from jobs.batch.openai_batch import (
        read_pcm,
        read_progress,
        run_openai_batch,
        write_specs,
    )
    from jobs.batch.openai_batch import read_results as read_lines

    folder = f"s3://{BUCKET}/batches/b1"
    specs = [{"custom_id": "say", "task": "tts", "text": "Hello there.", "options": SPEAK},
             {"custom_id": "hear", "task": "asr", "audio": {"b64": B64[0]}, "options": GREEDY}]
    write_specs(folder, specs)
    assert run_openai_batch(_config(folder, tiny_models))["state"] == "completed"
    assert read_progress(folder) == {"completed": 2, "failed": 0}
    rows = {r["custom_id"]: r for r in read_lines(folder)}
    assert rows["say"]["audio"].startswith(f"{folder}/audio/") and rows["hear"]["audio"] is None
    assert len(read_pcm(rows["say"]["audio"])) > 0 and rows["hear"]["text"]

    texts = tmp_path / "texts.txt"
    texts.write_text("Hello there.\nGood morning.\n")
    out = f"s3://{BUCKET}/tts"
    summary = run_batch(BatchConfig(task="tts", input=str(texts), out=out, models=str(tiny_models), progress=False,
                                    decode=DecodeOptions(max_new_tokens=40)))
    assert summary["ok"] == 2 and summary["state"] == "completed"
    for row in read_results(out).to_pylist():
        assert row["audio"].startswith(f"{out}/audio/") and row["audio"].endswith(".flac")
        data = s3.open_input_stream(row["audio"].removeprefix("s3://")).read()
        pcm, rate = soundfile.read(io.BytesIO(data))
        assert len(pcm) / rate == pytest.approx(row["audio_seconds"], abs=1e-3)
