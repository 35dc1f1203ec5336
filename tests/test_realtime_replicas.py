"""A realtime session outlives the ingress replica holding its socket. One Serve app, two ingress replicas on one
embedded state store (a SQLite folder): a session answers a turn, and while its second answer streams the replica
holding the socket (named by the session's record in the store) is killed with ray.kill: no close frame, nothing
saved at the drop. The client resumes with its resume token on another replica process (the killed actor is dead)
and finds the conversation: the earlier turn is retrievable and in the next answer's prompt, and the lost answer's
end is replayed (failed, `ingress_lost`), so no response is left hanging. Every wait is bounded.

Without Ray (fast; `Saved` objects standing for the replicas, on a SQLite folder and on a real Redis): two resumes of
one dropped session at the same moment, many rounds, exactly one takes it and the other is `session_in_use`; a held
session whose replica stopped renewing its lease leaves the store (record and conversation) soon after its grace
period while a renewed one stays."""
from __future__ import annotations

import asyncio
import time

import pytest

from serve_testing import API_KEY, CAPS

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

APP = "vita"
WAIT_S = 120.0
RESUME_S = 60.0  # bound on the resume (the lost replica's lease lapses first: serve.routes_realtime.LEASE_S)


@pytest.fixture(scope="module")
def app(ray_session, tiny_models, tmp_path_factory):
    """The app on a free loopback port with 2 ingress replicas; its state folder, to read whose socket is whose."""
    from ray import serve

    from actors.ray_runtime import free_port
    from serve.app import build_app

    port, state = free_port(), str(tmp_path_factory.mktemp("realtime-state"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"models": str(tiny_models), **CAPS, "state": state,
                             "ingress": {"min_replicas": 2, "max_replicas": 2}}), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}", state
    finally:
        serve.shutdown()


def connect(url: str, **query):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    return client.realtime.connect(model="vita-audio", extra_query=query)


async def until(conn, last: str, into: list | None = None) -> list:
    """Events up to and including the first of type `last` (also appended to `into`)."""
    events, deadline = [], time.monotonic() + WAIT_S
    while not events or events[-1].type != last:
        events.append(await asyncio.wait_for(conn.recv(), max(deadline - time.monotonic(), 0.1)))
        if into is not None:
            into.append(events[-1])
    return events


async def ask(conn, text: str, **response) -> None:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    await conn.response.create(response=response)


def holder(state: str, session_id: str) -> str:
    """The replica the session's record in the store says holds it (a Serve replica's actor name)."""
    from serve.keys import owner_id
    from serve.state import REALTIME, open_store

    with open_store(state) as store:
        return store.get(REALTIME, owner_id(API_KEY), session_id).data["holder"]


def kill(name: str):
    """Kill the replica actor `name` (no restart: Serve starts a new one); its handle."""
    import ray

    actor = ray.get_actor(name, namespace="serve")
    ray.kill(actor, no_restart=True)
    return actor


def is_dead(actor) -> bool:
    import ray
    from ray.exceptions import RayActorError

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=WAIT_S)
    except RayActorError:
        return True
    return False


def ingress_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and f"{APP}#vita-ingress#" in a["name"])


async def resume(url: str, token: str) -> tuple:
    """Reconnect with the resume token until the session is free (the lost replica's lease lapses: until then
    `session_in_use`, close 1013, as the SDK's own reconnection retries); the socket and its first events."""
    deadline = time.monotonic() + RESUME_S
    while True:
        manager = connect(url, resume=token)
        conn = await manager.enter()
        first = await asyncio.wait_for(conn.recv(), WAIT_S)
        if first.type == "session.created":
            return manager, conn, [first]
        assert first.type == "error" and first.error.code == "session_in_use", first
        await manager.__aexit__(None, None, None)
        assert time.monotonic() < deadline, "the lost replica's session never became free"
        await asyncio.sleep(1.0)


async def lose_the_replica(url: str, state: str) -> dict:
    from websockets.exceptions import ConnectionClosed

    async with connect(url) as conn:
        created = (await until(conn, "session.created"))[-1]
        await ask(conn, "Hello there.", output_modalities=["text"], max_output_tokens=8)
        first = await until(conn, "response.done")
        before = ingress_replicas()
        name = holder(state, created.session.id)
        assert name in before and len(before) == 2
        # a long spoken answer: the replica holding the socket is killed as its audio streams
        await ask(conn, "Tell me more.", max_output_tokens=512)
        seen = await until(conn, "response.output_audio.delta")
        killed = kill(name)
        try:
            while True:
                seen.append(await asyncio.wait_for(conn.recv(), WAIT_S))
        except ConnectionClosed as closed:
            close_code = closed.rcvd.code if closed.rcvd else 1006
    manager, conn, replayed = await resume(url, created.resume_token)
    try:
        resumed_on = holder(state, created.session.id)
        cut = [e for e in seen if e.type == "response.created"][-1].response.id
        if not any(e.type == "response.done" for e in seen):  # cut off: its end must be among the replayed
            replayed += await until(conn, "response.done")
        answered = first[-1].response.output[0].id
        await conn.conversation.item.retrieve(item_id=answered)
        retrieved = (await until(conn, "conversation.item.retrieved"))[-1]
        await ask(conn, "Hello there.", output_modalities=["text"], max_output_tokens=8)
        later = await until(conn, "response.done")
    finally:
        await manager.__aexit__(None, None, None)
    return {"created": created, "first": first, "seen": seen, "close_code": close_code, "killed": killed,
            "killed_name": name, "resumed_on": resumed_on, "replayed": replayed, "cut": cut,
            "retrieved": retrieved, "later": later}


