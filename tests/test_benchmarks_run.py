"""The benchmarks run as a user runs them: `vita-audio bench NAME` in a subprocess on tiny inputs, checked by the
report files and fields they promise. Tests never import `benchmarks/` (tests/test_structure.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench(name: str, out: Path, *args: str, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", name, "--out", str(out), *args, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_decode_counts_forwards_and_keeps_exact_lossless(tmp_path):
    result = bench("decode", tmp_path, "--runs", "1", "--max-new-tokens", "24",
                   "--modes", "vanilla,boost,exact")
    rows = {(r["model"], r["mode"]): r for r in result["rows"]}
    assert rows[("random", "vanilla")]["backbone_fwd"] == 24 and rows[("random", "boost")]["backbone_fwd"] < 24
    assert rows[("random", "exact")]["same_ids_as_vanilla"] and not rows[("random", "boost")]["same_ids_as_vanilla"]
    assert rows[("drafting", "exact")]["same_ids_as_vanilla"] and rows[("drafting", "exact")]["backbone_fwd"] < 24
    assert all(r["predicted_s"] > 0 and r["of_ceiling"] > 0 for r in result["rows"])
    assert {"prefill", "backbone_1tok", "mtp_first_use"} <= {s["step"] for s in result["step_costs_ms"]}


def test_bench_decoder_on_tiny_lengths(tmp_path):
    result = bench("decoder", tmp_path, "--sizes", "tiny", "--seconds", "1,2", "--steps", "1")
    assert "incremental_2s_over_1s" in result["ratios"]["tiny"]
    entry = json.loads((tmp_path / "decoder.json").read_text())["sizes"]["tiny"]["per_length"]["2"]
    assert entry["incremental"]["samples"] == entry["offline"]["samples"] == entry["vita_prefix"]["samples"]


def test_bench_encoder_batched_equals_one_by_one(shared_dir, tmp_path):
    corpus = shared_dir / "corpora" / "mini-speech" / "LibriSpeech"
    result = bench("encoder", tmp_path, "--sizes", "tiny", "--clips", "3", "--repeats", "1", "--corpus", str(corpus))
    assert result["sizes"]["tiny"]["batched_equals_one_by_one"] is True
    assert {row["mode"] for row in result["rows"]} == {"one_by_one", "batched"}
    assert "batched_vs_one_by_one_cpu" in (tmp_path / "encoder.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["encoder", "--sizes", "huge"], "--sizes"),
    (["serve", "--concurrency", "0,4"], "--concurrency"),
    (["serve", "--serve-mode", "throughput", "--address", "auto"], "read when Ray's processes start"),
    (["soak", "--minutes", "0"], "--minutes"),
    (["serve", "--ingress-clients", "-1"], "--ingress-clients"),
])
def test_bench_refuses_bad_flags_in_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", *args, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_bench_soak_kills_replicas_and_reports_errors_rss_and_ttfa(tmp_path):
    """A short soak: mixed load, an LLM and an ingress replica killed; the report has per-minute rows, the kills,
    the RSS of every Serve process and the three criteria, and no server error outside the kills' in-flight
    requests (a killed replica's own requests are the only ones allowed to fail)."""
    # 20 s of load: the kills at 8 s and 12 s, the RSS sampled at 0, 10 and 20 s (every 10 s: a longer run that
    # stops between two samples still waits for the next); the two clients go through all six kinds
    result = bench("soak", tmp_path, "--minutes", "0.33", "--clients", "2", timeout=900)
    assert [k["deployment"] for k in result["kills"]] == ["vita-llm", "vita-ingress"]
    assert result["per_minute"][0]["requests"] > 0 and result["requests"] == sum(r["requests"] for r in result["per_kind"])
    assert {r["kind"] for r in result["per_kind"]} == {"speech", "speech_stream", "transcription", "chat", "realtime",
                                                       "voice"}
    assert result["errors"]["unexplained"] == [], result["errors"]["unexplained"]
    processes = {p["process"].rsplit(":", 1)[-1] for p in result["rss"]["processes"]}
    assert {"ServeController", "ProxyActor", "vita-encoder", "vita-llm", "vita-decoder", "vita-ingress"} <= processes
    assert set(result["criteria"]) == {"no_5xx_beyond_killed_in_flight", "rss_within_10pct",
                                       "p99_ttfa_last_le_1.2x_first"}
    assert (tmp_path / "soak.png").is_file() and "## RSS per Serve process" in (tmp_path / "soak.md").read_text()
