"""Test helper: run a job's driver as a subprocess and SIGKILL it once enough of its output exists."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def kill_driver_when(argv: list[str], progress: Callable[[], int], at: int, timeout_s: float = 300.0) -> int:
    """Run `python -m cli.main *argv`; once `progress()` reaches `at`, SIGKILL it (no clean-up of any kind, as a
    crash). Returns `progress()` after the kill; fails the test if the driver ends first or makes no progress."""
    driver = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while progress() < at:
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    return progress()
