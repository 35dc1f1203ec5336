"""The same greedy request through every front end gives the same answer: the Python API (LocalPipeline), Serve
HTTP (the ingress in-process), realtime (its WebSocket, in-process), the batch job's stage classes and the CLI
(the staged Ray pipeline, a subprocess) — identical text, generated ids and audio codes.

Once on the tiny set (random weights, flagged `tiny-models.json`: the LLM stage forces the task's layout) and
once on a released-format set of the same shapes that is not flagged (the layout is the model's own: no front
end forces it). The request: mode boost, greedy with a repetition penalty (a field Serve could not set before),
the default voice, 24 new tokens.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from serve_testing import local_ingress, local_pipeline

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the weather like?"
SPOKEN = "Hello there."
MODE, PENALTY, TOKENS = "boost", 1.1, 24


class Recording:
    """Stage clients that note what the LLM generated and which codes went to the decoder, per request."""

    def __init__(self, inner):
        self.inner = inner
        self.token_ids: list[int] = []
        self.codes: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request):
        async for item in self.inner.generate(request):
            if item.end is not None:
                self.token_ids = list(item.end.token_ids)
            yield item

    def push(self, chunk):
        self.codes.extend(int(c) for c in chunk.codes)
        return self.inner.push(chunk)

    def take(self) -> tuple[list[int], list[int]]:
        out = (self.token_ids, self.codes)
        self.token_ids, self.codes = [], []
        return out


@pytest.fixture(scope="module", params=["tiny", "released"])
def models(request, tiny_models, tmp_path_factory):
    if request.param == "tiny":
        return tiny_models
    from pipeline.tiny import is_tiny_set, write_model_set

    out = tmp_path_factory.mktemp("released-models")
    write_model_set(out, seed=0, llm="tiny")  # the same shapes in the released layout, not flagged as a tiny set
    assert not is_tiny_set(out)
    return out


@pytest.fixture(scope="module")
def fronts(models):
    """The Python API and the ingress (HTTP + realtime) over one set of stage objects, recording."""
    with local_pipeline(models) as pipe:
        recording = Recording(pipe.clients)
        with local_ingress(models, pipe=SimpleNamespace(clients=recording)) as client:
            yield SimpleNamespace(pipe=pipe, recording=recording, http=client, models=models)


def api_answer(pipe, task: str, text: str, **options):
    from actors.requests import build_sampling
    from actors.results import collect

    result = collect(getattr(pipe, task)(text, mode=MODE, max_new_tokens=TOKENS,
                                         sampling=build_sampling(repetition_penalty=PENALTY), **options))
    assert result.ok, result.error
    return SimpleNamespace(text=result.text, token_ids=list(result.done.token_ids),
                           codes=list(result.done.audio_codes), pcm=result.pcm)


@pytest.fixture(scope="module")
def reference(fronts):
    return {"chat": api_answer(fronts.pipe, "chat", QUESTION), "tts": api_answer(fronts.pipe, "tts", SPOKEN)}


def test_the_layout_is_the_checkpoints_choice(fronts, reference):
    """"auto" (every front end's default) forces the task's layout on the tiny set only."""
    from actors.payloads import TASK_DEFAULT
    from pipeline.tiny import is_tiny_set

    forced = api_answer(fronts.pipe, "chat", QUESTION, constraint=TASK_DEFAULT)
    if is_tiny_set(fronts.models):
        assert forced.token_ids == reference["chat"].token_ids
    else:
        assert forced.token_ids != reference["chat"].token_ids  # nobody forced it: the model's own layout


def test_http_chat_and_speech_agree_with_the_python_api(fronts, reference):
    fronts.recording.take()
    body = {"model": "vita-audio", "messages": [{"role": "user", "content": QUESTION}],
            "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}, "max_tokens": TOKENS,
            "mode": MODE, "repetition_penalty": PENALTY}
    r = fronts.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    audio = r.json()["choices"][0]["message"]["audio"]
    token_ids, codes = fronts.recording.take()
    want = reference["chat"]
    assert (audio["transcript"], token_ids, codes) == (want.text, want.token_ids, want.codes)
    pcm, _ = soundfile.read(io.BytesIO(base64.b64decode(audio["data"])), dtype="int16")
    assert np.array_equal(pcm, np.round(np.clip(want.pcm, -1, 1) * 32767).astype(np.int16))

    body = {"model": "vita-audio", "input": SPOKEN, "voice": "alloy", "max_new_tokens": TOKENS, "mode": MODE,
            "repetition_penalty": PENALTY, "response_format": "wav"}
    r = fronts.http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    token_ids, codes = fronts.recording.take()
    want = reference["tts"]
    assert (token_ids, codes) == (want.token_ids, want.codes) and codes


def test_realtime_agrees_with_the_python_api(fronts, reference):
    fronts.recording.take()
    with fronts.http.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        ws.send_json({"type": "session.update", "session": {"mode": MODE, "repetition_penalty": PENALTY,
                                                            "max_output_tokens": TOKENS}})
        assert ws.receive_json()["type"] == "session.updated"
        ws.send_json({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}})
        ws.send_json({"type": "response.create"})
        transcript = ""
        while (event := ws.receive_json())["type"] != "response.done":
            assert event["type"] != "error", event
            if event["type"] == "response.output_audio_transcript.delta":
                transcript += event["delta"]
    assert event["response"]["status"] in ("completed", "incomplete")  # incomplete: max_output_tokens reached
    token_ids, codes = fronts.recording.take()
    want = reference["chat"]
    assert (transcript, token_ids, codes) == (want.text, want.token_ids, want.codes)


def test_the_batch_jobs_stages_agree_with_the_python_api(fronts, reference):
    from actors.config import PipelineConfig
    from jobs.batch.callables import DecodeOptions, SpeechLLM

    config = PipelineConfig.from_models_dir(fronts.models).with_resources(num_gpus=0, torch_threads=1)
    llm = SpeechLLM(config.llm, "tts", DecodeOptions(mode=MODE, max_new_tokens=TOKENS, repetition_penalty=PENALTY))
    row = llm([{"id": "a", "text": SPOKEN}]).to_pylist()[0]
    want = reference["tts"]
    assert row["status"] == "ok", row["error"]
    assert [c for chunk in row["chunks"] for c in chunk] == want.codes and row["tokens"] == len(want.token_ids)


@pytest.mark.slow
def test_the_cli_agrees_with_the_python_api(fronts, reference, tmp_path):
    """`vita-audio chat` on a local Ray (the staged pipeline's actors): the same text, ids and codes (counts in
    its --json), and the decoder's audio of the same codes."""
    out = tmp_path / "answer.wav"
    argv = [sys.executable, "-m", "cli.main", "chat", QUESTION, "-o", str(out), "--models", str(fronts.models),
            "--mode", MODE, "--repetition-penalty", str(PENALTY), "--max-new-tokens", str(TOKENS), "--num-cpus", "2",
            "--json"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    want = reference["chat"]
    assert report["text"] == want.text
    assert (report["generated_tokens"], report["audio_codes"]) == (len(want.token_ids), len(want.codes))
    pcm, rate = soundfile.read(out, dtype="float32")
    assert rate == 22050 and len(pcm) == len(want.pcm)
    assert np.abs(pcm - want.pcm).max() < 2e-3  # the wav's 16 bits and the stages' own torch threads
