"""The data jobs on an object store: `vita-audio batch asr` and `vita-audio prepare` over `s3://` prefixes of a
local S3-compatible server (moto, started here on loopback and stopped), reading a Parquet audio dataset (the
Hugging Face layout) and WebDataset tar shards built from mini-speech in place, writing their results to
`s3://`, killed part-way and rerun: one row per input, a corrupt entry one error row. Ray workers get the
store's endpoint and credentials from the driver (`jobs.storage.ray_remote_args`), not from their own env."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from driver_cancel import cancel_driver_when, cli
from driver_kill import kill_driver_when

BUCKET = "speech"
CORRUPT = b"RIFF\x24\x00\x00\x00WAVEnot really audio"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port (a subprocess, stopped at the end), the AWS variables pointing
    at it for this module, and the bucket; yields a pyarrow S3FileSystem on it."""
    import pyarrow.fs as pafs

    from jobs.storage import reset_filesystems

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_filesystems()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_filesystems()


@pytest.fixture(scope="module")
def utterances(shared_dir) -> list[tuple[str, bytes, str]]:
    """mini-speech's 40 LibriSpeech utterances: (id, FLAC bytes, transcript)."""
    root = shared_dir / "corpora" / "mini-speech" / "LibriSpeech" / "dev-clean-mini"
    texts = {}
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt, _, text = line.partition(" ")
            texts[utt] = text
    return [(f.stem, f.read_bytes(), texts[f.stem]) for f in sorted(root.rglob("*.flac"))]


def _put(fs, key: str, data: bytes) -> str:
    with fs.open_output_stream(f"{BUCKET}/{key}") as f:
        f.write(data)
    return f"s3://{BUCKET}/{key}"


def _parquet_dataset(fs, prefix: str, items, files: int = 2) -> str:
    """The Hugging Face audio layout: `audio` {bytes, path}, `text`, `id`; row groups of 8 rows."""
    schema = pa.schema([("id", pa.string()), ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("text", pa.string())])
    per = -(-len(items) // files)
    for k in range(files):
        rows = [{"id": i, "audio": {"bytes": data, "path": f"{i}.flac"}, "text": text}
                for i, data, text in items[k * per:(k + 1) * per]]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, row_group_size=8)
        _put(fs, f"{prefix}/data/train-{k:05d}-of-{files:05d}.parquet", sink.getvalue().to_pybytes())
    return f"s3://{BUCKET}/{prefix}"


