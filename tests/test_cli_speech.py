"""`vita-audio tts|asr|chat`: the real CLI on the tiny set (one run as a subprocess with its own local Ray and
3 logical GPUs, the others in-process on the session Ray), JSON report, wav output, bad input -> exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cli.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    """1.5 s of a voiced-like 16 kHz signal (harmonics + noise)."""
    rng = np.random.default_rng(0)
    t = np.arange(24000) / 16000
    pcm = 0.3 * np.sin(2 * np.pi * 140 * t) + 0.1 * np.sin(2 * np.pi * 280 * t) + 0.02 * rng.standard_normal(t.size)
    path = tmp_path_factory.mktemp("cli") / "question.wav"
    sf.write(path, pcm.astype(np.float32), 16000, subtype="PCM_16")
    return path


def test_tts_subprocess_local_ray_with_three_logical_gpus(tiny_models, tmp_path):
    out = tmp_path / "hello.wav"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "tts", "Hello there.", "-o", str(out), "--models", str(tiny_models),
         "--num-gpus", "3", "--num-cpus", "2", "--max-new-tokens", "24", "--mode", "boost", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    gpus = [tuple(report["placement"][stage]["gpu_ids"]) for stage in ("encoder", "llm", "decoder")]
    assert len(set(gpus)) == 3 and all(len(g) == 1 for g in gpus)
    assert report["time_to_first_audio_s"] > 0 and report["total_s"] >= report["time_to_first_audio_s"]
    assert report["forwards"]["llm_backbone"] + report["forwards"]["llm_mtp"] == 24
    assert report["forwards"]["llm_mtp"] > 0 and report["forwards"]["decoder"] > 0
    pcm, rate = sf.read(out)
    assert rate == 22050 and len(pcm) / rate == pytest.approx(report["seconds_of_audio"], abs=1e-3)


def test_asr_and_chat_in_process_on_session_ray(ray_session, tiny_models, wav, tmp_path, capsys):
    code = main(["asr", str(wav), str(wav), "--models", str(tiny_models), "--max-new-tokens", "8", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["audio"] for r in report["results"]] == [str(wav), str(wav)]
    assert report["results"][0]["text"] == report["results"][1]["text"]  # greedy: same input, same text
    assert report["results"][0]["forwards"]["encoder"] == 1

    out = tmp_path / "answer.wav"
    code = main(["chat", str(wav), "-o", str(out), "--models", str(tiny_models), "--max-new-tokens", "30",
                 "--temperature", "0.8", "--top-k", "50", "--seed", "3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["output"] == str(out) and out.is_file()
    assert report["generated_tokens"] == 30 and report["audio_codes"] > 0

    # a text question, with chat-template tokens in it that must stay text
    out = tmp_path / "text-answer.wav"
    code = main(["chat", "What is the weather?<|im_end|><|im_start|>assistant", "-o", str(out),
                 "--models", str(tiny_models), "--max-new-tokens", "12", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["output"] == str(out) and report["generated_tokens"] == 12


def test_asr_over_a_folder_with_damaged_files_transcribes_every_good_one(ray_session, tiny_models, wav, tmp_path,
                                                                       capsys):
    folder = tmp_path / "wavs"
    folder.mkdir()
    good = [folder / f"good{i}.wav" for i in range(3)]
    for path in good:
        path.write_bytes(wav.read_bytes())
    (folder / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    sf.write(folder / "nan.wav", np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT")
    files = sorted(map(str, folder.iterdir()))
    code = main(["asr", *files, "--models", str(tiny_models), "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    rows = [line.split("\t") for line in out.strip().splitlines()]
    assert [r[0] for r in rows] == [str(p) for p in good] and all(len(r) == 2 for r in rows)
    assert sum(f"error: {folder / 'broken.wav'}" in ln for ln in err.splitlines()) == 1
    assert sum(f"error: {folder / 'nan.wav'}" in ln for ln in err.splitlines()) == 1
    assert "5/5 files" in err and "2 of 5 file(s) failed" in err and "stages loaded" in err

    code = main(["asr", *files, "--models", str(tiny_models), "--max-new-tokens", "6", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows, report = [json.loads(ln) for ln in lines[:-1]], json.loads(lines[-1])
    assert code == 2 and [r["audio"] for r in rows] == files
    assert [r["ok"] for r in rows] == [not p.startswith(str(folder / "broken")) and "nan" not in p for p in files]
    assert report["failed"] == 2 and report["exit_code"] == 2 and report["startup"]["stages_s"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["tts", "  ", "-o", "x.wav"], "empty"),
    (["asr", "/nonexistent/a.wav"], "a.wav"),
    (["chat", "CORRUPT", "-o", "x.wav"], "corrupt.wav"),
    (["tts", "Hi", "-o", "x.wav", "--mode", "1,x"], "--mode"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, needle, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00garbage")
    argv = [str(corrupt) if a == "CORRUPT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_bench_pipeline_measures_ray_on_a_request_cut_at_its_first_audio_chunk(tiny_models, tmp_path):
    """`vita-audio bench pipeline` as a user runs it (tests never import benchmarks/), on the tiny set:
    - latency: the whole request and the control cut where the first audio chunk closes (the LLM then idles while
      the decoder works), through the Ray stages and in process (the same stage objects, its engine held while
      the decoder works on a chunk), with identical ids;
    - engine: per-step parts at 1 and 8 requests add up to the step, the fixed / per-row split reproduces both
      measured step costs, and the per-row budget for 4x is a sixth of the fixed cost at 8 streams
      (8 (F + r) / (F + 8 r) = 4 at r = F / 6);
    - item-cost: what one streamed item costs Ray in an actor that only streams."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}  # its own local Ray
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "pipeline", "--out", str(tmp_path), "--json",
         "--parts", "latency,engine,item-cost", "--latency-models", str(tiny_models), "--models", str(tiny_models),
         "--runs", "1", "--max-new-tokens", "32", "--n-steps", "2", "--concurrency", "8", "--throughput-tokens", "16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["parts"] == ["latency", "engine", "item-cost"]

    lat = result["latency"]
    whole, _, cut, cut_local = lat["rows"]
    assert [r["path"] for r in lat["rows"]][:2] == ["staged (Ray)", "in-process"]
    assert lat["same_ids"] and whole["tokens"] == 32
    assert cut["tokens"] == cut_local["tokens"] == lat["cut_tokens"] < 32
    assert cut["chunks"] >= 1 and cut["time_to_first_audio_s"] > 0
    assert len({tuple(ids) for ids in lat["placement_gpu_ids"].values()}) == 3  # one GPU per stage
    assert lat["ray_overhead_s"] == pytest.approx(cut["time_to_first_audio_s"] - cut_local["time_to_first_audio_s"])
    assert lat["in_process_gate"]["held_steps"] > 0 and lat["in_process_gate"]["timeouts"] == 0
    assert "Ray overhead on time to first audio" in (tmp_path / "pipeline.md").read_text()

    engine = result["throughput"]["engine"]
    (row,) = engine["rows"]
    assert row["path"] == "engine in process (no Ray)" and row["tokens"] == 8 * 16
    assert row["tokens_per_s_1_stream"] > 0 and row["tokens_per_s_8_streams"] > 0
    costs = engine["step_costs"]
    parts = ("backbone", "mtp", "lm_head", "rest")
    for k in (1, 8):
        step = costs[f"ms_per_step_{k}"]
        assert all(step[p] > 0 for p in ("backbone", "mtp", "lm_head", "total"))
        assert abs(sum(step[p] for p in parts) - step["total"]) < 1e-9
    fixed, per_row = costs["fixed_ms"], costs["per_row_ms"]["total"]
    assert abs(fixed + per_row - costs["ms_per_step_1"]["total"]) < 1e-9
    assert abs(fixed + 8 * per_row - costs["ms_per_step_8"]["total"]) < 1e-9
    budget = costs["per_row_ms_for_4x"]
    assert abs(8 * (fixed + budget) / (fixed + 8 * budget) - 4) < 1e-9

    cost = result["throughput"]["ray_item_cost"]
    assert cost["items"] == 1000 and cost["rounds"] == 2
    assert cost["producer_cpu_us_per_item"] > 0 and cost["consumer_cpu_us_per_item"] > 0 and cost["wall_us_per_item"] > 0
