"""The /v1/realtime WebSocket through the unchanged openai SDK (`AsyncOpenAI().realtime.connect`): a spoken turn
and a text turn equal the in-process pipeline (greedy: same transcript, same audio resampled to 24 kHz, same
prompt), multi-turn history, a battery of bad events each answered by an `error` event on a session that goes
on, auth (1008 close; the browser's subprotocol key), response.cancel, and a client gone mid-answer freeing the
LLM. Every wait is bounded."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import soundfile

from serve_testing import API_KEY, clip, int16

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = 40
RATE = 24000  # the SDK's pcm16 rate, both ways
WAIT_S = 120.0


def connect(url: str, key: str = API_KEY, model: str = "vita-audio"):
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).realtime.connect(model=model)


async def until(conn, last: str, timeout: float = WAIT_S) -> list:
    """Events up to and including the first of type `last`."""
    events, deadline = [], time.monotonic() + timeout
    while not events or events[-1].type != last:
        events.append(await asyncio.wait_for(conn.recv(), max(deadline - time.monotonic(), 0.1)))
    return events


def pcm16(wav: bytes) -> bytes:
    samples, _ = soundfile.read(__import__("io").BytesIO(wav), dtype="int16")
    return samples.tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def answer(events) -> tuple[str, np.ndarray, object]:
    """Transcript (or text), 24 kHz pcm16 samples and response.done of one response's events."""
    text = "".join(e.delta for e in events if e.type in ("response.output_audio_transcript.delta",
                                                           "response.output_text.delta"))
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    return text, np.frombuffer(audio, "<i2"), events[-1]


def at_24k(pcm: np.ndarray) -> np.ndarray:
    import soxr

    return int16(soxr.ResampleStream(22050, RATE, 1, dtype="float32").resample_chunk(pcm, last=True))


async def speech_then_text(url: str) -> tuple[list, list, list]:
    async with connect(url) as conn:
        created = await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                           "max_output_tokens": TOKENS, "audio": {"input": {
                                               "format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None},
                                               "output": {"voice": "alloy"}}})
        updated = await until(conn, "session.updated")
        data = pcm16(clip(rate=RATE))
        await conn.input_audio_buffer.append(audio=b64(data[:10000]))
        await conn.input_audio_buffer.append(audio=b64(data[10000:]))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        spoken = await until(conn, "response.done")
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "And now?"}]})
        await conn.response.create(response={"output_modalities": ["text"]})
        typed = await until(conn, "response.done")
        return created + updated, spoken, typed


@pytest.fixture(scope="module")
def two_turns(serve_url):
    return asyncio.run(speech_then_text(serve_url))


def test_spoken_turn_matches_pipeline(two_turns, local):
    from actors.results import collect

    setup, spoken, _ = two_turns
    assert [e.type for e in setup] == ["session.created", "session.updated"]
    session = setup[-1].session
    assert session.audio.input.turn_detection is None and session.audio.output.format.rate == RATE
    types = [e.type for e in spoken]
    assert types[:3] == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    assert "response.created" in types and types[-1] == "response.done"
    expected = collect(local.chat(clip(rate=RATE), max_new_tokens=TOKENS))
    text, audio, done = answer(spoken)
    assert expected.ok and len(audio) and text == expected.text
    np.testing.assert_array_equal(audio, at_24k(expected.pcm))
    usage = done.response.usage
    assert done.response.status == ("incomplete" if expected.done.reason == "length" else "completed")
    assert usage.output_tokens == len(expected.token_ids)
    assert usage.input_tokens == expected.done.usage["llm"]["prompt_tokens"]
    assert usage.input_token_details.audio_tokens == expected.done.usage["encoder"]["codes"] > 0
    assert usage.output_token_details.audio_tokens == len(expected.audio_codes) > 0
    assert done.response.output[0].content[0].transcript == text


def test_text_turn_after_it_carries_the_history(two_turns, local):
    """Turn 2 (text in, text out) sees turn 1 as chat completions would: the user's clip by its codes, the
    spoken answer by its transcript."""
    from actors.results import collect
    from pipeline.audio import load_audio

    _, spoken, typed = two_turns
    history = [{"role": "user", "content": "\n<|audio|>",
                "audios": [local.encoder.encode(load_audio(clip(rate=RATE)), 16000)]},
               {"role": "assistant", "content": answer(spoken)[0]}]
    expected = collect(local.chat("And now?", history=history, constraint="text", max_new_tokens=TOKENS))
    text, audio, done = answer(typed)
    assert text == expected.text and not len(audio)
    assert not any(e.type.startswith("response.output_audio") for e in typed)
    assert done.response.usage.input_tokens == expected.done.usage["llm"]["prompt_tokens"]
    assert done.response.output_modalities == ["text"]