@pytest.fixture(scope="module")
def lost(app):
    return asyncio.run(lose_the_replica(*app))


def test_the_socket_drops_with_its_replica_and_resumes_on_another_process(lost):
    assert is_dead(lost["killed"])  # so whatever served the resume was another process
    assert lost["resumed_on"] != lost["killed_name"]
    assert lost["close_code"] not in (1000, 1001)  # a drop, not a close: the session is resumable
    resumed = lost["replayed"][0]
    assert resumed.type == "session.created" and resumed.session.id == lost["created"].session.id


def test_the_conversation_keeps_the_earlier_turn(lost):
    first, later = lost["first"][-1].response, lost["later"][-1].response
    item = lost["retrieved"].item
    assert item.id == first.output[0].id and item.content[0].text == first.output[0].content[0].text
    assert later.status in ("completed", "incomplete")
    # the same question again: its prompt holds the earlier turn too (and more tokens than the first time)
    assert later.usage.input_tokens > first.usage.input_tokens


def test_the_lost_answer_ends_in_the_replayed_events(lost):
    seen, replayed, cut = lost["seen"], lost["replayed"], lost["cut"]
    ends = [e for e in seen + replayed if e.type == "response.done" and e.response.id == cut]
    assert len(ends) == 1 and ends[0] in replayed  # lost while being made: ended once, by the resumed session
    assert ends[0].response.status == "failed" and ends[0].response.status_details.error.code == "ingress_lost"
    errors = [e for e in replayed if e.type == "error"]
    assert len(errors) == 1 and errors[0].error.code == "ingress_lost" and errors[0].error.type == "server_error"
    deleted = [e.item_id for e in replayed if e.type == "conversation.item.deleted"]
    assert deleted == [e.item.id for e in seen if e.type == "response.output_item.added"][-1:]  # not in the history


async def racing_resumes(url: str) -> dict:
    """A session with a turn drops (no close frame); two sockets resume it at the same moment, again while both
    are refused because the drop is not yet seen (a bounded wait), until one continues it."""
    from websockets.exceptions import ConnectionClosed

    async with connect(url) as conn:
        created = (await until(conn, "session.created"))[-1]
        await ask(conn, "Hello there.", output_modalities=["text"], max_output_tokens=8)
        first = await until(conn, "response.done")
        conn._connection.transport.abort()  # the network drops

    async def open_one() -> tuple:
        manager = connect(url, resume=created.resume_token)
        conn = await manager.enter()
        return manager, conn, await asyncio.wait_for(conn.recv(), WAIT_S)

    deadline = time.monotonic() + RESUME_S
    while True:
        tries = await asyncio.gather(open_one(), open_one())
        if any(event.type == "session.created" for _, _, event in tries):
            break
        assert all(event.type == "error" and event.error.code == "session_in_use" for _, _, event in tries), tries
        for manager, _, _ in tries:
            await manager.__aexit__(None, None, None)
        assert time.monotonic() < deadline, "the dropped session never became free"
        await asyncio.sleep(0.5)
    firsts, out = [event for _, _, event in tries], {"created": created, "first": first}
    try:
        for manager, conn, event in tries:
            if event.type == "session.created":
                await conn.conversation.item.retrieve(item_id=first[-1].response.output[0].id)
                out["retrieved"] = (await until(conn, "conversation.item.retrieved"))[-1]
            else:
                try:
                    await asyncio.wait_for(conn.recv(), WAIT_S)
                except ConnectionClosed as closed:
                    out["refused_close"] = closed.rcvd.code if closed.rcvd else None
    finally:
        for manager, _, _ in tries:
            await manager.__aexit__(None, None, None)
    return {**out, "firsts": firsts}


def test_two_sockets_resuming_one_session_at_once_one_continues_it(app):
    raced = asyncio.run(racing_resumes(app[0]))
    kinds = sorted(event.type for event in raced["firsts"])
    assert kinds == ["error", "session.created"], raced["firsts"]
    created = next(e for e in raced["firsts"] if e.type == "session.created")
    refused = next(e for e in raced["firsts"] if e.type == "error")
    assert created.session.id == raced["created"].session.id
    assert refused.error.code == "session_in_use" and raced["refused_close"] == 1013
    assert raced["retrieved"].item.id == raced["first"][-1].response.output[0].id  # the earlier turn is there


