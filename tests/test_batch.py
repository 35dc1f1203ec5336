"""Batch ASR / TTS on Ray Data (jobs.batch): inputs, windows, the stage classes without Ray, and whole jobs
on the tiny set: mini-speech with WER/CER, a damaged folder, TTS to FLAC, a killed driver resumed."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from driver_cancel import cancel_driver_when, cli
from driver_kill import kill_driver_when

from jobs.batch.inputs import enumerate_inputs, read_audio_bytes
from jobs.batch.segments import Segment, WindowConfig, plan_windows, stitch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini(shared_dir) -> Path:
    return shared_dir / "corpora" / "mini-speech" / "LibriSpeech" / "dev-clean-mini"


@pytest.fixture(scope="module")
def stage_configs(tiny_models):
    from actors.config import PipelineConfig

    return PipelineConfig.from_models_dir(tiny_models).with_resources(num_gpus=0)


def _config(tiny_models, task, input, out, **overrides):
    from jobs.batch.job import BatchConfig
    from jobs.batch.callables import DecodeOptions

    decode = overrides.pop("decode", DecodeOptions(max_new_tokens=24))
    return BatchConfig(task=task, input=str(input), out=str(out), models=str(tiny_models), decode=decode,
                       progress=False, **overrides)


# ---------------------------------------------------------------------------------------------------------
# inputs and windows (no models)


def test_folder_with_librispeech_transcripts(mini):
    items = enumerate_inputs(mini, "asr")
    assert len(items) == 40 and len({i.id for i in items}) == 40
    first = items[0]
    assert first.id == "1000-5000-0000" and first.text == "THE BIRCH CANOE SLID ON THE SMOOTH PLANKS"
    assert [i.id for i in items] == [i.id for i in enumerate_inputs(mini, "asr")]  # same order every time


def test_manifests_tar_and_texts(tmp_path, mini):
    files = sorted(mini.rglob("*.flac"))[:3]
    (tmp_path / "list.jsonl").write_text(
        "\n".join(json.dumps({"id": f"u{i}", "path": str(f), "text": "hello"}) for i, f in enumerate(files)) + "\n")
    items = enumerate_inputs(tmp_path / "list.jsonl", "asr")
    assert [(i.id, i.text) for i in items] == [("u0", "hello"), ("u1", "hello"), ("u2", "hello")]
    shutil.copy(files[0], tmp_path / "rel.flac")
    (tmp_path / "list.csv").write_text("id,path,text\na,rel.flac,\nb,,\n")  # relative path; a row without path
    rows = enumerate_inputs(tmp_path / "list.csv", "asr")
    assert rows[0].path == str(tmp_path / "rel.flac") and rows[0].text is None and rows[1].path == ""
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(files[0], arcname="k1.flac")
        (tmp_path / "k1.txt").write_text("REFERENCE ONE")
        tar.add(tmp_path / "k1.txt", arcname="k1.txt")
        tar.add(files[1], arcname="k2.flac")
    shard = enumerate_inputs(tmp_path / "shard.tar", "asr")
    assert [(i.id, i.text) for i in shard] == [("k1", "REFERENCE ONE"), ("k2", None)]
    assert read_audio_bytes(shard[0].path) == files[0].read_bytes()
    (tmp_path / "shards").mkdir()
    shutil.copy(tmp_path / "shard.tar", tmp_path / "shards" / "000.tar")
    assert [i.id for i in enumerate_inputs(tmp_path / "shards", "asr")] == ["k1", "k2"]
    (tmp_path / "texts.jsonl").write_text('{"id": "t1", "text": "Hi."}\n{"id": "t2", "text": ""}\n{"text": "x"}\n')
    texts = enumerate_inputs(tmp_path / "texts.jsonl", "tts")
    assert [(t.id, t.text) for t in texts] == [("t1", "Hi."), ("t2", ""), ("000003", "x")]
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(ValueError, match="'a' appears twice"):
        enumerate_inputs(tmp_path / "dup.jsonl", "tts")


def test_windows_cover_a_long_recording_with_overlap():
    config = WindowConfig(window_s=30.0, overlap_s=2.0)
    assert plan_windows(16000 * 12, 16000, config) == [(0, 16000 * 12)]
    spans = plan_windows(16000 * 185, 16000, config)
    assert spans[0] == (0, 16000 * 30) and spans[-1] == (16000 * 155, 16000 * 185)
    assert all(b - a == 16000 * 30 for a, b in spans)
    assert all(next_a < b for (_, b), (next_a, _) in zip(spans, spans[1:]))  # neighbours overlap, no gap


def test_stitch_keeps_overlapping_words_once():
    merged = stitch([Segment(0, 30, "the birch canoe slid on"), Segment(28, 58, "slid on the smooth planks")])
    assert merged == "the birch canoe slid on the smooth planks"
    # no shared words: each side keeps its half of the 2 s overlap (1 s at 1 word/s here)
    assert stitch([Segment(0, 10, "a b c d e f g h i j"), Segment(8, 18, "K L M N O P Q R S T")]) \
        == "a b c d e f g h i L M N O P Q R S T"


# ---------------------------------------------------------------------------------------------------------
# the stage classes on take_batch-style rows, without Ray


def test_batched_stages_equal_one_at_a_time(stage_configs, mini, tmp_path):
    from jobs.batch.callables import AudioDecoder, DecodeOptions, SpeechEncoder, SpeechLLM

    files = sorted(mini.rglob("*.flac"))[:5]
    rows = [{"id": f.stem, "path": str(f)} for f in files]
    encoder = SpeechEncoder(stage_configs.encoder)
    encoded = encoder(rows)
    assert encoded.column("status").to_pylist() == ["ok"] * 5
    assert encoded.to_pylist() and all(encoded.column("seg_codes").to_pylist())
    llm = SpeechLLM(stage_configs.llm, "asr", DecodeOptions(max_new_tokens=24))
    batched = llm(encoded).to_pylist()
    single = [llm(encoded.slice(i, 1)).to_pylist()[0] for i in range(5)]
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    assert all(r["text"] and r["tokens"] == 24 for r in batched)
    assert llm.stage.largest_batch > 1  # the batch's requests shared engine steps

    tts = SpeechLLM(stage_configs.llm, "tts", DecodeOptions(max_new_tokens=40))
    texts = [{"id": "a", "text": "Hello there."}, {"id": "b", "text": "The birch canoe."}]
    spoken = tts(texts)
    alone = [tts(texts[i : i + 1]).to_pylist()[0] for i in range(2)]
    assert spoken.column("chunks").to_pylist() == [r["chunks"] for r in alone]
    decoder = AudioDecoder(stage_configs.decoder, tmp_path / "audio")
    together = decoder(spoken).to_pylist()
    for row in together:
        pcm, rate = sf.read(row["audio"])
        assert row["status"] == "ok" and rate == 22050 and abs(len(pcm) / rate - row["audio_seconds"]) < 1e-6
    first = sf.read(together[0]["audio"])[0]
    one = AudioDecoder(stage_configs.decoder, tmp_path / "one")(spoken.slice(0, 1)).to_pylist()[0]
    # batched forwards round differently, and the ODE steps and HiFT's harmonics amplify it at a few samples
    diff = np.abs(sf.read(one["audio"])[0] - first)
    assert diff.max() < 1e-2 and diff.mean() < 1e-4 and (diff > 1e-3).mean() < 1e-3


def test_tar_member_encodes_like_its_file(stage_configs, mini, tmp_path):
    from jobs.batch.callables import SpeechEncoder

    file = sorted(mini.rglob("*.flac"))[0]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(file, arcname="k.flac")
    (member,) = enumerate_inputs(tmp_path / "s.tar", "asr")
    rows = SpeechEncoder(stage_configs.encoder)([{"id": "file", "path": str(file)}, {"id": "k", "path": member.path}])
    codes = rows.column("seg_codes").to_pylist()
    assert rows.column("status").to_pylist() == ["ok", "ok"] and codes[0] == codes[1] and codes[0][0]


def test_long_recording_is_windowed_and_stitched(stage_configs, mini, tmp_path):
    from jobs.batch.callables import DecodeOptions, SpeechEncoder, SpeechLLM

    long = tmp_path / "meeting.flac"
    _long_recording(mini, long, seconds=150)
    encoder = SpeechEncoder(stage_configs.encoder, WindowConfig(30.0, 2.0))
    row = encoder([{"id": "meeting", "path": str(long)}]).to_pylist()[0]
    assert row["status"] == "ok" and row["audio_seconds"] == pytest.approx(150.0, abs=0.01)
    segments = row["segments"]
    assert len(segments) == 6 and segments[0]["start"] == 0.0 and segments[-1]["end"] == pytest.approx(150.0)
    assert all(s["end"] - s["start"] == pytest.approx(30.0) for s in segments)
    assert [len(c) for c in row["seg_codes"]] == [375] * 6  # 12.5 codes per second of each window
    out = SpeechLLM(stage_configs.llm, "asr", DecodeOptions(max_new_tokens=16))(encoder([{"id": "m", "path": str(long)}]))
    row = out.to_pylist()[0]
    assert row["status"] == "ok" and all(s["text"] for s in row["segments"])
    assert row["text"] == stitch([Segment(**s) for s in row["segments"]]) and row["tokens"] == 6 * 16


# ---------------------------------------------------------------------------------------------------------
# whole jobs on Ray Data


def test_asr_mini_speech_report_and_noop_rerun(ray_session, tiny_models, mini, tmp_path):
    from jobs.batch.job import read_results, run_batch
    from actors.errors import InputError

    out = tmp_path / "asr"
    summary = run_batch(_config(tiny_models, "asr", mini, out, block_size=16))
    table = read_results(out)
    assert table.num_rows == 40 and len(set(table.column("id").to_pylist())) == 40
    assert summary["complete"] and summary["ok"] == 40 and sorted(os.listdir(out / "results")) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    rates = summary["error_rates"]
    assert rates["scored"] == 40 and rates["wer"] > 0 and rates["cer"] > 0  # random weights: garbage text
    report = (out / "report.md").read_text()
    assert "WER (40 rows with a reference)" in report and json.loads((out / "summary.json").read_text())["rows"] == 40
    assert summary["audio_hours"] * 3600 == pytest.approx(104.22, abs=0.05) and summary["rtfx"] > 0

    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    again = run_batch(_config(tiny_models, "asr", mini, out, block_size=16))
    assert again["this_run"]["inputs"] == 0 and again["rows"] == 40
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == before
    with pytest.raises(InputError, match="other settings"):
        run_batch(_config(tiny_models, "asr", mini, out, block_size=8))
    from jobs.run_folder import lock_run_folder

    held = lock_run_folder(out, "batch")
    with pytest.raises(InputError, match="another batch run"):
        run_batch(_config(tiny_models, "asr", mini, out, block_size=16))
    held.close()


def test_damaged_folder_gives_one_error_row_each(ray_session, tiny_models, mini, tmp_path):
    from jobs.batch.job import read_results, run_batch

    folder = tmp_path / "damaged"
    folder.mkdir()
    good = sorted(mini.rglob("*.flac"))[:2]
    shutil.copy(good[0], folder / "good1.flac")
    (folder / "sub").mkdir()
    shutil.copy(good[1], folder / "sub" / "good2.flac")
    sf.write(folder / "truncated.wav", np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    data = (folder / "truncated.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notaudio.flac").write_text("this is not audio\n")
    noisy = np.full(16000, 0.1, np.float32)
    noisy[100:200] = np.nan
    sf.write(folder / "nan.wav", noisy, 16000, subtype="FLOAT")
    _long_recording(mini, folder / "long.flac", seconds=100)

    summary = run_batch(_config(tiny_models, "asr", folder, tmp_path / "out", block_size=3, max_error_share=1.0))
    rows = {r["id"]: r for r in read_results(tmp_path / "out").to_pylist()}
    assert summary["rows"] == summary["inputs"] == 7 and len(rows) == 7
    assert {i for i, r in rows.items() if r["status"] == "ok"} == {"good1", "sub/good2", "long"}
    for name, words in (("truncated", "truncated"), ("empty", "empty"), ("notaudio", "cannot decode"),
                        ("nan", "NaN")):
        assert rows[name]["status"] == "error" and words in rows[name]["error"], rows[name]["error"]
    assert len(rows["long"]["segments"]) == 4 and rows["long"]["segments"][-1]["end"] == pytest.approx(100.0)
    assert "## Errors" in (tmp_path / "out" / "report.md").read_text()
    assert summary["complete"] and summary["transient_errors"] == 0  # bad inputs: not retried by a rerun

    from jobs.batch.job import TooManyErrors

    with pytest.raises(TooManyErrors, match="4 of 7 rows are errors") as err:  # default share 0.5: non-zero end
        run_batch(_config(tiny_models, "asr", folder, tmp_path / "out", block_size=3))
    assert err.value.summary["errors"] == 4 and err.value.summary["this_run"]["inputs"] == 0


def test_tts_from_texts_writes_readable_flac(ray_session, tiny_models, tmp_path):
    from jobs.batch.job import read_results, run_batch
    from jobs.batch.callables import DecodeOptions

    texts = tmp_path / "texts.jsonl"
    lines = [{"id": "a", "text": "The birch canoe slid on the smooth planks."}, {"id": "b", "text": "Hello."},
             {"id": "blank", "text": ""}, {"id": "c/d", "text": "Glue the sheet to the dark blue background."}]
    texts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "tts"
    summary = run_batch(_config(tiny_models, "tts", texts, out, decode=DecodeOptions(max_new_tokens=48)))
    rows = {r["id"]: r for r in read_results(out).to_pylist()}
    assert summary["rows"] == 4 and rows["blank"]["status"] == "error" and "text" in rows["blank"]["error"]
    for item_id in ("a", "b", "c/d"):
        row = rows[item_id]
        assert row["status"] == "ok" and Path(row["audio"]).parent == out / "audio"
        info = sf.info(row["audio"])
        assert info.format == "FLAC" and info.samplerate == 22050
        assert info.duration == pytest.approx(row["audio_seconds"], abs=1e-3) and row["audio_seconds"] > 0.5
    assert summary["audio_hours"] > 0 and not list((out / "audio").glob(".*tmp*"))


def test_killed_driver_resumes_exactly_once(ray_session, tiny_models, mini, tmp_path):
    """The driver (a subprocess on the test's Ray) is killed once about a third of the result files exist;
    the rerun processes only the rest; every id has one row, equal to an uninterrupted run's (greedy)."""
    from jobs.batch.job import read_results, run_batch

    files = sorted(mini.rglob("*.flac"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{k}-{f.stem}", "path": str(f)}) + "\n"
                                for k in range(3) for f in files))  # 120 inputs
    flags = dict(block_size=4, decode=_decode(48))
    out = tmp_path / "killed"
    address = ray_session.get_runtime_context().gcs_address
    argv = ["batch", "asr", "--input", str(manifest), "--out", str(out), "--models", str(tiny_models),
            "--address", address, "--block-size", "4", "--max-new-tokens", "48", "--encoder-rows", "4",
            "--llm-rows", "4", "--no-progress"]
    written = kill_driver_when(argv, lambda: len(list((out / "results").glob("part-*.parquet"))), at=10,
                               timeout_s=240)
    assert 10 <= written < 30, f"{written} of 30 blocks written when killed"

    resumed = run_batch(_config(tiny_models, "asr", manifest, out, **flags))
    assert resumed["this_run"]["blocks"] == 30 - written
    table = read_results(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120 and resumed["complete"] and not resumed["repeated_ids"]

    whole = run_batch(_config(tiny_models, "asr", manifest, tmp_path / "whole", **flags))
    assert whole["rows"] == 120
    expect = {r["id"]: r["text"] for r in read_results(tmp_path / "whole").to_pylist()}
    assert {r["id"]: r["text"] for r in table.to_pylist()} == expect


@pytest.mark.slow
def test_cancel_from_another_shell_stops_at_a_block_boundary_and_a_rerun_resumes(ray_session, tiny_models, mini,
                                                                                  tmp_path):
    """`vita-audio batch cancel --out DIR` (another process) once 2 of 30 result files exist: the running
    `vita-audio batch asr` stops at its next block boundary and exits 3, every file it wrote whole; the same
    command rerun resumes with the other blocks only: one row per input. A folder without a run is refused."""
    from jobs.batch.job import read_results
    from jobs.storage import read_metadata

    files = sorted(mini.rglob("*.flac"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{k}-{f.stem}", "path": str(f)}) + "\n"
                                for k in range(3) for f in files))  # 120 inputs, 30 blocks
    out = tmp_path / "cancelled"
    argv = ["batch", "asr", "--input", str(manifest), "--out", str(out), "--models", str(tiny_models), "--address",
            ray_session.get_runtime_context().gcs_address, "--block-size", "4", "--max-new-tokens", "48",
            "--encoder-rows", "4", "--llm-rows", "4", "--no-progress", "--json"]
    refused = cli(["batch", "cancel", "--out", str(tmp_path / "nothing")])
    assert refused.returncode == 2 and "no batch run there" in refused.stderr

    parts = lambda: sorted((out / "results").glob("part-*.parquet"))  # noqa: E731
    cancel, job = cancel_driver_when(argv, str(out), lambda: len(parts()), at=2, timeout_s=240)
    assert cancel.returncode == 0 and "stop after its current block" in cancel.stderr, cancel.stderr
    assert job.returncode == 3, job.stderr[-2000:]
    assert "cancelled: stopped at a block boundary" in job.stderr and "rerun the same command to resume" in job.stderr
    stopped = json.loads(job.stdout.strip().splitlines()[-1])
    written = parts()
    assert stopped["state"] == "cancelled" and 2 <= len(written) < 30, len(written)
    assert [read_metadata(p).num_rows for p in written] == [4] * len(written)  # whole blocks only
    assert stopped["rows"] == 4 * len(written)

    rerun = cli(argv)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert resumed["state"] == "completed" and resumed["this_run"]["blocks"] == 30 - len(written)
    ids = read_results(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120 and resumed["complete"]


# ---------------------------------------------------------------------------------------------------------
# helpers


def _decode(max_new_tokens: int):
    from jobs.batch.callables import DecodeOptions

    return DecodeOptions(max_new_tokens=max_new_tokens)


@pytest.mark.slow
def test_one_hour_recording_transcribes_through_the_ray_job(ray_session, tiny_models, mini, tmp_path):
    from jobs.batch.job import read_results, run_batch
    from jobs.batch.callables import DecodeOptions

    folder = tmp_path / "podcast"
    folder.mkdir()
    _long_recording(mini, folder / "hour.flac", seconds=3600)
    summary = run_batch(_config(tiny_models, "asr", folder, tmp_path / "out", decode=DecodeOptions(max_new_tokens=4)))
    (row,) = read_results(tmp_path / "out").to_pylist()
    assert summary["ok"] == 1 and row["status"] == "ok"
    assert row["audio_seconds"] == pytest.approx(3600.0, abs=0.01)
    segments = row["segments"]
    assert len(segments) == 129 and segments[0]["start"] == 0.0 and segments[-1]["end"] == pytest.approx(3600.0)
    assert all(b["start"] < a["end"] for a, b in zip(segments, segments[1:]))  # neighbours overlap
    assert all(s["text"] for s in segments) and row["text"]


def _long_recording(mini: Path, path: Path, seconds: float) -> None:
    """`seconds` of real speech: the mini-speech utterances one after another, repeated."""
    clips = [sf.read(f, dtype="float32")[0] for f in sorted(mini.rglob("*.flac"))]
    pcm = np.concatenate(clips * int(np.ceil(seconds / (sum(map(len, clips)) / 16000))))
    sf.write(path, pcm[: int(seconds * 16000)], 16000)


def test_cli_module_fits_the_registry(monkeypatch, tmp_path, capsys):
    """`vita-audio batch` / `bench batch` as the lead registers them: argument and input errors are one line,
    exit 2, before Ray starts."""
    import cli.main as cli

    monkeypatch.setitem(cli.COMMANDS, "batch", ("cli.batch", "batch ASR / TTS on Ray Data"))
    monkeypatch.setitem(cli.BENCHMARKS, "batch", "benchmarks.batch")
    assert cli.main(["batch", "asr", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--json"]) == 2
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "no such file or folder" in last["error"] and last["command"] == "batch"
    assert cli.main(["batch", "tts", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--overlap", "20"]) == 2
    assert "overlap_s" in capsys.readouterr().err
    assert cli.main(["bench", "batch", "--pool-sizes", "0", "--out", str(tmp_path / "b")]) == 2


# ---------------------------------------------------------------------------------------------------------
# the run folder: transient errors retried, locations, a failed start


def test_transient_error_rows_and_the_merge_of_a_retried_block(tmp_path):
    from jobs.batch.job import write_block
    from jobs.batch.results import block_path, read_results, to_retry, transient

    crash = {"status": "error", "error": "llm: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert transient(crash) and transient({"status": "error", "error": "decoder: RuntimeError: stage crashed"})
    for permanent in ("input: the input has no text", "encoder: no audio codes for 0.01 s of audio (too short?)",
                      "llm: ValueError: prompt of 9000 tokens is longer than the context", "input: out of memory"):
        assert not transient({"status": "error", "error": permanent}), permanent
        assert to_retry({"status": "error", "error": permanent}, retry_errors=True)
    assert not to_retry({"status": "ok", "error": ""}, retry_errors=True)

    (tmp_path / "results").mkdir()
    write_block(tmp_path, 0, [{"id": i, "status": "ok", "text": i} for i in ("a", "b", "c")])
    write_block(tmp_path, 0, [{"id": "b", "status": "ok", "text": "B"}])  # a retry rewrites its own row only
    rows = read_results(tmp_path).to_pylist()
    assert [(r["id"], r["text"]) for r in rows] == [("a", "a"), ("b", "B"), ("c", "c")]
    assert block_path(tmp_path, 0).name == "part-000000.parquet" and not list((tmp_path / "results").glob(".*"))


def test_locations_with_an_unknown_scheme_are_refused_by_name(tmp_path, monkeypatch, mini):
    """Object stores are locations (tests/test_object_store.py); a scheme no filesystem knows is refused by name
    before anything starts, and never becomes a local folder named `nosuch:`."""
    from actors.errors import InputError
    from jobs.prepare.job import PrepareConfig, SourceSpec

    monkeypatch.chdir(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    for kwargs, words in ((dict(input=str(texts), out="nosuch://bucket/run"), "--out nosuch://bucket/run: no filesystem for nosuch://"),
                          (dict(input="nosuch://bucket/texts.txt", out="run"), "--input nosuch://bucket/texts.txt: no filesystem")):
        with pytest.raises(InputError, match=words):
            _config(Path("unused"), "tts", kwargs.pop("input"), kwargs.pop("out"))
    with pytest.raises(InputError, match="--out nosuch://b/x: no filesystem for nosuch://"):
        PrepareConfig(sources=[f"librispeech:{mini}"], out="nosuch://b/x")
    with pytest.raises(InputError, match="the librispeech recipe reads a local folder"):
        SourceSpec.parse("librispeech:s3://corpus")
    assert _config(Path("unused"), "tts", f"file://{texts}", f"file://{tmp_path}/run").out == f"file://{tmp_path}/run"
    assert _config(Path("unused"), "tts", str(texts), "s3://bucket/run").out == "s3://bucket/run"  # audio as objects
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.txt"]  # no folder named nosuch: or s3:


def test_a_failed_start_leaves_the_folder_as_it_found_it(tiny_models, tmp_path, monkeypatch):
    """Ray cannot start: no plan.json (which would refuse the next run with other settings), no folders."""
    import actors.ray_runtime
    from actors.errors import InputError
    from jobs.batch.job import run_batch

    def no_ray(*args, **kwargs):
        raise InputError("--address 127.0.0.1:1: no Ray cluster answering there")

    monkeypatch.setattr(actors.ray_runtime, "start_ray", no_ray)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\nworld\n")
    with pytest.raises(InputError, match="no Ray cluster"):
        run_batch(_config(tiny_models, "tts", texts, tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="no Ray cluster"):
        run_batch(_config(tiny_models, "tts", texts, kept, block_size=1))
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="no Ray cluster"):  # not "holds a run with other settings"
        run_batch(_config(tiny_models, "tts", texts, kept, block_size=2))


def test_tts_rows_a_stage_crashed_on_are_retried_by_a_rerun(ray_session, tiny_models, tmp_path):
    """A row whose stage ran out of memory leaves the job incomplete; the rerun redoes that row alone (its
    block file is rewritten with the other rows as they were); `retry_errors` redoes the bad-input rows too;
    a rerun with other settings is refused naming the setting, `restart` starts over."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.errors import InputError
    from jobs.batch.job import run_batch
    from jobs.batch.results import RESULT_SCHEMA, block_path, read_results
    from jobs.batch.callables import DecodeOptions

    texts = tmp_path / "texts.jsonl"
    lines = [{"id": "a", "text": "Hello there."}, {"id": "blank", "text": ""}, {"id": "b", "text": "Good morning."}]
    texts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "tts"
    decode = DecodeOptions(max_new_tokens=32)
    first = run_batch(_config(tiny_models, "tts", texts, out, decode=decode))
    assert first["complete"] and first["errors"] == 1
    before = {r["id"]: r for r in read_results(out).to_pylist()}
    assert before["a"]["status"] == before["b"]["status"] == "ok"

    rows = [dict(r, status="error", error="llm: OutOfMemoryError: CUDA out of memory", audio=None)
            if r["id"] == "b" else r for r in read_results(out).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), block_path(out, 0))  # as a crash leaves it
    again = run_batch(_config(tiny_models, "tts", texts, out, decode=decode))
    after = {r["id"]: r for r in read_results(out).to_pylist()}
    assert again["this_run"]["inputs"] == 1 and again["complete"] and again["errors"] == 1
    assert after["b"]["status"] == "ok" and after["b"]["audio"] == before["b"]["audio"]
    assert after["a"] == before["a"] and after["blank"] == before["blank"]

    noop = run_batch(_config(tiny_models, "tts", texts, out, decode=decode))
    assert noop["this_run"]["inputs"] == 0
    retried = run_batch(_config(tiny_models, "tts", texts, out, decode=decode, retry_errors=True))
    assert retried["this_run"]["inputs"] == 1 and retried["errors"] == 1  # the blank text, tried again

    with pytest.raises(InputError, match="holds a batch run with other settings: decode.max_new_tokens was 32, now 16"):
        run_batch(_config(tiny_models, "tts", texts, out, decode=DecodeOptions(max_new_tokens=16)))
    fresh = run_batch(_config(tiny_models, "tts", texts, out, decode=DecodeOptions(max_new_tokens=16), restart=True))
    assert fresh["this_run"]["inputs"] == 3 and fresh["runs"] == 1


def test_tts_rows_fail_alone_one_over_long_text_among_good_ones(stage_configs, tmp_path):
    """Issue #24: one over-long text among good ones (on the take_batch path the Ray job maps): the good rows
    are ok with their audio, the over-long one is an error row; the good rows equal a batch without it."""
    from jobs.batch.callables import AudioDecoder, DecodeOptions, SpeechLLM

    llm = SpeechLLM(stage_configs.llm, "tts", DecodeOptions(max_new_tokens=32))
    decoder = AudioDecoder(stage_configs.decoder, tmp_path / "audio")
    good = [{"id": "a", "text": "Hello there."}, {"id": "b", "text": "Good morning."}]
    rows = [good[0], {"id": "long", "text": "a long text " * 20000}, good[1]]
    out = {r["id"]: r for r in decoder(llm(rows)).to_pylist()}
    assert out["a"]["status"] == out["b"]["status"] == "ok", (out["a"]["error"], out["b"]["error"])
    assert Path(out["a"]["audio"]).is_file() and Path(out["b"]["audio"]).is_file()
    assert out["long"]["status"] == "error" and out["long"]["error"].split(":")[0] in ("input", "llm")
    alone = {r["id"]: r for r in llm(good).to_pylist()}
    assert [out[i]["tokens"] for i in "ab"] == [alone[i]["tokens"] for i in "ab"]


def test_a_failed_engine_step_fails_only_the_request_that_cannot_run(stage_configs, tmp_path):
    """An out-of-memory in an engine step drops every request of the step; the batch runs each of them again
    alone, so the good rows are ok (as in a batch without the bad one) and only the bad one is an error row."""
    import torch

    from jobs.batch.callables import DecodeOptions, SpeechLLM

    llm = SpeechLLM(stage_configs.llm, "tts", DecodeOptions(max_new_tokens=32))
    engine = llm.stage.engine
    step = engine.step

    def out_of_memory_with_the_bad_request():
        if "bad#0" in engine.running_ids():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return step()

    good = [{"id": "a", "text": "Hello there."}, {"id": "b", "text": "Good morning."}]
    alone = {r["id"]: r for r in llm(good).to_pylist()}
    engine.step = out_of_memory_with_the_bad_request
    out = {r["id"]: r for r in llm([good[0], {"id": "bad", "text": "How are you?"}, good[1]]).to_pylist()}
    assert out["a"]["status"] == out["b"]["status"] == "ok", (out["a"]["error"], out["b"]["error"])
    assert [out[i]["tokens"] for i in "ab"] == [alone[i]["tokens"] for i in "ab"]
    assert out["bad"]["status"] == "error" and "OutOfMemoryError" in out["bad"]["error"]
    assert out["bad"]["error"].startswith("llm: EngineStepFailed")
