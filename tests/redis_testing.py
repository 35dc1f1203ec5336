"""A real Redis for the tests of the state store (Debian's `redis-server`): started on a free loopback port with
persistence off, stopped by its own pid. Each test module starts its own (tests/test_state_store.py,
tests/test_front_door.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from actors.ray_runtime import free_port


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, persistence off; start() / stop() (by its own pid only)."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port, self.proc = workdir, port or free_port(), None

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "redis.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"],
                stdout=out, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {log.read_text()[-500:]}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING within 20 s: "
                                       f"{log.read_text()[-500:]}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def url(self, prefix: str | None = None) -> str:
        prefix = prefix or f"t{uuid.uuid4().hex[:8]}:"
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}"


def need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        reason = "redis-server not installed (Debian: apt-get install redis-server; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason + " — CI must run the Redis backend's tests")
        pytest.skip(reason)