# -- racing resumes, and an abandoned session leaving the store (no Ray: `Saved` objects as the replicas) ----------
RACE_ROUNDS = 20
SNAPSHOT = {"messages": ["an earlier turn"]}  # opaque to the store and to Saved
MISSED = [{"type": "response.done", "response": {"status": "cancelled"}}]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from redis_testing import RedisServer, need_redis_server

    need_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("redis_server").url()


def limits(grace_s: float = 30.0):
    from serve.routes_realtime import SessionLimits

    return SessionLimits(resume_grace_s=grace_s, max_session_s=3600.0, sessions_per_key=RACE_ROUNDS + 4)


def held_session(store, sid: str, grace_s: float = 30.0):
    """A session a socket holds (lease "first", resume secret "secret"): its Saved and record."""
    import hashlib

    from serve.keys import owner_id
    from serve.routes_realtime import Saved

    saved, now = Saved(store, owner_id(API_KEY), sid, limits(grace_s)), time.time()
    record = {"secret": hashlib.sha256(b"secret").hexdigest(), "started_at": now, "attached": True,
              "lease": "first", "seen_at": now}
    saved.create(record, SNAPSHOT)
    return saved, record


def test_two_resumes_at_once_exactly_one_takes_the_session(store_url):
    """A dropped session resumed on two replicas at the same moment (each its own store connection), RACE_ROUNDS
    times: each time exactly one takes it (the conversation and the missed events), the other is refused
    `session_in_use` (close 1013: the SDK would retry, and find it held), and the store names the winner's lease."""
    from serve.api import APIError
    from serve.keys import owner_id
    from serve.routes_realtime import Saved
    from serve.state import REALTIME, open_store

    import threading

    barrier = threading.Barrier(2)
    with open_store(store_url) as store:
        for r in range(RACE_ROUNDS):
            sid = f"sess_race{r}"
            saved, record = held_session(store, sid)
            saved.keep({**record, "attached": False, "missed": MISSED, "lost": []}, SNAPSHOT)  # the drop
            results = [None, None]

            def resume(i: int) -> None:
                with open_store(store_url) as mine:
                    replica = Saved(mine, owner_id(API_KEY), sid, limits())
                    barrier.wait(60)
                    try:
                        results[i] = replica.take("secret", f"lease{i}")
                    except APIError as err:
                        results[i] = err.code
                    except BaseException as err:  # reported, not hung
                        results[i] = repr(err)

            threads = [threading.Thread(target=resume, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            won = [x for x in results if isinstance(x, tuple)]
            assert len(won) == 1 and results.count("session_in_use") == 1, (r, results)
            taken, snapshot, replay = won[0]
            assert snapshot == SNAPSHOT and replay == MISSED
            assert store.get(REALTIME, owner_id(API_KEY), sid).data["lease"] == taken["lease"]


def test_an_abandoned_session_leaves_the_store_soon_after_its_grace_period(store_url):
    """A held session's record and conversation expire together, LEASE_S + the grace period after the last
    renewal of its lease: one whose replica stopped renewing (crashed LEASE_S ago, grace 1 s) is gone from the
    store, both parts, long before its maximum length, while one renewed all along stays."""
    from serve.keys import owner_id
    from serve.routes_realtime import CONVERSATION, LEASE_S
    from serve.state import REALTIME, NotFound, open_store

    owner = owner_id(API_KEY)
    with open_store(store_url) as store:
        live, live_record = held_session(store, "sess_live", grace_s=1.0)
        crashed, crashed_record = held_session(store, "sess_crashed", grace_s=1.0)
        for sid in ("sess_live", "sess_crashed"):
            record, conversation = store.get(REALTIME, owner, sid), store.get(CONVERSATION, owner, sid)
            assert conversation.expires_at == record.expires_at <= time.time() + LEASE_S + 1.0
        crashed.keep({**crashed_record, "seen_at": time.time() - LEASE_S}, None)  # its last renewal
        deadline = time.monotonic() + 60
        while True:
            live.keep({**live_record, "seen_at": time.time()}, None)  # renewed every HEARTBEAT_S, here faster
            left = []
            for kind in (REALTIME, CONVERSATION):
                try:
                    left.append(store.get(kind, owner, "sess_crashed"))
                except NotFound:
                    pass
            if not left:
                break
            assert time.monotonic() < deadline, "the abandoned session stayed in the store"
            time.sleep(0.1)
        assert store.get(CONVERSATION, owner, "sess_live").data == SNAPSHOT
        assert store.get(REALTIME, owner, "sess_live").data["lease"] == "first"
