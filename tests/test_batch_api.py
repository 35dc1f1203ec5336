"""The OpenAI Batch API through the unchanged openai SDK: files.create(purpose="batch"), batches.create, polling
batches.retrieve, files.content of the output and error files; a 200-line batch with every output equal to the
same request sent online (greedy); bad lines as error lines; cancel part-way; the driver SIGKILLed part-way and
the endpoint restarted on the same state store and files folder: resumed, never duplicated; another key sees
nothing (404). Its own Serve app (tests/serve_testing.serve_app) on the session's Ray."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from batch_testing import Endpoint, jsonl, kill_driver, line, sdk, submit, wait
from serve_testing import API_KEY, clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OTHER_KEY = "other-test-key"
SPEECH_TOKENS = 48  # enough for audio chunks on the tiny set
TEXTS = ("Hello there.", "Good morning to you.", "A third sentence.")
CLIPS = (clip(1.0, seed=1), clip(1.5, seed=2))


@pytest.fixture(scope="module")
def app(ray_session, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-api")
    keys = root / "keys.txt"
    keys.write_text(f"{OTHER_KEY} other\n")
    clips = root / "store"  # the "object store" a batch line may name by URL (file:// here, s3:// on a cluster)
    clips.mkdir()
    for i, data in enumerate(CLIPS):
        (clips / f"clip{i}.wav").write_bytes(data)
    endpoint = Endpoint(tiny_models, files=str(root / "files"), state=str(root / "state"), api_keys_file=str(keys),
                        batch_block_size=4, batch_url_prefixes=[clips.as_uri() + "/"]).start()
    try:
        yield {"url": endpoint.url, "files": root / "files", "store": clips, "endpoint": endpoint}
    finally:
        endpoint.stop()


@pytest.fixture(scope="module")
def client(app):
    return sdk(app['url'], API_KEY)


@pytest.fixture(scope="module")
def other(app):
    return sdk(app['url'], OTHER_KEY, timeout_s=60)


@pytest.fixture(scope="module")
def clip_ids(client, app):
    """CLIPS as a batch line names them: by file id (uploaded), then by URL in the object store."""
    ids = [client.files.create(file=(f"clip{i}.wav", data), purpose="user_data").id for i, data in enumerate(CLIPS)]
    return ids + [{"url": (app["store"] / f"clip{i}.wav").as_uri()} for i in range(len(CLIPS))]


def _speech(i: int) -> dict:
    return {"model": "vita-audio", "input": TEXTS[i % len(TEXTS)], "voice": "alloy", "max_new_tokens": SPEECH_TOKENS}


def _transcription(i: int, clip_ids) -> dict:
    return {"model": "vita-audio", "file": clip_ids[i % len(clip_ids)], "max_new_tokens": 24}


def _chat(i: int) -> dict:
    data = base64.b64encode(CLIPS[i % len(CLIPS)]).decode()
    return {"model": "vita-audio", "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
            "max_tokens": SPEECH_TOKENS,
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data,
                                                                                               "format": "wav"}}]}]}


def _good_lines(n: int, clip_ids) -> list[dict]:
    """n lines cycling speech, transcription, chat; the k-th line of a kind is that kind's k-th request."""
    kinds = [("/v1/audio/speech", _speech), ("/v1/audio/transcriptions", lambda k: _transcription(k, clip_ids)),
             ("/v1/chat/completions", _chat)]
    lines = []
    for i in range(n):
        url, make = kinds[i % 3]
        lines.append(line(f"req-{i:03d}", url, make(i // 3)))
    return lines


def _bad_lines() -> list[dict]:
    noise = base64.b64encode(b"not audio at all" * 8).decode()
    return [
        line("bad-url", "/v1/embeddings", {"model": "vita-audio", "input": "x"}),
        line("bad-body", "/v1/audio/speech", {"model": "vita-audio"}),  # no input
        line("bad-voice", "/v1/audio/speech", {**_speech(0), "voice": "nobody"}),
        line("bad-temperature", "/v1/chat/completions", {**_chat(0), "temperature": 7}),
        line("bad-audio", "/v1/audio/transcriptions", {"model": "vita-audio", "file": noise}),  # found by the job
    ]


def _pcm(data: bytes) -> np.ndarray:
    return soundfile.read(io.BytesIO(data), dtype="int16")[0]


def _same_audio(a: bytes, b: bytes) -> None:
    """The same samples up to float noise: the codes are equal (checked by the callers through the usage's
    counts and the text), and the decoder batches the chunks of concurrent streams together, so the batch's
    float sums run in another order than a lone online request's (up to 109 of 32767 seen on the tiny set's
    noise-like audio: a few thousandths of full scale, as tests/test_front_ends_agree allows 2e-3)."""
    x, y = _pcm(a).astype(float), _pcm(b).astype(float)
    assert len(x) == len(y) and len(x) > 0
    diff = np.abs(x - y)
    assert diff.max() <= 0.01 * 32767, diff.max()
    assert np.sqrt(np.mean(diff ** 2)) <= 0.01 * np.sqrt(np.mean(y ** 2)), (np.sqrt(np.mean(diff ** 2)),
                                                                         np.sqrt(np.mean(y ** 2)))


@pytest.mark.slow
def test_a_200_line_mixed_batch_equals_the_same_requests_online(client, clip_ids):
    """200 lines: 195 good ones (speech, transcriptions of uploaded files and of object-store URLs, chat with audio
    in and out; 9 distinct requests under distinct custom_ids, so that each is sent online once) and 5 bad ones.
    195 output lines and 5 error lines, each custom_id exactly once, every output equal to the same request sent
    online."""
    good, bad = _good_lines(195, clip_ids), _bad_lines()
    lines = good[:60] + bad[:3] + good[60:] + bad[3:]
    batch = submit(client, lines)
    assert batch.object == "batch" and batch.status in ("validating", "in_progress")
    assert batch.request_counts.total == 200
    batch = wait(client, batch.id, timeout_s=1200)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (200, 195, 5)
    outputs, errors = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    assert (len(outputs), len(errors)) == (195, 5)
    assert sorted(o["custom_id"] for o in outputs) == sorted(ln["custom_id"] for ln in good)
    assert sorted(e["custom_id"] for e in errors) == sorted(ln["custom_id"] for ln in bad)
    for e in errors:
        assert e["response"]["status_code"] == 400 and e["error"]["message"], e
        assert e["response"]["body"]["error"]["message"] == e["error"]["message"]
    by_id = {o["custom_id"]: o for o in outputs}
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in outputs)

    online = {}  # one online request per distinct body (the batch repeats them)
    for request in good:
        body, url = request["body"], request["url"]
        key = json.dumps([url, body], sort_keys=True)
        got = by_id[request["custom_id"]]["response"]["body"]
        if url == "/v1/audio/speech":
            if key not in online:
                online[key] = client.audio.speech.with_raw_response.create(
                    **{k: v for k, v in body.items() if k != "max_new_tokens"}, extra_body={"max_new_tokens": SPEECH_TOKENS})
            raw = online[key]
            assert got["audio"]["format"] == "wav"
            assert (got["usage"]["output_tokens"], got["usage"]["output_tokens_details"]["audio_tokens"]) == (
                int(raw.headers["x-usage-output-tokens"]), int(raw.headers["x-usage-audio-tokens"]))
            _same_audio(client.files.content(got["audio"]["file_id"]).content, raw.content)
        elif url == "/v1/audio/transcriptions":
            if key not in online:
                data = CLIPS[clip_ids.index(body["file"]) % len(CLIPS)]
                online[key] = client.audio.transcriptions.create(model="vita-audio", file=("a.wav", data),
                                                                 extra_body={"max_new_tokens": 24}).text
            assert got["text"] == online[key]
        else:
            if key not in online:
                online[key] = client.chat.completions.create(**body)
            want, usage = online[key].choices[0].message, online[key].usage
            assert (got["usage"]["completion_tokens"], got["usage"]["completion_tokens_details"]["audio_tokens"]) == (
                usage.completion_tokens, usage.completion_tokens_details.audio_tokens)
            message = got["choices"][0]["message"]
            assert got["object"] == "chat.completion"
            assert message["audio"]["transcript"] == want.audio.transcript and "data" not in message["audio"]
            _same_audio(client.files.content(message["audio"]["file_id"]).content, base64.b64decode(want.audio.data))
    assert len(online) == 9  # 3 texts, 2 clips by file id + 2 by URL, 2 chat clips


@pytest.mark.slow
def test_cancel_part_way_keeps_the_finished_lines(client, clip_ids):
    lines = [line(f"c-{i:03d}", "/v1/audio/speech", _speech(i)) for i in range(40)]
    batch = submit(client, lines)
    wait(client, batch.id, until=lambda b: b.request_counts.completed >= 4 or b.status == "completed")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    outputs = jsonl(client, batch.output_file_id)
    ids = [o["custom_id"] for o in outputs]
    assert len(ids) == len(set(ids)) == batch.request_counts.completed
    assert 4 <= len(ids) < 40 and len(ids) % 4 == 0  # whole blocks of 4 lines
    assert set(ids) <= {ln["custom_id"] for ln in lines}
    assert all(o["response"]["body"]["audio"]["file_id"] for o in outputs)


@pytest.mark.slow
def test_a_killed_driver_and_a_restarted_endpoint_resume_without_duplicates(client, other, clip_ids, app):
    """The batch's driver SIGKILLed part-way (its process, no clean-up), then the endpoint torn down and started
    again on the same state store and files folder: polling the new endpoint starts a new driver, which runs
    only the blocks without a result file. Each custom_id exactly once; the blocks written before the kill
    kept as they were."""
    lines = [line(f"k-{i:03d}", "/v1/audio/transcriptions", _transcription(i, clip_ids)) for i in range(48)]
    batch = submit(client, lines)
    results = Path(app["files"]) / "batches" / batch.id / "results"
    kill_driver(batch.id, lambda: len(list(results.glob("part-*.parquet"))))
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("part-*.parquet")}
    assert 1 <= len(before) < 12
    app["endpoint"].restart(client, other)
    batch = wait(client, batch.id)  # retrieve sees the dead driver and starts a new one
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (48, 48, 0)
    ids = [o["custom_id"] for o in jsonl(client, batch.output_file_id)]
    assert sorted(ids) == sorted(ln["custom_id"] for ln in lines)  # each exactly once
    after = {p.name: p.stat().st_mtime_ns for p in results.glob("part-*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())  # blocks written before the kill: kept
    assert len(after) == 12


def test_another_key_gets_404_and_files_round_trip(client, other):
    import openai

    data = b'{"custom_id": "x", "method": "POST", "url": "/v1/audio/speech", "body": {}}\n'
    source = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert client.files.retrieve(source.id).filename == "in.jsonl"
    assert client.files.content(source.id).content == data
    assert source.id in [f.id for f in client.files.list()]
    assert source.id not in [f.id for f in other.files.list()]
    for call in (lambda: other.files.retrieve(source.id), lambda: other.files.content(source.id),
                 lambda: other.files.delete(source.id),
                 lambda: other.batches.create(input_file_id=source.id, endpoint="/v1/audio/speech",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/audio/speech", completion_window="24h")
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in other.batches.list()]
    done = wait(client, batch.id, timeout_s=60)  # its one line is refused: an error file only, no job run
    assert done.status == "completed" and done.request_counts.failed == 1
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.error_file_id)
    assert client.files.delete(source.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(source.id)


def test_bad_batch_requests_are_refused(client):
    import openai

    source = client.files.create(file=("in.jsonl", b"not json\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=source.id, endpoint="/v1/audio/speech", completion_window="1h")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/audio/speech", completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].line is None and "not JSON" in batch.errors.data[0].message


def test_audio_references_by_url_read_through_pyarrow_and_stay_under_the_allowed_prefixes(tmp_path):
    """A line's audio by URL: read by the job through pyarrow's filesystems (file:// here; s3:// the same way), and
    refused at validation unless it lies under one of the endpoint's batch_url_prefixes."""
    from jobs.batch.openai_batch import LineError, admit_clip, read_ref
    from serve.api import APIError
    from serve.routes_batch import BatchRoutes

    path = tmp_path / "a.wav"
    path.write_bytes(CLIPS[0])
    assert read_ref({"url": path.as_uri()}, "file") == CLIPS[0]
    assert read_ref({"b64": base64.b64encode(CLIPS[1]).decode()}, "file") == CLIPS[1]
    assert admit_clip(CLIPS[0], 6.0, "file").seconds == pytest.approx(1.0)
    with pytest.raises(LineError, match="file: cannot read"):
        read_ref({"url": (tmp_path / "missing.wav").as_uri()}, "file")
    with pytest.raises(LineError, match="max_audio_seconds"):
        admit_clip(CLIPS[1], 1.0, "file")

    routes = BatchRoutes()
    routes.batch_settings = {"url_prefixes": [tmp_path.as_uri() + "/"]}
    assert routes._audio_ref("", {"url": path.as_uri()}, "file") == {"url": path.as_uri()}
    with pytest.raises(APIError, match="not under an allowed prefix"):
        routes._audio_ref("", {"url": "file:///etc/passwd"}, "file")
    with pytest.raises(APIError, match="not valid base64"):
        routes._audio_ref("", "%%%", "file")