BAD_EVENTS = [  # (raw message, expected error code or param)
    ("not json", "invalid_json"),
    (json.dumps([1, 2]), "invalid_event"),
    (json.dumps({"type": "conversation.nope"}), "invalid_event"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}), "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 12}), "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\x00" * 3)}), "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\x00\x01" * RATE * 7)}), "max_audio_seconds"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
    (json.dumps({"type": "response.create"}), "conversation_empty"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}),
     "unsupported_turn_detection"),
    (json.dumps({"type": "session.update", "session": {"output_modalities": "audio"}}), "session.output_modalities"),
    (json.dumps({"type": "session.update", "session": {"max_output_tokens": 100_000}}), "max_tokens"),
    (json.dumps({"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcm",
                                                                                          "rate": 16000}}}}}),
     "session.audio.output.format.rate"),
    (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}}),
     "session.audio.output.voice"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": "x" * 201}]}}),
     "max_text_chars"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant",
                                                              "content": [{"type": "input_audio", "audio": "AAAA"}]}}),
     "item.content[0].type"),
]


async def bad_events_then_a_turn(url: str):
    async with connect(url) as conn:
        await until(conn, "session.created")
        errors = []
        for i, (raw, _) in enumerate(BAD_EVENTS):
            data = json.loads(raw) if raw.startswith("{") else None
            if data is not None:
                raw = json.dumps({**data, "event_id": f"bad-{i}"})
            await conn.send_raw(raw)
            errors.append((await until(conn, "error", 30))[-1].error)
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Still there?"}]})
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 8})
        return errors, await until(conn, "response.done")


def test_bad_events_get_error_events_and_the_session_goes_on(serve_url):
    errors, after = asyncio.run(bad_events_then_a_turn(serve_url))
    for (raw, expected), error in zip(BAD_EVENTS, errors):
        assert expected in (error.code, error.param), (raw[:80], error)
        assert error.type == "invalid_request_error" and error.message
        if raw.startswith("{"):
            assert error.event_id == f"bad-{BAD_EVENTS.index((raw, expected))}"
    assert after[-1].response.status in ("completed", "incomplete")
    assert not any(e.type == "error" for e in after)


async def refused(url: str, key: str, model: str = "vita-audio"):
    from websockets.exceptions import ConnectionClosed

    async with connect(url, key, model) as conn:
        error = await asyncio.wait_for(conn.recv(), 30)
        try:
            await asyncio.wait_for(conn.recv(), 30)
        except ConnectionClosed as closed:
            return error, closed.rcvd.code
    return error, None


async def browser_handshake(url: str) -> tuple[str | None, str]:
    """A browser sends the key as a subprotocol (it cannot set headers)."""
    import websockets

    ws_url = url.replace("http://", "ws://") + "/v1/realtime?model=vita-audio"
    async with websockets.connect(ws_url, subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"]) as ws:
        return ws.subprotocol, json.loads(await asyncio.wait_for(ws.recv(), 30))["type"]


def test_auth_or_model_refusal_closes_with_1008_and_the_browser_key_works(serve_url):
    for key in ("wrong-key", ""):
        error, code = asyncio.run(refused(serve_url, key or "-"))
        assert error.type == "error" and error.error.code == "invalid_api_key" and code == 1008
    error, code = asyncio.run(refused(serve_url, API_KEY, "gpt-realtime"))
    assert error.error.code == "model_not_found" and error.error.param == "model" and code == 1008
    assert asyncio.run(browser_handshake(serve_url)) == ("realtime", "session.created")


def test_the_web_page_is_served(serve_url):
    import httpx

    page = httpx.get(f"{serve_url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/realtime" in page.text and "<script src" not in page.text  # no external scripts


def stage_stats(stage: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"vita-{stage}", app_name="vita").stats.remote().result(timeout_s=30)


def wait_idle(timeout: float = 15.0) -> tuple[dict, dict]:
    deadline = time.monotonic() + timeout
    while True:
        llm, decoder = stage_stats("llm"), stage_stats("decoder")
        if (llm["active"] == 0 and decoder["open_streams"] == 0) or time.monotonic() > deadline:
            return llm, decoder
        time.sleep(0.1)


async def long_answer(conn) -> None:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": "Tell me everything."}]})
    await conn.response.create(response={"max_output_tokens": 512})
    await until(conn, "response.output_audio.delta")


async def cancel_then_leave(url: str):
    async with connect(url) as conn:
        await until(conn, "session.created")
        await long_answer(conn)
        await conn.response.cancel()
        cancelled = (await until(conn, "response.done"))[-1]
        idle_after_cancel = await asyncio.to_thread(wait_idle)
        await long_answer(conn)  # the session goes on; then the client leaves mid-answer
    return cancelled, idle_after_cancel


def test_cancel_and_a_client_gone_mid_answer_free_the_llm(serve_url):
    cancelled, (llm, decoder) = asyncio.run(cancel_then_leave(serve_url))
    assert cancelled.response.status == "cancelled"
    assert cancelled.response.status_details.reason == "client_cancelled"
    assert llm["active"] == 0 and decoder["open_streams"] == 0, (llm, decoder)
    llm, decoder = wait_idle()
    assert llm["active"] == 0 and decoder["open_streams"] == 0, (llm, decoder)


# ---------------------------------------------------------------------------------------------------------
# The session alone (no Serve): prompt building and truncation


def new_session(**caps):
    from serve.realtime import Session
    from serve.voices import VoiceStore

    return Session({"max_tokens": 512, "max_text_chars": 200, "max_audio_seconds": 6.0, **caps}, VoiceStore())


def send(session, **event) -> list[dict]:
    from serve.realtime_events import parse

    event = parse(event)
    return {"conversation.item.create": session.create_item, "input_audio_buffer.append": session.append,
            "input_audio_buffer.commit": session.commit}[event.type](event)


def test_a_user_item_with_text_and_audio_is_split_as_chat_completions_does():
    from serve.realtime_events import ResponseParams

    session = new_session()
    audio = b64(pcm16(clip(rate=RATE)))
    send(session, type="conversation.item.create", item={"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Listen:"}, {"type": "input_audio", "audio": audio}]})
    request = session.plan(ResponseParams()).request()
    assert request["history"] == [{"role": "user", "content": "Listen:", "audios": []}]
    assert soundfile.info(__import__("io").BytesIO(request["audio"])).samplerate == RATE
    assert request["constraint"] != "text" and "text" not in request
    assert request["max_new_tokens"] == 512  # max_output_tokens "inf" (the default): up to the caps' max_tokens


def test_old_items_beyond_the_caps_leave_the_prompt_and_the_session():
    from serve.realtime_events import ResponseParams

    session = new_session(max_audio_seconds=2.5)
    second = pcm16(clip(rate=RATE))  # 1 s
    for _ in range(4):
        send(session, type="input_audio_buffer.append", audio=b64(second))
        send(session, type="input_audio_buffer.commit")
    assert len(session.messages) == 2  # the newest 2 s of the 4 committed
    plan = session.plan(ResponseParams(output_modalities=["text"]))
    assert len(plan.messages) == 2 and plan.history_clips() == [plan.messages[0].clips[0]]
    plan.messages[0].clips[0].codes = [1, 2, 3]
    request = plan.request()
    assert request["history"] == [{"role": "user", "content": "\n<|audio|>", "audios": [[1, 2, 3]]}]
    assert request["constraint"] == "text"


def test_a_response_a_stage_failed_ends_with_an_error_and_response_done_failed():
    """A run that ends in an ErrorEvent (a stage down or at capacity): the client gets the error event and a
    `response.done` with status failed, and the empty answer does not join later prompts."""
    from serve.api import APIError
    from serve.realtime import Response
    from serve.realtime_events import ResponseParams

    session = new_session()
    send(session, type="conversation.item.create",
         item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]})
    response = Response(session, session.plan(ResponseParams(output_modalities=["text"])))
    response.started()
    events = response.failed(APIError(503, "llm stage is at capacity. Retry later.", type="server_error",
                                      code="overloaded"))
    assert events[0]["type"] == "error" and events[0]["error"]["code"] == "overloaded"
    done = events[-1]
    assert done["type"] == "response.done" and done["response"]["status"] == "failed"
    assert done["response"]["status_details"]["error"]["code"] == "overloaded"
    assert [m.role for m in session.messages] == ["user"]
    assert [e["type"] for e in response.failed(APIError(503, "again"))] == ["error"]  # one response.done only