def _tar_shards(fs, prefix: str, items, shards: int = 2) -> str:
    per = -(-len(items) // shards)
    for k in range(shards):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i, data, text in items[k * per:(k + 1) * per]:
                for name, payload in ((f"{i}.flac", data), (f"{i}.txt", text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        _put(fs, f"{prefix}/train-{k:03d}.tar", buffer.getvalue())
    return f"s3://{BUCKET}/{prefix}"


def _objects(fs, prefix: str, pattern: str) -> int:
    import fnmatch

    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sum(fnmatch.fnmatch(i.base_name, pattern) for i in infos if i.type == pafs.FileType.File)


# ---------------------------------------------------------------------------------------------------------
# listing and reading in place; the lease (no Ray)


def test_archives_on_s3_are_listed_and_read_in_place(s3, utterances):
    from jobs.batch.inputs import enumerate_inputs, read_audio_bytes

    items = utterances[:10] + [("corrupt-0", CORRUPT, "NOT AUDIO")]
    dataset = _parquet_dataset(s3, "listing/parquet", items)
    shards = _tar_shards(s3, "listing/tar", items)
    for source in (dataset, shards):
        listed = enumerate_inputs(source, "asr")
        assert [i.id for i in listed] == [i for i, _, _ in items]  # file order, then row / key order
        assert {i.id: i.text for i in listed} == {i: t for i, _, t in items}
        audio = {i: data for i, data, _ in items}
        for item in listed:
            assert item.path.startswith(source) and read_audio_bytes(item.path) == audio[item.id]
    texts = enumerate_inputs(dataset, "tts")  # the same dataset's texts, to speak
    assert [t.text for t in texts] == [t for _, _, t in items]
    with pytest.raises(FileNotFoundError, match="no such object or prefix"):
        enumerate_inputs(f"s3://{BUCKET}/nothing-here", "asr")


def test_the_lease_lock_on_an_object_store(s3):
    from jobs.run_folder import RunFolderError, lock_run_folder
    from jobs.storage import location

    out = location(f"s3://{BUCKET}/leases/run")
    held = lock_run_folder(out, "batch")
    with pytest.raises(RunFolderError, match="another batch run is writing there"):
        lock_run_folder(out, "batch")
    held.close()
    assert not (out / ".lock").exists()
    again = lock_run_folder(out, "batch")  # free again
    again.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = {"token": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "expires_at": time.time() + 600}
    (out / ".lock").write_text(json.dumps(lease))  # a killed driver's lease on this machine: taken over at once
    lock_run_folder(out, "batch").close()
    (out / ".lock").write_text(json.dumps({**lease, "host": "elsewhere"}))  # live on another machine: refused
    with pytest.raises(RunFolderError, match="elsewhere pid"):
        lock_run_folder(out, "batch")
    (out / ".lock").write_text(json.dumps({**lease, "host": "elsewhere", "expires_at": time.time() - 1}))
    lock_run_folder(out, "batch").close()  # expired: taken over


class _FailingUpload(io.RawIOBase):
    """A client's upload that goes away after `chunks` MiB (its reader raises)."""

    def __init__(self, chunks: int):
        self.left = chunks

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left == 0:
            raise ConnectionResetError("the client went away mid-upload")
        self.left -= 1
        return b"u" * (1 << 20)


def test_an_upload_that_fails_part_way_leaves_nothing_at_its_key(s3, tmp_path):
    """`write_atomic` from a reader that raises after some MiB (more than one multipart part, and less): on s3 no
    object at the final key, an older object there stays whole, no temporary object is left; on local disk the
    same with no temporary file. A whole upload (the Files API's path) and a Parquet table land whole."""
    from jobs.storage import location, read_table, write_atomic

    prefix = location(f"s3://{BUCKET}/uploads")
    for root in (prefix, tmp_path):
        for chunks in (2, 12):
            with pytest.raises(ConnectionResetError):
                write_atomic(root / f"new-{chunks}", _FailingUpload(chunks))
        (root / "old").write_bytes(b"the old object")
        with pytest.raises(ConnectionResetError):
            write_atomic(root / "old", _FailingUpload(12))
        assert sorted(p.name for p in root.iterdir()) == ["old"] and (root / "old").read_bytes() == b"the old object"

        write_atomic(root / "whole", io.BytesIO(b"w" * (6 << 20) + b"end"))
        write_atomic(root / "table.parquet", pa.table({"id": ["a", "b"]}))
        assert (root / "whole").read_bytes() == b"w" * (6 << 20) + b"end"
        assert read_table(root / "table.parquet").column("id").to_pylist() == ["a", "b"]
        assert sorted(p.name for p in root.iterdir()) == ["old", "table.parquet", "whole"]


# ---------------------------------------------------------------------------------------------------------
# the jobs, killed and rerun


@pytest.mark.slow
def test_batch_asr_over_an_s3_parquet_dataset_killed_and_rerun(ray_session, tiny_models, s3, utterances):
    """The driver (a subprocess on the test's Ray) is killed once 2 result objects exist; the rerun writes the
    rest: one row per input in s3://.../results, the corrupt row an error row, every other row ok."""
    from jobs.batch.callables import DecodeOptions
    from jobs.batch.job import BatchConfig, read_results, run_batch

    items = utterances[:24] + [("corrupt-0", CORRUPT, "NOT AUDIO")]
    dataset = _parquet_dataset(s3, "batch/parquet", items)
    out = f"s3://{BUCKET}/runs/asr-parquet"
    address = ray_session.get_runtime_context().gcs_address
    argv = ["batch", "asr", "--input", dataset, "--out", out, "--models", str(tiny_models), "--address", address,
            "--block-size", "4", "--max-new-tokens", "24", "--encoder-rows", "4", "--llm-rows", "4", "--no-progress"]
    written = kill_driver_when(argv, lambda: _objects(s3, "runs/asr-parquet/results", "part-*.parquet"), at=2,
                               timeout_s=240)
    assert 2 <= written < 7, f"{written} of 7 blocks written when killed"

    config = BatchConfig(task="asr", input=dataset, out=out, models=str(tiny_models), block_size=4,
                         decode=DecodeOptions(max_new_tokens=24), progress=False)
    resumed = run_batch(config)
    assert resumed["this_run"]["blocks"] == 7 - written
    rows = read_results(out).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(i for i, _, _ in items) and resumed["complete"]
    bad = [r for r in rows if r["status"] != "ok"]
    assert [r["id"] for r in bad] == ["corrupt-0"] and "input:" in bad[0]["error"]
    assert all(r["text"] is not None and r["audio_seconds"] > 0 for r in rows if r["status"] == "ok")
    assert _objects(s3, "runs/asr-parquet", "summary.json") == 1 and _objects(s3, "runs/asr-parquet", ".lock") == 0
    assert run_batch(config)["this_run"]["inputs"] == 0  # a finished run rerun does nothing


@pytest.mark.slow
def test_batch_asr_on_s3_cancelled_from_another_shell_and_rerun(ray_session, tiny_models, s3, utterances):
    """`vita-audio batch cancel --out s3://...` once 2 of 12 result objects exist: the job stops at its next block
    boundary (exit 3, its result objects whole), and the same command rerun resumes: one row per input."""
    from jobs.batch.job import read_results
    from jobs.storage import location, read_metadata

    dataset = _parquet_dataset(s3, "cancel/parquet", utterances[:24])
    out = f"s3://{BUCKET}/runs/asr-cancelled"
    argv = ["batch", "asr", "--input", dataset, "--out", out, "--models", str(tiny_models), "--address",
            ray_session.get_runtime_context().gcs_address, "--block-size", "2", "--max-new-tokens", "24",
            "--encoder-rows", "2", "--llm-rows", "2", "--no-progress", "--json"]
    parts = lambda: _objects(s3, "runs/asr-cancelled/results", "part-*.parquet")  # noqa: E731
    cancel, job = cancel_driver_when(argv, out, parts, at=2, timeout_s=240)
    assert cancel.returncode == 0 and "stop after its current block" in cancel.stderr, cancel.stderr
    assert job.returncode == 3 and "cancelled: stopped at a block boundary" in job.stderr, job.stderr[-2000:]
    written = parts()
    assert json.loads(job.stdout.strip().splitlines()[-1])["state"] == "cancelled" and 2 <= written < 12, written
    results = location(out) / "results"
    assert [read_metadata(p).num_rows for p in results.glob("part-*.parquet")] == [2] * written
    assert _objects(s3, "runs/asr-cancelled", ".lock") == 0 and _objects(s3, "runs/asr-cancelled", "cancel") == 1

    rerun = cli(argv)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert resumed["state"] == "completed" and resumed["this_run"]["blocks"] == 12 - written
    ids = read_results(out).column("id").to_pylist()
    assert sorted(ids) == sorted(i for i, _, _ in utterances[:24]) and _objects(s3, "runs/asr-cancelled", "cancel") == 0


@pytest.mark.slow
def test_batch_asr_over_s3_tar_shards_equals_the_local_run(ray_session, tiny_models, s3, utterances, tmp_path):
    """The same shards on local disk and on s3: the same rows (greedy), results written to s3."""
    from jobs.batch.callables import DecodeOptions
    from jobs.batch.job import BatchConfig, read_results, run_batch

    items = utterances[:12]
    shards = _tar_shards(s3, "batch/tar", items)
    local = tmp_path / "shards"
    local.mkdir()
    for k in range(2):
        (local / f"train-{k:03d}.tar").write_bytes(s3.open_input_stream(f"{BUCKET}/batch/tar/train-{k:03d}.tar").read())
    runs = {}
    for name, source, out in (("s3", shards, f"s3://{BUCKET}/runs/asr-tar"), ("local", local, tmp_path / "out")):
        run_batch(BatchConfig(task="asr", input=str(source), out=str(out), models=str(tiny_models), block_size=4,
                              decode=DecodeOptions(max_new_tokens=24), progress=False))
        runs[name] = {r["id"]: (r["status"], r["text"]) for r in read_results(out).to_pylist()}
    assert runs["s3"] == runs["local"] and len(runs["s3"]) == 12
    assert all(status == "ok" for status, _ in runs["s3"].values())


@pytest.mark.slow
def test_prepare_over_s3_tar_shards_killed_and_rerun(ray_session, tiny_models, s3, utterances):
    """`vita-audio prepare --source webdataset:s3://...` to `--out s3://...`, killed once 3 blocks are done and
    rerun: every input one sample or one error row (the corrupt member: `unreadable`), shards in s3."""
    from jobs.pools import PoolConfig
    from jobs.prepare import PrepareConfig, read_shards, run_prepare

    items = utterances[:12] + [("corrupt-0", CORRUPT, "NOT AUDIO")]
    shards = _tar_shards(s3, "prepare/tar", items)
    out = f"s3://{BUCKET}/prepared"
    source = f"webdataset:{shards}"
    address = ray_session.get_runtime_context().gcs_address
    argv = ["prepare", "--source", source, "--out", out, "--tasks", "asr,tts", "--models", str(tiny_models),
            "--address", address, "--block-size", "2", "--encoder-rows", "2", "--no-progress"]
    written = kill_driver_when(argv, lambda: _objects(s3, "prepared/.blocks", "done-*.json"), at=3, timeout_s=240)
    assert 3 <= written < 13, f"{written} of 13 blocks written when killed"
    assert _objects(s3, "prepared", "manifest.json") == 0

    manifest = run_prepare(PrepareConfig(sources=[source], out=out, tasks=("asr", "tts"), models=str(tiny_models),
                                         block_size=2, encoder=PoolConfig(size=1, batch_size=2), progress=False))
    assert manifest["runs"][-1]["blocks"] == 13 - written
    counts = manifest["counts"]
    assert counts["inputs"] == 26 and counts["samples"] + counts["errors"] == 26
    assert counts["rejects"] == {"unreadable": 2}  # the corrupt member's asr and tts inputs
    ids = read_shards(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24
    assert _objects(s3, "prepared", "manifest.json") == 1 and _objects(s3, "prepared/shards", "part-*.parquet") == 12
