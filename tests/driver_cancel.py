"""Test helper: run a batch job's driver as a subprocess and cancel it from another one
(`vita-audio batch cancel --out OUT`) once enough of its output exists."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def cli(argv: list[str], timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """`vita-audio ARGV` in another process (text stdout and stderr captured)."""
    return subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=timeout_s)


def cancel_driver_when(argv: list[str], out: str, progress: Callable[[], int], at: int,
                       timeout_s: float = 300.0) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run `vita-audio ARGV`; once `progress()` reaches `at`, run `vita-audio batch cancel --out OUT` and wait for
    the driver to end. Returns (the cancel's process, the driver's); fails the test if the driver ends first or
    makes no progress."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # files: never a full pipe
        driver = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=REPO,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=stdout, stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + timeout_s
            while progress() < at:
                if driver.poll() is not None:
                    stderr.seek(0)
                    raise AssertionError(f"the driver ended before it was cancelled: {stderr.read()[-2000:]}")
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.02)
            cancel = cli(["batch", "cancel", "--out", out])
            driver.wait(timeout=timeout_s)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
        stdout.seek(0)
        stderr.seek(0)
        return cancel, subprocess.CompletedProcess(driver.args, driver.returncode, stdout.read(), stderr.read())
