"""One batch's driver: a detached Ray actor, named by the batch id, that runs `run_openai_batch` on the cluster.

    start_driver("batch_ab12", config)    # idempotent: the running driver if there is one
    driver_state("batch_ab12", folder)     # "running" | "completed" | "cancelled" | "failed" | "absent"

The endpoint starts it and never waits for it: the job's Ray Data pools are its own (it takes no slot of the
online replicas), and the actor outlives the ingress replica that started it (detached). The actor takes no
CPU of its own (it only drives the pool). It writes `FOLDER/driver.json` when the job ends; a driver that died
part-way (killed, its node lost) leaves no such file and no actor, so `driver_state` says "absent" and the
endpoint starts a new one: the run folder resumes at the first block without a result file, never running
a written line again.
"""
from __future__ import annotations

import json
import threading
import time
import traceback

from jobs.batch.openai_batch import OpenAIBatchConfig, run_openai_batch
from jobs.storage import location, write_atomic

NAMESPACE = "vita-audio-batches"
STATE = "driver.json"


def driver_name(batch_id: str) -> str:
    return f"driver-{batch_id}"


class BatchDriver:
    """Runs the job on a thread of its own (so the actor still answers `state` while it runs)."""

    def __init__(self, config: OpenAIBatchConfig):
        self.config = config
        self.state = "running"
        self.thread = threading.Thread(target=self._run, name="openai-batch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        folder = location(self.config.folder)
        try:
            summary = run_openai_batch(self.config)
            record = {**summary, "ended_at": time.time()}
        except Exception as err:  # noqa: BLE001 - the batch's failure, reported to the endpoint
            traceback.print_exc()
            record = {"state": "failed", "error": f"{type(err).__name__}: {err}", "ended_at": time.time()}
        write_atomic(folder / STATE, json.dumps(record) + "\n")
        self.state = record["state"]

    def status(self) -> str:
        return self.state


def start_driver(batch_id: str, config: OpenAIBatchConfig):
    """The batch's driver actor, started if it is not running (get_if_exists: one per batch id)."""
    import ray

    actor = ray.remote(BatchDriver).options(name=driver_name(batch_id), namespace=NAMESPACE, lifetime="detached",
                                            get_if_exists=True, num_cpus=0, max_restarts=0)
    return actor.remote(config)


def ended(folder) -> dict | None:
    """The job's end record (`driver.json`), or None while it has not ended."""
    try:
        return json.loads((location(folder) / STATE).read_text())
    except (OSError, ValueError):
        return None


def driver_alive(batch_id: str) -> bool:
    import ray

    try:
        ray.get_actor(driver_name(batch_id), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def stop_driver(batch_id: str) -> None:
    """Kill the batch's driver now (its pool goes with it); the run folder keeps the blocks written."""
    import ray

    try:
        ray.kill(ray.get_actor(driver_name(batch_id), namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass
