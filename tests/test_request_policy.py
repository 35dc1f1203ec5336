"""One request policy (actors.requests): every bad mode, sampling value, max-tokens and text case is refused with
the same message by the builder, the CLI (exit 2, one stderr line, before Ray), Serve HTTP (400, the ingress
in-process), realtime (an error event) and the batch job (its settings refused, a bad row an error row).

Front ends name a field their own way (`--top-p`, `top_p`, `session.top_p`); the messages are compared with
those names mapped back to the builder's. The caps an operator sets on Serve (max_tokens, max_text_chars) are
raised here so that the model's own caps (positions) decide, as they do on the CLI.
"""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve_testing import local_ingress

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
LONG = "x" * 100_000  # ~25k tokens: with the answer it does not fit the tiny model's positions
POSITIONS_OVER = 40_000  # over the tiny model's 32768 positions
APP_ARGS = {"max_tokens": 10**6, "max_text_chars": 10**6, "max_body_bytes": 8 * 2**20}

# (case, the request's fields by the builder's names); each must be refused
OPTION_CASES = [
    ("mode 0,10", {"mode": "0,10"}),
    ("mode name", {"mode": "warp"}),
    ("mode odd list", {"mode": "1,10,4"}),
    ("mode not integers", {"mode": "1,x"}),
    ("mode huge", {"mode": "1,99999999999999999999"}),
    ("temperature high", {"temperature": 2.5}),
    ("temperature negative", {"temperature": -1.5}),
    ("top_p over 1", {"temperature": 0.5, "top_p": 1.5}),
    ("top_k greedy", {"top_k": 5}),
    ("top_k negative", {"temperature": 0.5, "top_k": -3}),
    ("seed greedy", {"seed": 3}),
    ("seed negative", {"temperature": 0.5, "seed": -3}),
    ("repetition penalty", {"repetition_penalty": -0.5}),
    ("max tokens over positions", {"max_new_tokens": POSITIONS_OVER}),
]
TEXT_CASES = [
    ("empty text", "   "),
    ("audio placeholder", "say <|audio|> twice"),
    ("text over positions", LONG),
]
CLI_FLAGS = {"mode": "--mode", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
             "seed": "--seed", "repetition_penalty": "--repetition-penalty", "max_new_tokens": "--max-new-tokens"}


def canonical(message: str, names: dict[str, str]) -> str:
    """A front end's message with its field names mapped to the builder's (longest names first)."""
    for name in sorted(names, key=len, reverse=True):
        message = message.replace(name, names[name])
    return message


@pytest.fixture(scope="module")
def caps(tiny_models):
    from actors.requests import model_caps

    return model_caps(tiny_models / "llm")


def builder_message(caps, fields: dict | None = None, text: str | None = None) -> str:
    from actors.errors import InputError
    from actors.requests import check_text, request_options

    with pytest.raises(InputError) as err:
        options = request_options(**(fields or {}), caps=caps)
        check_text(text, "text", caps, options.max_new_tokens)
    return str(err.value)


@pytest.fixture(scope="module")
def expected(caps):
    table = {case: builder_message(caps, fields) for case, fields in OPTION_CASES}
    table.update({case: builder_message(caps, text=text) for case, text in TEXT_CASES})
    return table


def test_the_builder_names_the_field_and_is_torch_and_ray_free(expected):
    assert expected["mode 0,10"].startswith("mode: [0, 10] must start with a backbone step")
    assert expected["top_k greedy"].startswith("top_k: only applies when sampling")
    assert expected["max tokens over positions"] == ("max_new_tokens: 40000 is more than the model's 32768 "
                                                     "positions (llm/config.json max_position_embeddings)")
    assert expected["text over positions"].startswith("text: ") and "do not fit" in expected["text over positions"]
    code = ("import sys, actors.requests, actors.orchestration, jobs.batch.job, cli.speech; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_greedy_and_sampling_are_built_one_way():
    from actors.requests import build_sampling, parse_mode
    from pipeline.engine.sampling_params import SamplingParams

    assert build_sampling() is None and build_sampling(temperature=0) is None  # greedy: the engine's default
    assert build_sampling(repetition_penalty=1.3) == SamplingParams(repetition_penalty=1.3)
    assert build_sampling(0.7, 40, 0.9, 1.1, 5) == SamplingParams(greedy=False, temperature=0.7, top_k=40, top_p=0.9,
                                                                  repetition_penalty=1.1, seed=5)
    assert parse_mode("Boost") == "boost" and parse_mode("[1, 10, 4, 10]") == [1, 10, 4, 10]
    assert parse_mode((2, 3)) == [2, 3] and parse_mode(None) is None


# ---------------------------------------------------------------------------------------------------------
# the CLI: exit 2, one stderr line, before Ray


def _cli_argv(tiny_models, tmp_path, fields: dict | None = None, text: str = "hi") -> list[str]:
    argv = [sys.executable, "-m", "cli.main", "tts", text, "-o", str(tmp_path / "out.wav"), "--models", str(tiny_models)]
    for name, value in (fields or {}).items():
        argv += [CLI_FLAGS[name], str(value)]
    return argv


@pytest.mark.parametrize("case", [c for c, _ in OPTION_CASES] + [c for c, _ in TEXT_CASES])
def test_cli_refuses_with_the_builders_message(case, expected, tiny_models, tmp_path):
    fields, text = dict(OPTION_CASES).get(case), dict(TEXT_CASES).get(case, "hi")
    argv = _cli_argv(tiny_models, tmp_path, fields, text)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Ray" not in proc.stderr and "starting" not in proc.stderr
    message = lines[0].removeprefix("vita-audio tts: error: ")
    names = {flag: name for name, flag in CLI_FLAGS.items()} | {"TEXT": "text"}
    assert canonical(message, names) == expected[case]


# ---------------------------------------------------------------------------------------------------------
# Serve HTTP and realtime: the ingress in-process


@pytest.fixture(scope="module")
def ingress(tiny_models):
    with local_ingress(tiny_models, **APP_ARGS) as client:
        yield client


HTTP_NAMES = {"input": "text"}
REALTIME_NAMES = {"session.": "", "response.": "", "max_output_tokens": "max_new_tokens",
                  "item.content[0].text": "text"}


@pytest.mark.parametrize("case", [c for c, _ in OPTION_CASES] + [c for c, _ in TEXT_CASES])
def test_http_refuses_with_the_builders_message(case, expected, ingress):
    body = {"model": "vita-audio", "input": dict(TEXT_CASES).get(case, "hi"), **dict(OPTION_CASES).get(case, {})}
    for route, extra in (("/v1/audio/speech", {}),):
        r = ingress.post(route, json={**body, **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert canonical(error["message"], HTTP_NAMES) == expected[case]
        assert error["param"] in ("input", *dict(OPTION_CASES).get(case, {}))


def test_chat_and_transcriptions_use_the_same_policy(expected, ingress):
    from serve_testing import clip

    chat = {"model": "vita-audio", "messages": [{"role": "user", "content": "hi"}], "mode": "0,10"}
    assert ingress.post("/v1/chat/completions", json=chat).json()["error"]["message"] == expected["mode 0,10"]
    chat = {**chat, "mode": None, "max_tokens": POSITIONS_OVER}
    assert (ingress.post("/v1/chat/completions", json=chat).json()["error"]["message"]
            == expected["max tokens over positions"].replace("max_new_tokens", "max_tokens"))
    form = {"model": "vita-audio", "temperature": "0.5", "top_p": "1.5"}
    r = ingress.post("/v1/audio/transcriptions", data=form, files={"file": ("a.wav", clip(), "audio/wav")})
    assert r.status_code == 400 and r.json()["error"]["message"] == expected["top_p over 1"]
    form = {"model": "vita-audio", "repetition_penalty": "-0.5"}  # every front end can set every field
    r = ingress.post("/v1/audio/transcriptions", data=form, files={"file": ("a.wav", clip(), "audio/wav")})
    assert r.json()["error"]["message"] == expected["repetition penalty"]


def _realtime_error(ingress, events: list[dict]) -> dict:
    error = None
    try:
        with ingress.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["type"] == "session.created"
            for event in events:
                ws.send_json(event)
                while error is None:
                    reply = ws.receive_json()
                    if reply["type"] == "error":
                        error = reply["error"]
                    elif reply["type"] in ("session.updated", "conversation.item.done", "response.done"):
                        break
                if error is not None:
                    break
    except concurrent.futures.CancelledError:
        # the TestClient cancels the socket's task right after its close frame; the session's cleanup awaits
        # (anyio re-cancels each) can end that task as cancelled: a harness race, not the refusal under test
        pass
    if error is None:
        raise AssertionError(f"no error event for {events}")
    return error


@pytest.mark.parametrize("case", [c for c, _ in OPTION_CASES] + [c for c, _ in TEXT_CASES])
def test_realtime_refuses_with_the_builders_message(case, expected, ingress):
    fields = dict(OPTION_CASES).get(case)
    if fields is not None:
        if "max_new_tokens" in fields:
            fields = {"max_output_tokens": fields["max_new_tokens"]}
        events = [{"type": "session.update", "session": fields}]
    else:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": dict(TEXT_CASES)[case]}]}
        events = [{"type": "conversation.item.create", "item": item},
                  {"type": "response.create", "response": {"output_modalities": ["text"], "max_output_tokens": 256}}]
    error = _realtime_error(ingress, events)
    assert canonical(error["message"], REALTIME_NAMES) == expected[case]


# ---------------------------------------------------------------------------------------------------------
# the batch job: its settings refused when made, a bad row an error row


# (a job's seed is the base of each request's own, so it stands without sampling; max tokens meet the model per row)
@pytest.mark.parametrize("case", [c for c, _ in OPTION_CASES if c not in ("max tokens over positions", "seed greedy")])
def test_batch_settings_are_refused_with_the_builders_message(case, expected):
    from actors.errors import InputError
    from jobs.batch.callables import DecodeOptions

    with pytest.raises(InputError) as err:
        DecodeOptions(**dict(OPTION_CASES)[case])
    assert str(err.value) == expected[case]


@pytest.fixture(scope="module")
def batch_llm(tiny_models):
    from actors.config import PipelineConfig
    from jobs.batch.callables import DecodeOptions, SpeechLLM

    config = PipelineConfig.from_models_dir(tiny_models).with_resources(num_gpus=0)
    return SpeechLLM(config.llm, "tts", DecodeOptions(max_new_tokens=8))


def test_batch_rows_with_bad_text_are_error_rows_with_the_builders_message(expected, caps, batch_llm):
    from jobs.batch.callables import DecodeOptions

    rows = [{"id": case, "text": text} for case, text in TEXT_CASES] + [{"id": "good", "text": "Hello there."}]
    out = {row["id"]: row for row in batch_llm(rows).to_pylist()}
    for case, text in TEXT_CASES:  # (the job's max_new_tokens 8 beside the text)
        assert out[case]["status"] == "error"
        assert out[case]["error"] == f"input: {builder_message(caps, {'max_new_tokens': 8}, text)}"
    assert out["good"]["status"] == "ok" and out["good"]["chunks"]
    batch_llm.options = DecodeOptions(max_new_tokens=POSITIONS_OVER)  # no cap when made: the model's, per row
    try:
        row = batch_llm([{"id": "long", "text": "Hello there."}]).to_pylist()[0]
    finally:
        batch_llm.options = DecodeOptions(max_new_tokens=8)
    assert row["error"] == f"input: {expected['max tokens over positions']}"


def test_python_api_refuses_before_any_stage_work(expected, tiny_models):
    """run_request (the path of `StagedPipeline` / `LocalPipeline`.tts/asr/chat) applies the same policy: one input
    ErrorEvent, no stage call. Its sampling is a SamplingParams, from the same builder."""
    import asyncio

    from actors.orchestration import Limits, run_request
    from actors.payloads import ErrorEvent
    from actors.requests import model_caps

    class NoStages:
        def __getattr__(self, name):
            raise AssertionError(f"stage call {name} for a refused request")

    async def events(**options):
        return [e async for e in run_request(NoStages(), Limits(), "tts", caps=model_caps(tiny_models / "llm"),
                                             **options)]

    requests = {case: {"text": "hi", **fields} for case, fields in OPTION_CASES if set(fields) <= {"mode", "max_new_tokens"}}
    requests.update({case: {"text": text} for case, text in TEXT_CASES})
    for case, request in requests.items():
        out = asyncio.run(events(**request))
        assert len(out) == 1 and isinstance(out[0], ErrorEvent) and out[0].stage == "input", case
        assert out[0].message == expected[case], case


def test_the_cli_output_layout_is_never_forced_by_the_front_end(tiny_models):
    """`--constraint auto` (the default) goes to the LLM stage as "auto"; the stage decides by its checkpoint."""
    import argparse

    from cli import speech

    args = argparse.Namespace(mode=None, max_new_tokens=8, temperature=None, top_k=None, top_p=None,
                              repetition_penalty=None, seed=None, constraint="auto")
    assert speech.request_options(args)["constraint"] == "auto"
    assert json.dumps(speech.request_options(args)["sampling"]) == "null"
