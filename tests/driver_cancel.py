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


# the canceller's process, started before the job: the CLI and what its cancel imports are loaded when the test
# gives the word (a line on stdin), so the cancel lands within moments of the job reaching the point asked for
WAITING_CANCEL = ("import sys\n"
                  "from cli.main import main\n"
                  "import jobs.batch.job  # noqa: F401 - what `batch cancel` imports, loaded before the word\n"
                  "sys.stdin.readline()\n"
                  "sys.exit(main(sys.argv[1:]))\n")


def cancel_driver_when(argv: list[str], out: str, progress: Callable[[], int], at: int,
                       timeout_s: float = 300.0) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run `vita-audio ARGV`; once `progress()` reaches `at`, `vita-audio batch cancel --out OUT` runs in another
    process (started beforehand, so its start-up does not let a short job end first); then wait for the driver to
    end. Returns (the cancel's process, the driver's); fails the test if the driver ends first or makes no
    progress."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    canceller = subprocess.Popen([sys.executable, "-c", WAITING_CANCEL, "batch", "cancel", "--out", out], cwd=REPO,
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # files: never a full pipe
        driver = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=env, stdout=stdout,
                                  stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + timeout_s
            while progress() < at:
                if driver.poll() is not None:
                    stderr.seek(0)
                    raise AssertionError(f"the driver ended before it was cancelled: {stderr.read()[-2000:]}")
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.02)
            said, complaint = canceller.communicate("go\n", timeout=timeout_s)
            cancel = subprocess.CompletedProcess(canceller.args, canceller.returncode, said, complaint)
            driver.wait(timeout=timeout_s)
        finally:
            for process in (canceller, driver):
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)
        stdout.seek(0)
        stderr.seek(0)
        return cancel, subprocess.CompletedProcess(driver.args, driver.returncode, stdout.read(), stderr.read())
