"""Hands-free /v1/realtime through the unchanged openai SDK (`AsyncOpenAI().realtime.connect`) on its own Serve
app (one ingress replica on a SQLite state store; tests/test_realtime_replicas.py resumes on another replica):
server VAD over a microphone paced in real time (two utterances 1.5 s apart, longer only while a loaded machine
still makes the first answer; then a third that starts during the second answer and cancels it, no audio of it
after the speech start), input transcriptions, the truncated answer in the history; sessions that resume within
the grace period (the earlier turns, the events the dropped socket missed) and not after it, nor with another
key's token; an idle session closed after idle_timeout_ms; the per-key session cap; and a battery of bad or
hostile inputs, each an `error` event in OpenAI's shape on a session and a server that go on. Every wait is
bounded."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import soundfile
import soxr

from serve_testing import API_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 24000  # the SDK's pcm16 rate
OTHER_KEY = "other-realtime-key"
GRACE_S = 3.0
SESSIONS_PER_KEY = 3
SHORT = 12  # tokens of an answer that should end (and finish playing) before the next utterance
WAIT_S = 120.0
CHUNK_S = 0.1  # the client sends 100 ms of audio every 100 ms
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


@pytest.fixture(scope="module")
def app_url(ray_session, tiny_models, tmp_path_factory):
    from serve_testing import serve_app

    keys = tmp_path_factory.mktemp("realtime-vad") / "keys.txt"
    keys.write_text(f"{OTHER_KEY} other\n")
    with serve_app(tiny_models, api_keys_file=str(keys), ingress={"min_replicas": 1, "max_replicas": 1},
                   realtime_resume_grace_s=GRACE_S, realtime_sessions_per_key=SESSIONS_PER_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def utterances(shared_dir) -> list[np.ndarray]:
    """Three mini-speech questions as 24 kHz int16."""
    out = []
    for name in ("q01", "q02", "q03"):
        audio, rate = soundfile.read(shared_dir / "corpora" / "mini-speech" / "qa_wavs" / f"{name}.wav",
                                     dtype="float32")
        out.append((np.clip(soxr.resample(audio, rate, RATE), -1, 1) * 32767).astype(np.int16))
    return out


def connect(url: str, key: str = API_KEY, on_reconnecting=None, **query):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    return client.realtime.connect(model="vita-audio", extra_query=query, on_reconnecting=on_reconnecting,
                                   max_retries=2)


async def until(conn, last: str, timeout: float = WAIT_S, into: list | None = None) -> list:
    """Events up to and including the first of type `last`."""
    events, deadline = [] if into is None else into, time.monotonic() + timeout
    start = len(events)
    while len(events) == start or events[-1].type != last:
        events.append(await asyncio.wait_for(conn.recv(), max(deadline - time.monotonic(), 0.1)))
    return events[start:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.int16)


async def paced(conn, audio: np.ndarray) -> None:
    """Stream `audio` as a microphone would: CHUNK_S of it every CHUNK_S seconds."""
    step, start = int(CHUNK_S * RATE), time.monotonic()
    for n, i in enumerate(range(0, len(audio), step)):
        await conn.input_audio_buffer.append(audio=b64(audio[i:i + step].tobytes()))
        await asyncio.sleep(max(0.0, start + (n + 1) * CHUNK_S - time.monotonic()))


# ---------------------------------------------------------------------------------------------------------
# Hands-free: two turns, then a barge-in


async def conversation(url: str, utterances: list[np.ndarray]) -> dict:
    """A microphone paced in real time: the first utterance, 1.5 s of silence, the second (on a machine too loaded
    to make the short first answer within those 1.5 s, the silence goes on until it is made: else the second
    utterance would rightly cancel it), silence until the second answer's audio comes, then the third utterance
    over it. Each answer's length is set while the one before is made (a response takes the session's
    max_output_tokens when it is created): the first short, the second long (still playing at the third), the
    third short."""
    async with connect(url) as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "max_output_tokens": SHORT, "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": VAD,
            "transcription": {"model": "vita-audio"}}}})
        setup = await until(conn, "session.updated")
        events: list = []
        first_made, second_answer_audio, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def receive():
            responses = 0
            while True:
                event = await asyncio.wait_for(conn.recv(), WAIT_S)
                events.append(event)
                if event.type == "response.created":
                    responses += 1
                    tokens = {1: "inf", 2: SHORT}.get(responses)
                    if tokens is not None:
                        await conn.session.update(session={"type": "realtime", "max_output_tokens": tokens})
                elif event.type == "response.done" and responses == 1:
                    first_made.set()
                elif event.type == "response.output_audio.delta" and responses == 2:
                    second_answer_audio.set()
                elif event.type == "response.done" and responses == 3:
                    done.set()
                    return

        async def quiet_until(event: asyncio.Event) -> None:
            """The microphone goes on (silence) while the user listens."""
            while not event.is_set():
                await paced(conn, silence(CHUNK_S))

        receiver = asyncio.create_task(receive())
        first, second, third = utterances
        await paced(conn, np.concatenate([silence(0.5), first, silence(1.5)]))
        await asyncio.wait_for(quiet_until(first_made), WAIT_S)
        await paced(conn, second)
        await asyncio.wait_for(quiet_until(second_answer_audio), WAIT_S)  # the third starts during the 2nd answer
        await paced(conn, np.concatenate([third, silence(1.0)]))
        await asyncio.wait_for(quiet_until(done), WAIT_S)
        await receiver
        answers = [e for e in events if e.type == "response.done"]
        second_item = answers[1].response.output[0].id
        await conn.conversation.item.retrieve(item_id=second_item)
        retrieved = (await until(conn, "conversation.item.retrieved"))[-1]
        return {"setup": setup, "events": events, "retrieved": retrieved}


@pytest.fixture(scope="module")
def hands_free(app_url, utterances):
    return asyncio.run(conversation(app_url, utterances))


@pytest.mark.slow
def test_server_vad_finds_the_turns_and_answers_them(hands_free, utterances):
    session = hands_free["setup"][-1].session
    detection = session.audio.input.turn_detection
    assert detection.type == "server_vad" and detection.silence_duration_ms == 500
    assert detection.create_response and detection.interrupt_response and detection.prefix_padding_ms == 300
    events = hands_free["events"]
    started = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert len(started) == len(stopped) == len(committed) == 3
    assert [e.item_id for e in started] == [e.item_id for e in stopped] == [e.item_id for e in committed]
    first_end_ms = (0.5 + len(utterances[0]) / RATE) * 1000
    assert 400 <= started[0].audio_start_ms < stopped[0].audio_end_ms <= first_end_ms + 100
    assert started[1].audio_start_ms - stopped[0].audio_end_ms >= 1400  # at least the 1.5 s of silence between
    for start, stop in zip(started, stopped):
        assert events.index(start) < events.index(stop)
    # each turn: committed, then its answer (the user's item is the answer's previous item)
    created = [e for e in events if e.type == "response.created"]
    assert len(created) == 3
    for commit, response in zip(committed, created):
        assert events.index(commit) < events.index(response)
    answers = [e for e in events if e.type == "response.done"]
    assert answers[0].response.status in ("completed", "incomplete")
    assert answers[2].response.status in ("completed", "incomplete")


@pytest.mark.slow
def test_each_turn_is_transcribed_by_the_models_asr(hands_free):
    events = hands_free["events"]
    turns = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    completed = {e.item_id: e for e in events if e.type == "conversation.item.input_audio_transcription.completed"}
    assert set(turns[:2]) <= set(completed)
    for item_id in turns[:2]:
        deltas = "".join(e.delta for e in events
                         if e.type == "conversation.item.input_audio_transcription.delta" and e.item_id == item_id)
        assert completed[item_id].transcript == deltas and completed[item_id].transcript
    assert not any(e.type == "conversation.item.input_audio_transcription.failed" for e in events)


@pytest.mark.slow
def test_speech_during_the_second_answer_cancels_it_and_keeps_what_was_heard(hands_free):
    events = hands_free["events"]
    answers = [e for e in events if e.type == "response.done"]
    second = answers[1]
    assert second.response.status == "cancelled" and second.response.status_details.reason == "turn_detected"
    rid, item_id = second.response.id, second.response.output[0].id
    done_at = events.index(second)
    third_start = [e for e in events if e.type == "input_audio_buffer.speech_started"][2]
    assert events.index(third_start) < done_at  # the third utterance's start is what cancelled it
    deltas = [i for i, e in enumerate(events) if e.type == "response.output_audio.delta" and e.response_id == rid]
    # the answer is stopped before the speech start is sent: no audio of it after that event, nor after its end
    assert deltas and max(deltas) < events.index(third_start) < done_at
    sent_ms = sum(len(base64.b64decode(events[i].delta)) for i in deltas) / 2 / RATE * 1000
    truncated = [e for e in events if e.type == "conversation.item.truncated" and e.item_id == item_id]
    assert len(truncated) == 1 and 0 <= truncated[0].audio_end_ms <= sent_ms + 1
    said = "".join(e.delta for e in events
                   if e.type == "response.output_audio_transcript.delta" and e.response_id == rid)
    item = hands_free["retrieved"].item
    assert item.id == item_id and item.status == "incomplete"
    kept = item.content[0].transcript or ""
    assert said.startswith(kept) and len(kept) <= len(said)


# ---------------------------------------------------------------------------------------------------------
# Sessions that survive the network


async def text_turn(conn, text: str, tokens: int = 8) -> list:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": tokens})
    return await until(conn, "response.done")


async def drop_and_resume(url: str) -> dict:
    """The SDK's own reconnection (`on_reconnecting`) with the resume token: the socket drops (no close frame,
    as when the network goes) in the middle of a spoken answer, the SDK reconnects and the session goes on."""
    token = {}
    reconnects = []

    def resume(event):
        reconnects.append(event.close_code)
        return {"extra_query": {"resume": token["value"]}}

    async with connect(url, on_reconnecting=resume) as conn:
        created = (await until(conn, "session.created"))[-1]
        token["value"] = created.resume_token
        first = await text_turn(conn, "Hello there.")
        # a long spoken answer, then the socket drops in the middle of it
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Tell me more."}]})
        await conn.response.create(response={"max_output_tokens": 512})
        await until(conn, "response.output_audio.delta")
        conn._connection.transport.abort()  # the network drops
        events = []

        async def through_the_drop():  # the SDK reconnects while iterated
            async for event in conn:
                events.append(event)
                if event.type == "response.done" and any(e.type == "session.created" for e in events):
                    return

        await asyncio.wait_for(through_the_drop(), 60)
        # what was already on its way, then the new socket: session.created and the events it missed
        resumed = events[max(i for i, e in enumerate(events) if e.type == "session.created"):]
        item_id = first[-1].response.output[0].id
        await conn.conversation.item.retrieve(item_id=item_id)
        retrieved = (await until(conn, "conversation.item.retrieved"))[-1]
        later = await text_turn(conn, "And now?")
    return {"created": created, "first": first, "resumed": resumed, "retrieved": retrieved, "later": later,
            "reconnects": reconnects}


async def refused(url: str, key: str = API_KEY, **query) -> tuple[object, int | None]:
    from websockets.exceptions import ConnectionClosed

    async with connect(url, key, **query) as conn:
        error = await asyncio.wait_for(conn.recv(), 30)
        try:
            await asyncio.wait_for(conn.recv(), 30)
        except ConnectionClosed as closed:
            return error, closed.rcvd.code
    return error, None


def test_a_dropped_session_resumes_within_the_grace_period(app_url):
    run = asyncio.run(drop_and_resume(app_url))
    created, resumed = run["created"], run["resumed"]
    assert created.resume_token.startswith(created.session.id + ".")
    assert run["reconnects"] == [1006]
    assert resumed[0].type == "session.created" and resumed[0].session.id == created.session.id
    missed = resumed[1:]  # the answer that was cut off: cancelled at the drop, its end replayed
    assert missed and missed[-1].type == "response.done" and missed[-1].response.status == "cancelled"
    assert run["retrieved"].item.id == run["first"][-1].response.output[0].id
    assert run["later"][-1].response.status in ("completed", "incomplete")


async def resume_after(url: str, wait_s: float):
    async with connect(url) as conn:
        token = (await until(conn, "session.created"))[-1].resume_token
        conn._connection.transport.abort()  # dropped: resumable for GRACE_S
    other = await refused(url, OTHER_KEY, resume=token)  # another key's token: refused at once
    await asyncio.sleep(wait_s)
    return other, await refused(url, resume=token)


def test_resume_is_refused_after_the_grace_period_and_for_another_key(app_url):
    other, late = asyncio.run(resume_after(app_url, GRACE_S + 1.5))
    for error, code in (other, late):
        assert error.type == "error" and error.error.code == "session_not_found" and code == 1008
        assert error.error.param == "resume" and "grace period" in error.error.message


async def idle(url: str) -> tuple[list, int | None]:
    from websockets.exceptions import ConnectionClosed

    async with connect(url) as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {
            "turn_detection": {**VAD, "idle_timeout_ms": 5000}}}})
        events, started = await until(conn, "session.updated"), time.monotonic()
        await conn.input_audio_buffer.append(audio=b64(silence(1.0).tobytes()))  # silence is no speech
        try:
            while True:
                events.append(await asyncio.wait_for(conn.recv(), 30))
        except ConnectionClosed as closed:
            return events, closed.rcvd.code, time.monotonic() - started


def test_an_idle_session_is_closed_after_idle_timeout_ms(app_url):
    events, code, _ = asyncio.run(idle(app_url))
    types = [e.type for e in events]
    assert types[-2:] == ["input_audio_buffer.timeout_triggered", "error"] and code == 1000
    assert events[-1].error.code == "idle_timeout" and "idle_timeout_ms=5000" in events[-1].error.message


async def over_the_cap(url: str):
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        for _ in range(SESSIONS_PER_KEY):
            conn = await stack.enter_async_context(connect(url, OTHER_KEY))
            await until(conn, "session.created")
        return await refused(url, OTHER_KEY)


def test_a_key_holds_at_most_its_session_cap(app_url):
    error, code = asyncio.run(over_the_cap(app_url))
    assert error.error.code == "session_limit" and code == 1008


# ---------------------------------------------------------------------------------------------------------
# Bad and hostile inputs


def session_update(**input_audio) -> str:
    return json.dumps({"type": "session.update", "session": {"audio": {"input": input_audio}}})


def vad(**fields) -> str:
    return session_update(turn_detection={**VAD, **fields})


BAD = [  # (raw event, expected error code or param)
    (vad(threshold=1.5), "session.audio.input.turn_detection.threshold"),
    (vad(threshold=-0.1), "session.audio.input.turn_detection.threshold"),
    (vad(threshold="high"), "session.audio.input.turn_detection.threshold"),
    (vad(prefix_padding_ms=-1), "session.audio.input.turn_detection.prefix_padding_ms"),
    (vad(silence_duration_ms=600_000), "session.audio.input.turn_detection.silence_duration_ms"),
    (vad(silence_duration_ms=0.5), "session.audio.input.turn_detection.silence_duration_ms"),
    (vad(idle_timeout_ms=100), "session.audio.input.turn_detection.idle_timeout_ms"),
    (vad(create_response="yes"), "session.audio.input.turn_detection.create_response"),
    (vad(eagerness="high"), "session.audio.input.turn_detection.eagerness"),
    (vad(type="semantic_vad"), "unsupported_turn_detection"),
    (vad(type="push_to_talk"), "unsupported_turn_detection"),
    (session_update(turn_detection="server_vad"), "session.audio.input.turn_detection"),
    (session_update(transcription={"model": "whisper-1"}), "model_not_found"),
    (session_update(transcription={"model": "vita-audio", "language": "x" * 100}),
     "session.audio.input.transcription.language"),
    (session_update(transcription={"model": "vita-audio", "temperature": 1}),
     "session.audio.input.transcription.temperature"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
                 "audio_end_ms": 10}), "item_not_found"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "ANSWER", "content_index": 0,
                 "audio_end_ms": 10_000_000}), "audio_end_ms"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "ANSWER", "content_index": 1,
                 "audio_end_ms": 0}), "content_index"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "ANSWER", "content_index": 0,
                 "audio_end_ms": -5}), "audio_end_ms"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "QUESTION", "content_index": 0,
                 "audio_end_ms": 0}), "item_id"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "ANSWER"}), "content_index"),
    (json.dumps({"type": "conversation.item.retrieve", "item_id": "item_" + "x" * 100}), "item_id"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\x00" * 3)}), "audio"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
]


async def hostile(url: str):
    async with connect(url) as conn:
        await until(conn, "session.created")
        # a spoken answer to truncate against (after the other checks, it still answers)
        question = await text_turn(conn, "Say something.", tokens=24)
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Speak."}]})
        answer_item = None
        await conn.response.create(response={"max_output_tokens": 24})
        spoken = await until(conn, "response.done")
        answer_item = spoken[-1].response.output[0].id
        question_item = [e for e in question if e.type == "conversation.item.added"][0].item.id
        errors = []
        for i, (raw, _) in enumerate(BAD):
            data = json.loads(raw.replace("ANSWER", answer_item).replace("QUESTION", question_item))
            await conn.send_raw(json.dumps({**data, "event_id": f"bad-{i}"}))
            errors.append((await until(conn, "error", 30))[-1].error)
        # server VAD on: a flood of tiny appends is taken without an error and finds no speech in silence
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": VAD}}})
        await until(conn, "session.updated")
        for _ in range(2000):
            await conn.input_audio_buffer.append(audio=b64(b"\x00\x00"))
        # appends while an answer is being cancelled, and after it
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Long one."}]})
        await conn.response.create(response={"max_output_tokens": 512})
        await until(conn, "response.output_audio.delta")
        await conn.response.cancel()
        for _ in range(20):
            await conn.input_audio_buffer.append(audio=b64(silence(0.05).tobytes()))
        cancelled = await until(conn, "response.done")
        for _ in range(20):
            await conn.input_audio_buffer.append(audio=b64(silence(0.05).tobytes()))
        await conn.send_raw(json.dumps({"type": "conversation.item.truncate", "item_id": answer_item,
                                        "content_index": 0, "audio_end_ms": 0}))
        truncated = await until(conn, "conversation.item.truncated")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await until(conn, "session.updated")
        after = await text_turn(conn, "Still there?")
    garbage = await refused(url, resume="not-a-token")
    forged = await refused(url, resume="sess_00000000000000000000.forged")
    return errors, cancelled, truncated, after, garbage, forged


def test_bad_and_hostile_inputs_get_error_events_and_everything_goes_on(app_url):
    import httpx

    errors, cancelled, truncated, after, garbage, forged = asyncio.run(hostile(app_url))
    assert len(BAD) + 4 >= 20
    for i, ((raw, expected), error) in enumerate(zip(BAD, errors)):
        assert expected in (error.code, error.param), (raw[:100], error)
        assert error.type == "invalid_request_error" and error.message and error.event_id == f"bad-{i}"
    # the flood and the appends around the cancel: no error, no speech found in silence
    assert not any(e.type in ("error", "input_audio_buffer.speech_started") for e in cancelled + truncated)
    assert cancelled[-1].response.status == "cancelled"
    assert truncated[-1].audio_end_ms == 0
    assert after[-1].response.status in ("completed", "incomplete") and not any(e.type == "error" for e in after)
    for error, code in (garbage, forged):
        assert error.error.code == "session_not_found" and code == 1008
    assert httpx.get(f"{app_url}/health", timeout=30).json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------------
# Without Serve: the session's VAD turns, truncation, snapshots; the maximum session length


def new_session():
    from serve.realtime import Session
    from serve.voices import VoiceStore

    return Session({"max_tokens": 512, "max_text_chars": 200, "max_audio_seconds": 6.0}, VoiceStore())


def test_session_turns_from_the_detector_keep_the_prefix_padding(utterances):
    from serve.realtime_events import SessionUpdate, parse

    session = new_session()
    session.update(SessionUpdate(type="session.update", session={"audio": {"input": {"turn_detection": VAD}}}))
    session.prepare_vad()
    audio = np.concatenate([silence(1.0), utterances[0], silence(1.0)])
    events, actions = [], []
    for i in range(0, len(audio), 480):  # 20 ms appends
        session.append(parse({"type": "input_audio_buffer.append", "audio": b64(audio[i:i + 480].tobytes())}))
        data = session.take_unjudged(session.frame_bytes())
        if data:
            more, acts = session.on_speech(session.detector.feed(data))
            events, actions = events + more, actions + acts
        assert len(session.buffer) / 2 / RATE <= 6.0
    types = [e["type"] for e in events]
    assert types[:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed"]
    start, stop = events[0]["audio_start_ms"], events[1]["audio_end_ms"]
    assert 1000 - 64 <= start < stop <= 1000 + len(utterances[0]) / RATE * 1000 + 64
    (kind, message), = [a for a in actions if a[0] == "committed"]
    clip = message.clips[0]
    # from prefix_padding_ms before the start to the stop's detection (the silence window after it)
    assert abs(clip.seconds * 1000 - (stop - start + 300 + 500)) <= 150
    assert message.id == events[0]["item_id"] == events[2]["item_id"]


def test_truncation_keeps_the_text_made_before_the_heard_audio():
    from serve.realtime import Message

    answer = Message("item_a", "assistant", texts=["Hello there friend"], spoken=True, sent_ms=3000,
                     audio_ms=3000, said="Hello there friend", marks=[(0, 5), (1000, 11), (2000, 18)])
    answer.truncate(1500)
    assert answer.texts == ["Hello there"] and answer.audio_ms == 1500 and answer.status == "incomplete"
    answer.truncate(2500)  # the client may say more was heard than the server's estimate
    assert answer.texts == ["Hello there friend"]
    answer.truncate(0)
    assert answer.texts == []


def test_a_snapshot_restores_the_conversation():
    from serve.realtime_events import ItemCreate, SessionUpdate

    session = new_session()
    session.update(SessionUpdate(type="session.update", session={"instructions": "Be brief.", "audio": {
        "input": {"turn_detection": VAD, "transcription": {"model": "vita-audio"}}}}))
    session.create_item(ItemCreate(type="conversation.item.create", item={
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                       {"type": "input_audio", "audio": b64(silence(0.2).tobytes())}]}))
    session.messages[0].clips[0].codes = [1, 2]
    copy = new_session()
    copy.restore(json.loads(json.dumps(session.snapshot())))
    assert copy.id == session.id and copy.describe() == session.describe()
    assert [m.to_json() for m in copy.messages] == [m.to_json() for m in session.messages]


def test_a_session_ends_at_its_maximum_length(tiny_models):
    from serve_testing import local_ingress

    with local_ingress(tiny_models, allowed_hosts=["*"], realtime_max_session_s=1.0) as client:
        with client.websocket_connect("/v1/realtime?model=vita-audio") as ws:
            assert ws.receive_json()["type"] == "session.created"
            error = ws.receive_json()  # nothing sent: the session ends by itself
            assert error["type"] == "error" and error["error"]["code"] == "session_expired"
            assert ws.receive()["type"] == "websocket.close"


def test_a_held_session_resumes_only_once_its_lease_lapsed():
    """A socket holds its session by a lease in the store: a resume is refused while the lease is renewed
    (`session_in_use`: the SDK retries), taken once it lapsed (a lost replica), with the end of the answer that
    replica was making to replay; the old holder then finds the session taken."""
    import hashlib

    from serve.api import APIError
    from serve.routes_realtime import LEASE_S, Saved, SessionLimits, TakenOver
    from serve.state import open_store

    saved = Saved(open_store("memory"), "k_owner", "sess_held", SessionLimits(30.0, 3600.0, 4))
    now, lost = time.time(), [{"type": "response.done", "response": {"status": "failed"}}]
    record = {"secret": hashlib.sha256(b"secret").hexdigest(), "started_at": now, "attached": True, "lease": "a",
              "seen_at": now, "lost": lost}
    saved.create(record, new_session().snapshot())
    for secret, code in (("secret", "session_in_use"), ("wrong", "session_not_found")):
        with pytest.raises(APIError) as refused:
            saved.take(secret, "b")
        assert refused.value.code == code
    saved.keep({**record, "seen_at": now - LEASE_S - 1}, None)  # the holder stopped renewing its lease
    taken, snapshot, replay = saved.take("secret", "b")
    assert taken["lease"] == "b" and taken["attached"] and replay == lost and snapshot["messages"] == []
    with pytest.raises(TakenOver):
        saved.keep(record, None)
