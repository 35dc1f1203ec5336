"""The batch API with its files store on object storage (`Args.files = s3://...`, the layout of a multi-node
cluster, whose batch drivers run wherever Ray places them): through the unchanged openai SDK against a local
S3-compatible server (moto on loopback, started and stopped by this module: tests/test_object_store's `s3`
fixture). An upload is one object, served back as it was, removed by delete; a batch's input, run folder,
output JSONL and spoken answers are objects of the store; its audio is read by file id (an object of the files
store) and by s3:// URL; its driver SIGKILLed part-way and the endpoint restarted, it completes with each
custom_id exactly once."""
from __future__ import annotations

import io

import pytest
import soundfile
from batch_testing import Endpoint, jsonl, kill_driver, line, sdk, submit, wait
from serve_testing import API_KEY, clip
from test_object_store import BUCKET, s3  # noqa: F401 - the fixture: this module's own moto server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OTHER_KEY = "other-store-key"
FILES = "vita-files"
CLIPS = (clip(1.0, seed=3), clip(1.5, seed=4))


@pytest.fixture(scope="module")
def app(ray_session, tiny_models, s3, tmp_path_factory):  # noqa: F811 - the imported fixture
    """The app with its files store at s3://BUCKET/vita-files; the store's endpoint and credentials reach its
    replicas (and the batch drivers and runners they start) through Args.env_vars, as on a cluster."""
    from jobs.storage import forwarded_env

    root = tmp_path_factory.mktemp("batch-store")
    keys = root / "keys.txt"
    keys.write_text(f"{OTHER_KEY} other\n")
    for i, data in enumerate(CLIPS):
        with s3.open_output_stream(f"{BUCKET}/clips/clip{i}.wav") as f:
            f.write(data)
    endpoint = Endpoint(tiny_models, files=f"s3://{BUCKET}/{FILES}", state=str(root / "state"),
                        api_keys_file=str(keys), batch_block_size=4, batch_url_prefixes=[f"s3://{BUCKET}/clips/"],
                        env_vars=forwarded_env()).start()
    try:
        yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture(scope="module")
def client(app):
    return sdk(app.url, API_KEY)


@pytest.fixture(scope="module")
def other(app):
    return sdk(app.url, OTHER_KEY, timeout_s=60)


def _parts(s3, run: str) -> int:  # noqa: F811
    """The result blocks written in a batch's run folder on the store."""
    import pyarrow.fs as pafs

    parts = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/{run}/results", allow_not_found=True))
    return len([p for p in parts if p.base_name.startswith("part-")])


def _object(s3, key: str):  # noqa: F811
    import pyarrow.fs as pafs

    info = s3.get_file_info(f"{BUCKET}/{key}")
    return None if info.type == pafs.FileType.NotFound else info


def test_files_are_objects_of_the_store(client, other, s3):  # noqa: F811
    """An upload (3 MiB: copied in chunks) is one object under FILES/blobs, served back byte for byte; another key
    gets 404; delete removes the object."""
    import openai

    data = bytes(range(256)) * (3 * 4096)
    obj = client.files.create(file=("big.bin", data), purpose="user_data")
    assert obj.bytes == len(data) and obj.filename == "big.bin"
    stored = _object(s3, f"{FILES}/blobs/{obj.id}")
    assert stored is not None and stored.size == len(data)
    assert client.files.content(obj.id).content == data
    assert obj.id in [f.id for f in client.files.list(purpose="user_data")]
    with pytest.raises(openai.NotFoundError):
        other.files.content(obj.id)
    assert client.files.delete(obj.id).deleted
    assert _object(s3, f"{FILES}/blobs/{obj.id}") is None
    with pytest.raises(openai.NotFoundError):
        client.files.content(obj.id)


@pytest.mark.slow
def test_a_batch_on_the_store_survives_a_killed_driver_and_a_restarted_endpoint(app, client, other, s3):  # noqa: F811
    """24 lines (transcriptions of uploaded files and of s3:// URLs, speech), blocks of 4: the driver SIGKILLed
    once a block is written, the endpoint restarted; the batch completes, each custom_id once, its run folder and
    outputs objects of the store; the transcriptions equal the same requests online, the spoken answers are
    files (WAV objects) served back."""
    ids = [client.files.create(file=(f"clip{i}.wav", data), purpose="user_data").id for i, data in enumerate(CLIPS)]
    refs = ids + [{"url": f"s3://{BUCKET}/clips/clip{i}.wav"} for i in range(len(CLIPS))]
    lines = []
    for i in range(24):
        if i % 6 == 5:
            body = {"model": "vita-audio", "input": "Hello there.", "voice": "alloy", "max_new_tokens": 48}
            lines.append(line(f"s-{i:02d}", "/v1/audio/speech", body))
        else:
            body = {"model": "vita-audio", "file": refs[i % 4], "max_new_tokens": 24}
            lines.append(line(f"t-{i:02d}", "/v1/audio/transcriptions", body))
    batch = submit(client, lines)
    run = f"{FILES}/batches/{batch.id}"
    assert _object(s3, f"{run}/requests.jsonl") is not None  # the run folder is on the store
    kill_driver(batch.id, lambda: _parts(s3, run))
    app.restart(client, other)
    batch = wait(client, batch.id, timeout_s=480)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (24, 24, 0)
    outputs = jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(ln["custom_id"] for ln in lines)  # each once
    assert batch.error_file_id is None
    assert _object(s3, f"{FILES}/blobs/{batch.output_file_id}") is not None
    assert _parts(s3, run) == 6

    online = [client.audio.transcriptions.create(model="vita-audio", file=("a.wav", data),
                                                 extra_body={"max_new_tokens": 24}).text for data in CLIPS]
    by_id = {o["custom_id"]: o["response"]["body"] for o in outputs}
    for ln in lines:
        got = by_id[ln["custom_id"]]
        if ln["url"] == "/v1/audio/transcriptions":
            assert got["text"] == online[refs.index(ln["body"]["file"]) % 2], ln
        else:
            audio = got["audio"]
            assert _object(s3, f"{FILES}/blobs/{audio['file_id']}").size == audio["bytes"]
            pcm, rate = soundfile.read(io.BytesIO(client.files.content(audio["file_id"]).content))
            assert len(pcm) > 0 and rate > 0
