"""`vita-audio bench realtime` as a user runs it: `--quick` (1 and 2 hands-free sessions through the openai SDK
client, one turn and one barge-in each) in a subprocess (tests never import benchmarks): the report's numbers
and files."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "bench", "realtime", "--out", str(out), *args],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_quick_run_writes_a_report_of_numbers(tmp_path):
    done = _bench(tmp_path, "--quick", "--json", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"realtime.json", "realtime.md", "realtime.png"}
    assert (tmp_path / "realtime.png").stat().st_size > 0
    result = json.loads((tmp_path / "realtime.json").read_text())
    assert [row["sessions"] for row in result["levels"]] == [1, 2]
    for row in result["levels"]:
        assert row["turns"] == row["sessions"] and row["barge_ins"] == row["sessions"]
        for key in ("latency_minus_window_p50_s", "latency_minus_window_p99_s", "server_view_minus_window_p50_s",
                    "first_turn_latency_minus_window_p50_s"):
            assert _number(row[key]), (key, row)
        assert row["deltas_after_cancel"] == 0  # no audio of a cancelled answer after its response.done
    for key in ("latency_p50_s", "in_process_ttfa_p50_s", "silence_window_s", "bound_s", "ratio_minus_window"):
        assert _number(result["target"][key]), key
    assert isinstance(result["target"]["met"], bool)
    for threads in ("one_thread", "default_threads"):
        assert _number(result["vad"][threads]["cpu_ms_per_frame"]) and result["vad"][threads]["frames"] > 0
    assert all(_number(x["ttfa_s"]) and x["ttfa_s"] > 0 for x in result["in_process"])
    for turn in result["turns"]:
        assert turn["answer_audio_s"] > 0 and turn["transcriptions"] >= 1
        # the server's end of speech (its audio clock) lies within a silence window of the recording's own
        assert abs(turn["audio_end_ms"] - turn["voiced_end_ms"]) <= result["protocol"]["server_vad"][
            "silence_duration_ms"]
    cancelled = [b for b in result["barge_in"] if b["status"] == "cancelled"]
    assert all(b["reason"] == "turn_detected" and _number(b["cancel_ack_s"]) for b in cancelled)
    md = (tmp_path / "realtime.md").read_text()
    assert "Target at 1 session" in md and "Load average" in md

