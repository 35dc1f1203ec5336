"""Test helpers of the batch API modules (tests/test_batch_api*.py): a Serve app that restarts on the same state
store and files store, and the openai SDK's batch round trip (submit, poll, read a JSONL output)."""
from __future__ import annotations

import json
import os
import signal
import time


class Endpoint:
    """A module's Serve app (tests/serve_testing.serve_app), restartable on the same state store and files store
    (as an endpoint restart: Serve torn down and started again)."""

    def __init__(self, tiny_models, **args):
        self.models, self.args = tiny_models, args
        self.url = self._app = None

    def start(self) -> Endpoint:
        from serve_testing import serve_app

        self._app = serve_app(self.models, **self.args)
        self.url = self._app.__enter__()
        return self

    def stop(self) -> None:
        self._app.__exit__(None, None, None)

    def restart(self, *clients) -> None:
        """Serve torn down and started again (on another port); `clients` (openai SDK clients) follow it."""
        self.stop()
        self.start()
        for client in clients:
            client.base_url = f"{self.url}/v1"


def sdk(url: str, api_key: str, timeout_s: float = 120):
    """The unchanged openai SDK on the app at `url` (no retries: a test sees every answer)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout_s)


def line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def submit(client, lines: list[dict]):
    """files.create(purpose="batch") of the lines as JSONL, then batches.create."""
    data = "".join(json.dumps(ln) + "\n" for ln in lines).encode()
    source = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert source.purpose == "batch" and source.bytes == len(data)
    return client.batches.create(input_file_id=source.id, endpoint="/v1/audio/speech", completion_window="24h")


def wait(client, batch_id: str, until=lambda b: b.status in ("completed", "failed", "cancelled", "expired"),
         timeout_s: float = 240):
    """Poll batches.retrieve until `until(batch)` (by default: the batch ended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.5)


def jsonl(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(ln) for ln in client.files.content(file_id).text.splitlines() if ln.strip()]


def kill_driver(batch_id: str, written, at: int = 1, timeout_s: float = 240) -> int:
    """SIGKILL the process of the batch's driver actor (no clean-up of any kind, as a crash) as soon as `written()`
    (the result blocks in its run folder, polled every 50 ms) reaches `at`; the blocks written then. The SDK's
    request counts are not polled for this: a small batch can end between two polls, and its driver with it."""
    import ray

    from jobs.batch.driver import NAMESPACE, driver_name

    deadline = time.monotonic() + timeout_s
    while (count := written()) < at:
        assert time.monotonic() < deadline, f"batch {batch_id}: {count} blocks written after {timeout_s:g} s"
        time.sleep(0.05)
    try:
        driver = ray.get_actor(driver_name(batch_id), namespace=NAMESPACE)
        os.kill(ray.get(driver.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    except ValueError:
        raise AssertionError(f"batch {batch_id}: its driver ended before it could be killed "
                             f"({written()} blocks written)") from None
    return count
