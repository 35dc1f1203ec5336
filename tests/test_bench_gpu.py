"""`vita-audio bench gpu`: the one-command GPU benchmark's code path, run here on CPU (`--device cpu --size bench
--quick`) through the CLI in a subprocess (tests never import benchmarks), and its one-line refusal without CUDA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _cli(*argv: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "bench", "gpu", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for machines without")
def test_refuses_without_cuda_in_one_line(tmp_path):
    done = _cli("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--device cpu --size bench" in lines[0], done.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was built or written


def test_bad_flags_are_refused(tmp_path):
    for argv in (["--modes", "warp"], ["--streams", "0"], ["--device", "tpu"]):
        done = _cli("--device", "cpu", *argv, "--out", str(tmp_path), timeout=120) if argv[0] != "--device" \
            else _cli(*argv, "--out", str(tmp_path), timeout=120)
        assert done.returncode == 2, (argv, done.stderr)


def test_cpu_dry_run_of_the_gpu_benchmark(tmp_path):
    done = _cli("--device", "cpu", "--size", "bench", "--quick", "--max-new-tokens", "8", "--audio-seconds", "1",
                "--out", str(tmp_path), "--json", timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {p.name for p in tmp_path.iterdir()} >= {"gpu.json", "gpu.md", "gpu.png"}
    assert result["errors"] == [], result["errors"]
    sections = result["sections"]
    modes = {r["mode"]: r for r in sections["modes"]}
    assert set(modes) == {"vanilla", "balance", "boost", "turbo"}
    assert modes["vanilla"]["x_vanilla"] == 1.0 and modes["vanilla"]["mtp_forwards"] == 0
    assert modes["turbo"]["backbone_forwards"] < modes["vanilla"]["backbone_forwards"]
    steps = {r["step"] for r in sections["roofline"]}
    assert {"backbone step (1 token)", "MCTP module step"} <= steps
    assert [r["streams"] for r in sections["batched"]] == [1, 8, 32]
    assert all(r["status"] == "ok" for r in sections["batched"])
    rtf = {(r["stage"], r["case"]) for r in sections["rtf"]}
    assert ("encoder", "1 clip") in rtf and ("decoder", "streamed, 25-code chunks") in rtf
    ttfa = sections["ttfa"][0]
    assert ttfa["ttfa_ms"] >= ttfa["encoder_ms"] + ttfa["llm_first_chunk_ms"] and ttfa["first_pcm_samples"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "Tokens/s per MCTP mode" in md and "Time to first audio" in md
    print("\n" + md)


def test_cpu_dry_run_builds_in_bf16(tmp_path):
    """The GPU path builds every model with bfloat16 as the default dtype on the device: the same on CPU (tiny)."""
    done = _cli("--device", "cpu", "--size", "tiny", "--dtype", "bfloat16", "--quick", "--max-new-tokens", "8",
                "--audio-seconds", "1", "--streams", "1,8", "--out", str(tmp_path), "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "bfloat16" and result["errors"] == [], result["errors"]
    assert result["sections"]["ttfa"][0]["first_pcm_samples"] > 0
