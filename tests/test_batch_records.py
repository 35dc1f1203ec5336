"""The Batch API's records under concurrent requests (serve.routes_batch: every change of a batch record is a
compare-and-set of the state store, moving the batch only forward): a cancel racing many retrieves of a batch
whose job has ended, and many retrieves finalizing one batch at once, round after round on threads. The ingress
class in process (tests/serve_testing.local_ingress: no Ray, no Serve) over a SQLite state store and a files
folder of the module's own; the batches' lines are all refused at validation, so no job runs (the run folder
says it ended at once) and every retrieve races to finalize. One slow test runs a real job (its driver on the
session's Ray) and races a cancel with the polls that refresh its counts."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from unittest import mock

import pytest
from batch_testing import line
from serve_testing import local_ingress

from serve.routes_batch import FINAL, STAGES, BatchRoutes

ROUNDS = 12
POLLERS = 6
REFUSED = [line("bad-url", "/v1/embeddings", {"model": "vita-audio", "input": "x"}),
           line("bad-body", "/v1/audio/speech", {"model": "vita-audio"}),
           line("bad-voice", "/v1/audio/speech", {"model": "vita-audio", "input": "Hi.", "voice": "nobody"})]


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("batch-records")
    # no stage of this process is called: a batch's lines are refused, or run by its driver (the job's own pool);
    # the state store is SQLite in a folder, as the replicas of one machine share it
    with local_ingress(tiny_models, pipe=SimpleNamespace(clients={}), files=str(root / "files"),
                       state=str(root / "state"), batch_block_size=2) as client:
        ingress = serve.get_replica_context().servable_object  # the class as a replica builds it (in process)
        yield client
        ingress.state.close()


@pytest.fixture
def finalizes():
    """Every finalize (the output and error files written), by batch id: the real one, counted."""
    counts: dict[str, int] = {}
    lock = threading.Lock()
    real = BatchRoutes._finalize

    def counted(self, owner, record):
        with lock:
            counts[record["batch"]["id"]] = counts.get(record["batch"]["id"], 0) + 1
        return real(self, owner, record)

    with mock.patch.object(BatchRoutes, "_finalize", counted):
        yield counts


def _create(client, lines=REFUSED) -> dict:
    data = "".join(json.dumps(ln) + "\n" for ln in lines).encode()
    source = client.post("/v1/files", files={"file": ("requests.jsonl", data)}, data={"purpose": "batch"})
    assert source.status_code == 200, source.text
    batch = client.post("/v1/batches", json={"input_file_id": source.json()["id"], "endpoint": "/v1/audio/speech",
                                             "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    assert batch.json()["status"] == "in_progress", batch.json()
    return batch.json()


def _end(client, batch_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while (batch := client.get(f"/v1/batches/{batch_id}").json())["status"] not in FINAL:
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def _at_once(calls: list) -> list:
    """The calls run on threads of their own, released together; their results in order."""
    start = threading.Barrier(len(calls))

    def run(call):
        start.wait(timeout=60)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=120) for f in [pool.submit(run, c) for c in calls]]


def _polls(client, batch_id: str, n: int = 3):
    def poll():
        answers = []
        for _ in range(n):
            answer = client.get(f"/v1/batches/{batch_id}")
            assert answer.status_code == 200, answer.text
            answers.append(answer.json())
        return answers

    return poll


def _monotonic(answers: list[dict]) -> None:
    stages = [STAGES[a["status"]] for a in answers]
    assert stages == sorted(stages), [a["status"] for a in answers]


def test_a_cancel_racing_retrieves_never_goes_back(client, finalizes):
    """Each round: one cancel and POLLERS pollers at once on a batch whose job has ended. The cancel either wins
    (the batch ends `cancelled`) or comes during or after the finalize (`completed`: answered so, or 409); every poller's answers only go
    forward, every final answer is the batch's end, and the batch was finalized once."""
    ends = set()
    for _ in range(ROUNDS):
        batch_id = _create(client)["id"]

        def cancel():
            return client.post(f"/v1/batches/{batch_id}/cancel")

        cancelled, *polls = _at_once([cancel] + [_polls(client, batch_id)] * POLLERS)
        end = client.get(f"/v1/batches/{batch_id}").json()
        assert end["status"] in ("completed", "cancelled"), end
        if cancelled.status_code == 200 and cancelled.json()["status"] != "completed":
            assert cancelled.json()["status"] in ("cancelling", "cancelled"), cancelled.json()
            assert end["status"] == "cancelled"
        elif cancelled.status_code == 200:  # it came while a poll finalized: answered as the batch ended
            assert cancelled.json() == end
        else:
            assert cancelled.status_code == 409, cancelled.text
            assert cancelled.json()["error"]["code"] == "batch_not_cancellable"
            assert end["status"] == "completed"
        for answers in polls:
            _monotonic(answers)
            for answer in answers:
                if answer["status"] in FINAL:
                    assert answer == end
        assert end["output_file_id"] and end["error_file_id"]
        assert end["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
        assert finalizes[batch_id] == 1
        ends.add(end["status"])
        assert client.get(f"/v1/batches/{batch_id}").json() == end  # and it stays so
    assert ends  # (which of the two each round is the race's)


def test_concurrent_finalizes_write_one_answer(client, finalizes):
    """Each round: POLLERS retrieves at once of a batch whose job has ended; one finalizes, the others wait for
    its answer: all `completed` with the same output and error file ids; the error file holds one line per
    custom_id."""
    for _ in range(ROUNDS):
        batch_id = _create(client)["id"]
        answers = [a[0] for a in _at_once([_polls(client, batch_id, n=1)] * POLLERS)]
        assert {a["status"] for a in answers} == {"completed"}, [a["status"] for a in answers]
        assert len({(a["output_file_id"], a["error_file_id"]) for a in answers}) == 1
        assert all(a == answers[0] for a in answers)
        assert finalizes[batch_id] == 1
        errors = client.get(f"/v1/files/{answers[0]['error_file_id']}/content")
        assert sorted(json.loads(ln)["custom_id"] for ln in errors.text.splitlines()) == \
            sorted(ln["custom_id"] for ln in REFUSED)
        assert client.get(f"/v1/files/{answers[0]['output_file_id']}/content").text == ""


@pytest.mark.slow
def test_a_cancel_racing_polls_of_a_running_job(ray_session, client, finalizes):
    """A batch whose job runs (its driver on the session's Ray, blocks of 2 lines): a cancel and POLLERS pollers
    at once while the job runs, the polls refreshing the counts from the run folder. No poll writes
    `in_progress` over the cancel: every poller's answers only go forward, no poll sent after the cancel
    answered `cancelling` reads `in_progress`, and the batch ends `cancelled`, finalized once, with whole
    blocks of lines done."""
    lines = [line(f"s-{i:02d}", "/v1/audio/speech", {"model": "vita-audio", "input": f"Sentence number {i}.",
                                                   "voice": "alloy", "max_new_tokens": 48}) for i in range(24)]
    batch_id = _create(client, lines)["id"]
    cancelled_at = []

    def cancel():
        answer = client.post(f"/v1/batches/{batch_id}/cancel")
        cancelled_at.append(time.monotonic())
        return answer

    def poll():
        answers = []
        for _ in range(10):
            sent = time.monotonic()
            answer = client.get(f"/v1/batches/{batch_id}")
            assert answer.status_code == 200, answer.text
            answers.append((sent, answer.json()))
        return answers

    cancelled, *polls = _at_once([cancel] + [poll] * POLLERS)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelling", cancelled.json()  # 24 lines do not end that soon
    for answers in polls:
        _monotonic([a for _, a in answers])
        assert all(a["status"] != "in_progress" for sent, a in answers if sent > cancelled_at[0])
    end = _end(client, batch_id)
    assert end["status"] == "cancelled" and end["cancelled_at"], end
    assert end["request_counts"]["completed"] % 2 == 0 and end["request_counts"]["completed"] < 24, end
    assert finalizes[batch_id] == 1
