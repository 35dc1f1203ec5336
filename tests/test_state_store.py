"""The endpoint's state store (serve.state) on both backends, the same behaviour table for each: embedded SQLite in a
state folder and a real Redis (Debian's `redis-server`, started here on a free loopback port with persistence off,
stopped in teardown). Also the API key set (serve.keys): several keys, a keys file, revocation, owner ids.

Concurrency: 32 creates of one name at once, from threads (each with its own connection) and from separate
processes, give exactly one success and 31 name conflicts; two compare-and-sets of one item at the
version both read, 40 rounds, give exactly one winner each round. A renewed item outlives one left to expire.
Restart: the SQLite store reopened on its folder keeps everything unexpired; a Redis restarted with persistence off
starts empty (on clusters the store is the GCS fault-tolerance Redis, whose persistence is its own) and the store
reconnects to it by itself.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve.api import APIError
from serve.keys import ENV_KEYS, ENV_KEYS_FILE, KeySet, KeyFileError, key_digest, owner_id
from serve.state import AUDIO, GLOBAL, REALTIME, VOICE, Conflict, Full, NotFound, Record, Stale, open_store
from serve.state.redis_store import split_url
from serve.state.sqlite_store import SqliteStore

from redis_testing import RedisServer, need_redis_server

A, B = owner_id("sk-key-a"), owner_id("sk-key-b")
N_CONCURRENT = 32
TTL_S = 1.5  # short-lived items: long enough that a loaded machine reads them back before they expire


def sleep_past(expires_at: float) -> None:
    time.sleep(max(0.0, expires_at - time.time()) + 0.2)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    need_redis_server()
    for attempt in range(3):  # a free port may be taken before redis-server binds it
        try:
            server = RedisServer(tmp_path_factory.mktemp("redis")).start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
    yield server
    server.stop()


BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """A fresh, empty store's URL: a state folder, or a key prefix of its own on the module's Redis."""
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("redis_server").url()


@pytest.fixture
def store(store_url):
    with open_store(store_url) as s:
        yield s


# -- the behaviour table (both backends) ----------------------------------------------------------------------------
def test_create_get_find_list_delete(store):
    voice = store.create(VOICE, A, {"codes": [1, 2, 3], "seconds": 2.5, "consent": "I agree"}, name="anna")
    assert voice.id.startswith("voice_") and voice.owner == A and voice.name == "anna" and voice.expires_at is None
    assert abs(voice.created_at - time.time()) < 60
    assert store.get(VOICE, A, voice.id) == voice
    assert store.find(VOICE, A, "anna") == voice
    second = store.create(VOICE, A, {"codes": []}, name="bert", id="voice_fixed")
    assert second.id == "voice_fixed"
    assert [r.id for r in store.list(VOICE, A)] == [voice.id, second.id]  # oldest first
    assert store.list(AUDIO, A) == []  # kinds are separate
    store.delete(VOICE, A, voice.id)
    for read in (lambda: store.get(VOICE, A, voice.id), lambda: store.find(VOICE, A, "anna"),
                 lambda: store.delete(VOICE, A, voice.id)):
        with pytest.raises(NotFound):
            read()
    assert [r.id for r in store.list(VOICE, A)] == [second.id]
    assert store.create(VOICE, A, {}, name="anna").name == "anna"  # a deleted voice's name is free again


def test_names_unique_per_owner_or_global(store):
    store.create(VOICE, A, {}, name="anna")
    with pytest.raises(Conflict) as err:
        store.create(VOICE, A, {}, name="anna")
    assert err.value.field == "name"
    assert store.create(VOICE, B, {}, name="anna").owner == B  # owner scope: B has its own "anna"
    store.create("file", A, {}, name="data.jsonl", scope=GLOBAL)
    with pytest.raises(Conflict):
        store.create("file", B, {}, name="data.jsonl", scope=GLOBAL)
    assert store.find("file", A, "data.jsonl", scope=GLOBAL).owner == A
    with pytest.raises(NotFound):  # a global name is still the owner's item: B cannot read it
        store.find("file", B, "data.jsonl", scope=GLOBAL)


def test_id_conflict_is_kept_apart_from_name_conflict(store):
    store.create(AUDIO, A, "hello", id="audio_1")
    with pytest.raises(Conflict) as err:
        store.create(AUDIO, B, "other", id="audio_1")
    assert err.value.field == "id"
    assert store.get(AUDIO, A, "audio_1").data == "hello"


def test_put_creates_or_replaces_and_keeps_name(store):
    voice = store.create(VOICE, A, {"v": 1}, name="anna")
    replaced = store.put(VOICE, A, voice.id, {"v": 2})
    assert (replaced.name, replaced.created_at, replaced.data) == ("anna", voice.created_at, {"v": 2})
    assert store.find(VOICE, A, "anna").data == {"v": 2}
    fresh = store.put(REALTIME, A, "sess_1", {"turns": []}, ttl_s=60)
    assert store.get(REALTIME, A, "sess_1") == fresh and fresh.expires_at > time.time()
    with pytest.raises(NotFound):  # another key's id: neither replaced nor revealed
        store.put(REALTIME, B, "sess_1", {"turns": ["stolen"]})
    assert store.get(REALTIME, A, "sess_1").data == {"turns": []}


def test_max_items_per_owner(store):
    for i in range(3):
        store.create(VOICE, A, {}, name=f"v{i}", max_items=3)
    with pytest.raises(Full):
        store.create(VOICE, A, {}, name="v3", max_items=3)
    store.create(VOICE, B, {}, name="v3", max_items=3)  # the cap is per key
    store.delete(VOICE, A, store.find(VOICE, A, "v0").id)
    store.create(VOICE, A, {}, name="v3", max_items=3)


def test_expired_items_go_away(store):
    short = store.create(AUDIO, A, "soon gone", ttl_s=TTL_S)
    named = store.create(VOICE, A, {}, name="brief", ttl_s=TTL_S)
    kept = store.create(AUDIO, A, "kept", expires_at=time.time() + 3600)
    assert store.get(AUDIO, A, short.id).data == "soon gone"
    assert abs(short.expires_at - (time.time() + TTL_S)) < 1.0
    sleep_past(named.expires_at)
    for read in (lambda: store.get(AUDIO, A, short.id), lambda: store.find(VOICE, A, "brief"),
                 lambda: store.get(VOICE, A, named.id)):
        with pytest.raises(NotFound):
            read()
    assert [r.id for r in store.list(AUDIO, A)] == [kept.id]
    assert store.list(VOICE, A) == []
    assert store.create(VOICE, A, {}, name="brief").name == "brief"  # an expired name is free
    store.create(AUDIO, A, "again", id=short.id)  # and so is an expired id
    with pytest.raises(ValueError):
        store.create(AUDIO, A, "late", expires_at=time.time() - 1)
    with pytest.raises(ValueError):
        store.create(AUDIO, A, "both", ttl_s=5, expires_at=time.time() + 5)


def test_put_moves_the_expiry(store):
    item = store.create(AUDIO, A, "", ttl_s=TTL_S)
    store.put(AUDIO, A, item.id, "final transcript", ttl_s=60)  # a streamed answer, finished
    sleep_past(item.expires_at)
    assert store.get(AUDIO, A, item.id).data == "final transcript"
    store.put(AUDIO, A, item.id, "final transcript")  # no expiry: kept until deleted
    assert store.get(AUDIO, A, item.id).expires_at is None


def test_ownership_isolation(store):
    voice = store.create(VOICE, A, {"codes": [7]}, name="anna")
    audio = store.create(AUDIO, A, "answer", ttl_s=600)
    session = store.create(REALTIME, A, {"items": [1]}, ttl_s=600)
    for kind, item in ((VOICE, voice), (AUDIO, audio), (REALTIME, session)):
        with pytest.raises(NotFound):
            store.get(kind, B, item.id)
        with pytest.raises(NotFound):
            store.delete(kind, B, item.id)
        assert store.list(kind, B) == []
        assert store.get(kind, A, item.id) == item  # untouched by B's tries
    with pytest.raises(NotFound):
        store.find(VOICE, B, "anna")
    with pytest.raises(NotFound):  # the open endpoint's owner "" is an owner like any other
        store.get(VOICE, "", voice.id)


def test_data_round_trips_as_json(store):
    blob = {"text": "héllo ✓ 你好", "codes": list(range(400)), "big": 2**62, "neg": -1, "f": 0.1, "empty": [],
            "obj": {}, "none": None, "nested": [[{"a": [True, False]}]]}
    item = store.create(REALTIME, A, blob, ttl_s=60)
    assert store.get(REALTIME, A, item.id).data == blob
    assert store.list(REALTIME, A)[0].data == blob
    for data in ("plain text", 3, [1, "a"], None):
        assert store.get(AUDIO, A, store.create(AUDIO, A, data).id).data == data
    with pytest.raises(ValueError):
        store.create(AUDIO, A, {"nan": float("nan")})


def test_refuses_bad_arguments(store):
    for bad in (lambda: store.create("Voice!", A, {}), lambda: store.create(VOICE, "sk key", {}),
                lambda: store.create(VOICE, "*", {}), lambda: store.create(VOICE, A, {}, id="a/b"),
                lambda: store.create(VOICE, A, {}, name=""), lambda: store.create(VOICE, A, {}, name="x", scope="all")):
        with pytest.raises(ValueError):
            bad()


def test_pickles_as_its_url(store):
    item = store.create(VOICE, A, {"codes": [1]}, name="anna")
    again = pickle.loads(pickle.dumps(store))
    assert type(again) is type(store) and again.url == store.url
    assert again.get(VOICE, A, item.id) == item
    again.close()


# -- concurrency: one name, 32 creators -----------------------------------------------------------------------------
def _create_one(url: str, i: int) -> str:
    with open_store(url) as s:
        try:
            s.create(VOICE, A, {"by": i}, name="contested", max_items=256)
            return "ok"
        except Conflict as err:
            return f"conflict:{err.field}"


def test_concurrent_creates_from_threads(store_url):
    barrier, results = threading.Barrier(N_CONCURRENT), [None] * N_CONCURRENT

    def worker(i):
        barrier.wait()
        results[i] = _create_one(store_url, i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == ["conflict:name"] * (N_CONCURRENT - 1) + ["ok"]
    with open_store(store_url) as s:
        assert [r.name for r in s.list(VOICE, A)] == ["contested"]


def _process_worker(url, i, barrier, out):
    try:
        barrier.wait(60)
        out.put((i, _create_one(url, i)))
    except BaseException as err:  # reported, not hung
        out.put((i, f"error:{type(err).__name__}:{err}"))


def test_concurrent_creates_from_processes(store_url):
    ctx = multiprocessing.get_context("fork")  # separate processes, each opening its own connection
    barrier, out = ctx.Barrier(N_CONCURRENT), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(store_url, i, barrier, out)) for i in range(N_CONCURRENT)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    assert sorted(results.values()) == ["conflict:name"] * (N_CONCURRENT - 1) + ["ok"], results
    with open_store(store_url) as s:
        (winner,) = s.list(VOICE, A)
        assert results[winner.data["by"]] == "ok"


# -- versions: compare-and-set, renewal --------------------------------------------------------------------------
CAS_ROUNDS = 40
RENEWED_TTL_S = 3.0  # the renewed item is renewed every 0.1 s: only a 3 s stall of this process would lose it


def test_versions_and_compare_and_set(store):
    item = store.create(REALTIME, A, {"n": 0}, ttl_s=600)
    assert item.version == 1 and store.get(REALTIME, A, item.id).version == 1
    moved = store.put(REALTIME, A, item.id, {"n": 1}, ttl_s=600, if_version=1)
    assert moved.version == 2 and store.get(REALTIME, A, item.id) == moved
    with pytest.raises(Stale):  # read at 1, changed since: nothing written
        store.put(REALTIME, A, item.id, {"n": "lost"}, ttl_s=600, if_version=1)
    assert store.get(REALTIME, A, item.id) == moved
    assert store.touch(REALTIME, A, item.id, ttl_s=900, if_version=2) == 3
    renewed = store.get(REALTIME, A, item.id)
    assert (renewed.data, renewed.version) == ({"n": 1}, 3) and renewed.expires_at > moved.expires_at
    with pytest.raises(Stale):
        store.touch(REALTIME, A, item.id, ttl_s=900, if_version=2)
    assert store.put(REALTIME, A, item.id, {"n": 2}).version == 4  # a plain put still bumps the version
    for write in (lambda: store.put(REALTIME, B, item.id, {}, if_version=4),  # another key's: absent to it
                  lambda: store.touch(REALTIME, B, item.id, ttl_s=60),
                  lambda: store.put(REALTIME, A, "sess_absent", {}, if_version=1),  # no create by a CAS
                  lambda: store.touch(REALTIME, A, "sess_absent", ttl_s=60)):
        with pytest.raises(NotFound):
            write()
    assert store.get(REALTIME, A, item.id).data == {"n": 2}
    for bad in (0, -1, True, "1"):
        with pytest.raises(ValueError):
            store.put(REALTIME, A, item.id, {}, if_version=bad)
    assert store.put(REALTIME, A, "sess_new", {}).version == 1  # a put that creates starts at 1


def test_concurrent_compare_and_set_exactly_one_wins(store_url):
    """Two writers, each on its own connection, read the item and write it back at the version read, at once,
    CAS_ROUNDS times: each round exactly one wins, so no increment is ever lost."""
    with open_store(store_url) as s:
        item = s.create(REALTIME, A, {"n": 0, "by": None}, ttl_s=600)
    barrier, won = threading.Barrier(2), [[], []]
    errors = []

    def writer(w: int) -> None:
        try:
            with open_store(store_url) as mine:
                for r in range(CAS_ROUNDS):
                    seen = mine.get(REALTIME, A, item.id)
                    barrier.wait(60)  # both have read this round's version
                    try:
                        mine.put(REALTIME, A, item.id, {"n": seen.data["n"] + 1, "by": w}, ttl_s=600,
                                 if_version=seen.version)
                        won[w].append(r)
                    except Stale:
                        pass
                    barrier.wait(60)  # both have written (or lost) before the next read
        except BaseException as err:  # reported, not hung
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sorted(won[0] + won[1]) == list(range(CAS_ROUNDS))  # one winner per round, never two, never none
    with open_store(store_url) as s:
        final = s.get(REALTIME, A, item.id)
    assert final.data["n"] == CAS_ROUNDS and final.version == CAS_ROUNDS + 1


def wait_gone(read, timeout_s: float = 60.0) -> None:
    """Until `read()` raises NotFound (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            read()
        except NotFound:
            return
        assert time.monotonic() < deadline, "the item never expired"
        time.sleep(0.1)


def raw_exists(store, kind: str, item_id: str) -> bool:
    """Whether the backend still holds the item at all (the SQLite row; the Redis key), expired or not."""
    if isinstance(store, SqliteStore):
        import sqlite3

        with sqlite3.connect(store.path) as conn:
            return conn.execute("SELECT COUNT(*) FROM records WHERE kind = ? AND id = ?",
                                (kind, item_id)).fetchone()[0] > 0
    import redis

    client_url, prefix = split_url(store.url)
    with redis.Redis.from_url(client_url) as client:
        return bool(client.exists(f"{prefix}r:{kind}:{item_id}"))


def test_a_renewed_item_outlives_one_left_to_expire(store):
    """A session's record renewed with its lease stays; one no longer renewed goes once its expiry passes: it
    reads as absent and is gone from the backend (the SQLite row swept by the next write, the Redis key by its
    TTL)."""
    renewed = store.create(REALTIME, A, {"held": True}, ttl_s=RENEWED_TTL_S)
    dropped = store.create(REALTIME, A, {"held": False}, ttl_s=RENEWED_TTL_S)
    version, renewals = renewed.version, 0
    deadline = time.monotonic() + 60

    def renew_then_read() -> None:
        nonlocal version, renewals
        version = store.touch(REALTIME, A, renewed.id, ttl_s=RENEWED_TTL_S, if_version=version)
        renewals += 1
        store.get(REALTIME, A, dropped.id)

    wait_gone(renew_then_read, deadline - time.monotonic())
    assert renewals > 1 and time.time() >= dropped.expires_at
    still = store.get(REALTIME, A, renewed.id)
    assert still.data == {"held": True} and still.version == renewed.version + renewals
    store.put(AUDIO, A, "audio_later", "a later write")  # SQLite sweeps expired rows on writes
    assert not raw_exists(store, REALTIME, dropped.id) and raw_exists(store, REALTIME, renewed.id)
    assert [r.id for r in store.list(REALTIME, A)] == [renewed.id]
    wait_gone(lambda: store.get(REALTIME, A, renewed.id))  # no longer renewed: it goes too


def test_sqlite_gives_versions_to_an_older_database(tmp_path):
    """A state folder written before records had versions opens with every row at version 1."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript("CREATE TABLE records (kind TEXT NOT NULL, id TEXT NOT NULL, owner TEXT NOT NULL, "
                           "name TEXT, scope TEXT, data TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL, "
                           "PRIMARY KEY (kind, id));")
        conn.execute("INSERT INTO records VALUES ('voice', 'voice_old', ?, 'anna', ?, '{}', 1.0, NULL)", (A, A))
    with open_store(path) as s:
        assert s.get(VOICE, A, "voice_old").version == 1
        assert s.put(VOICE, A, "voice_old", {"v": 2}, if_version=1).version == 2
        assert s.find(VOICE, A, "anna").data == {"v": 2}


# -- restarts -------------------------------------------------------------------------------------------------------
def test_sqlite_survives_a_restart(tmp_path):
    folder = tmp_path / "state"
    with open_store(folder) as s:
        voice = s.create(VOICE, A, {"codes": [1, 2]}, name="anna")
        audio = s.create(AUDIO, A, "answer", ttl_s=3600)
        gone = s.create(AUDIO, A, "short", ttl_s=TTL_S)
    assert (folder / "state.sqlite3").is_file()
    sleep_past(gone.expires_at)
    code = ("import sys; from serve.state import open_store; s = open_store(sys.argv[1]); "
            "print(sorted(r.id for r in s.list('audio', sys.argv[2])))")
    shown = subprocess.run([sys.executable, "-c", code, f"sqlite://{folder}", A], capture_output=True,
                           text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == str([audio.id])  # another process, the same folder by its sqlite:// URL
    with open_store(folder) as s:
        assert s.get(VOICE, A, voice.id) == voice and s.find(VOICE, A, "anna") == voice
        assert s.get(AUDIO, A, audio.id) == audio
        with pytest.raises(NotFound):
            s.get(AUDIO, A, gone.id)
        assert s.purge() == 1  # the expired row, never read back, is deleted by the next write
        with pytest.raises(Conflict):
            s.create(VOICE, A, {}, name="anna")


def test_sqlite_is_in_wal_mode(tmp_path):
    with open_store(tmp_path / "s") as s:
        s.create(VOICE, A, {})
        assert isinstance(s, SqliteStore)
        import sqlite3

        with sqlite3.connect(tmp_path / "s" / "state.sqlite3") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_redis_restart_without_persistence_starts_empty_and_reconnects(tmp_path):
    need_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        with open_store(server.url()) as s:
            item = s.create(VOICE, A, {}, name="anna")
            server.stop()
            server.start()  # same port, persistence off: nothing kept (the GCS FT Redis persists on clusters)
            deadline = time.monotonic() + 20
            while True:
                try:
                    with pytest.raises(NotFound):
                        s.get(VOICE, A, item.id)
                    break
                except Exception as err:  # the client's first call after the restart may see the dropped socket
                    if isinstance(err, AssertionError) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert s.create(VOICE, A, {}, name="anna").name == "anna"  # scripts reloaded, writes work again
    finally:
        server.stop()


# -- URLs -----------------------------------------------------------------------------------------------------------
def test_open_store_urls(tmp_path):
    folder = tmp_path / "f"
    assert open_store(folder).url == f"sqlite://{folder.resolve()}/state.sqlite3"
    assert open_store(f"sqlite://{folder}").url == open_store(str(folder)).url
    assert open_store(tmp_path / "x.db").url == f"sqlite://{(tmp_path / 'x.db').resolve()}"
    assert open_store("memory").url == "memory"
    assert type(open_store("redis://127.0.0.1:1/0")).__name__ == "RedisStore"  # lazily connected
    assert split_url("redis://h:1/2?prefix=app:&ssl_cert_reqs=none") == ("redis://h:1/2?ssl_cert_reqs=none", "app:")
    assert split_url("redis://h:1/2")[1] == "vita-audio:"
    for bad in ("", "http://x", "ftp://y"):
        with pytest.raises(ValueError):
            open_store(bad)


def test_check_reaches_the_store_or_says_why_not(store, tmp_path):
    """What `vita-audio serve` runs before Ray starts: the store answers, or a StateError naming it."""
    from serve.state import StateError

    store.check()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for url in (str(blocked / "state"), "redis://127.0.0.1:1/0"):  # a folder under a file; nothing listens on :1
        with open_store(url) as bad, pytest.raises(StateError) as err:
            bad.check()
        assert "state store" in str(err.value)


def test_default_state():
    from serve.state import default_state

    assert default_state({"VITA_AUDIO_STATE": "redis://r:6379/0"}) == "redis://r:6379/0"
    assert default_state({"VITA_AUDIO_CACHE": "/c"}) == "/c/state"
    assert default_state({}).endswith("/.cache/vita-audio/state")


def test_record_live():
    assert Record(VOICE, "v", A, {}).live()
    assert not Record(VOICE, "v", A, {}, expires_at=time.time() - 1).live()


# -- API keys (serve.keys) ------------------------------------------------------------------------------------------
def test_no_keys_is_the_open_endpoint():
    keys = KeySet(env={})
    assert keys.open and keys.owner(None) == "" and keys.check(None) == ""


def test_one_key_is_the_simple_case():
    keys = KeySet("sk-one", env={})
    assert not keys.open
    assert keys.check("Bearer sk-one") == owner_id("sk-one")
    for header in (None, "", "sk-one", "Bearer sk-two", "Bearer ", "bearer sk-one"):
        with pytest.raises(APIError) as err:
            keys.check(header)
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert keys.check(None, extra_keys=["nope", "sk-one"]) == owner_id("sk-one")  # the realtime subprotocol
    shipped = pickle.dumps(keys)  # as a Serve deployment's argument: digests only, never the key
    assert b"sk-one" not in shipped and pickle.loads(shipped).check("Bearer sk-one") == owner_id("sk-one")


def test_owner_id_is_a_hash_not_the_key():
    owner = owner_id("sk-secret-key-123")
    assert owner.startswith("k_") and len(owner) == 34 and "secret" not in owner
    assert owner == owner_id("sk-secret-key-123") != owner_id("sk-secret-key-124")
    assert owner[2:] == key_digest("sk-secret-key-123").hex()[:32]


def test_keys_from_the_environment_and_revocation():
    keys = KeySet(env={ENV_KEYS: "sk-a, sk-b\nsk-c !sk-b"})
    assert keys.owner("sk-a") == owner_id("sk-a") and keys.owner("sk-c") == owner_id("sk-c")
    assert keys.owner("sk-b") is None  # revoked wins over listed
    assert KeySet("sk-x", env={ENV_KEYS: "sk-y"}).owner("sk-x") == owner_id("sk-x")  # both sources count


def test_keys_file_labels_digests_revocation_and_reload(tmp_path):
    path = tmp_path / "keys.txt"
    digest = key_digest("sk-bob").hex()
    path.write_text(f"# the endpoint's keys\nsk-alice   alice  # admin\n\nsha256:{digest} bob\n!sk-old\nsk-old\n")
    keys = KeySet(env={ENV_KEYS_FILE: str(path)})
    assert keys.owner("sk-alice") == owner_id("sk-alice") and keys.label("sk-alice") == "alice"
    assert keys.owner("sk-bob") == owner_id("sk-bob") and keys.label("sk-bob") == "bob"
    assert keys.owner("sk-old") is None and keys.owner("sk-nobody") is None
    time.sleep(0.01)
    path.write_text(f"sk-alice\n!sha256:{digest}\nsk-new\n")  # bob revoked, a new key, no restart
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert keys.owner("sk-bob") is None and keys.owner("sk-new") == owner_id("sk-new")
    assert keys.owner("sk-alice") == owner_id("sk-alice")
    path.unlink()  # a keys file that went away accepts nothing (fails closed)
    assert keys.owner("sk-alice") is None and not keys.open
    path.write_text("sha256:abc\nsk-alice\n")  # a broken edit: nothing from the file until fixed
    assert keys.owner("sk-alice") is None
    with pytest.raises(KeyFileError):  # at start it is an error
        KeySet(keys_file=path, env={})
    assert KeySet("sk-cli", keys_file=path.with_name("missing"), env={}).owner("sk-cli") == owner_id("sk-cli")


# -- the voices and chat audio ids on the store (serve.voices, serve.chat_format) -----------------------------------
def test_voices_shared_by_two_replicas_and_owned_by_their_key(store_url):
    from serve.voices import MAX_VOICES, VoiceStore

    one, two = VoiceStore(store_url), VoiceStore(open_store(store_url))  # two ingress replicas, one store
    voice = one.add("anna", [5, 6, 7], 2.0, owner=A, consent="cons_1")
    assert voice.consent == "cons_1" and voice.describe()["codes"] == 3
    assert [d["name"] for d in two.listing(A)["data"]] == ["default", "anna"]
    assert two.resolve(voice.id, owner=A) == [5, 6, 7] == two.resolve("anna", owner=A)
    assert two.get(voice.id, A) == voice
    for refused in (lambda: two.check_new("anna", A), lambda: two.add("anna", [1], 1.0, owner=A),
                    lambda: two.add("alloy", [1], 1.0, owner=A)):
        with pytest.raises(APIError) as err:
            refused()
        assert err.value.status == 400 and "already exists" in err.value.message
    assert two.resolve("alloy", owner=A) is None  # OpenAI's names stay the default voice
    # key B: A's voice is not there (400 unknown when used, 404 when deleted, absent from the list)
    assert [d["name"] for d in two.listing(B)["data"]] == ["default"]
    with pytest.raises(APIError) as err:
        two.resolve(voice.id, owner=B)
    assert err.value.status == 400
    for refused in (lambda: two.delete(voice.id, B), lambda: two.get(voice.id, B), lambda: two.delete("not an id!", A)):
        with pytest.raises(APIError) as err:
            refused()
        assert err.value.status == 404 and err.value.code == "voice_not_found"
    two.check_new("anna", B)  # names are per key
    assert two.add("anna", [9], 1.0, owner=B).name == "anna"
    one.delete(voice.id, A)
    with pytest.raises(APIError):
        two.resolve("anna", owner=A)
    assert MAX_VOICES == 256
    assert [d["name"] for d in VoiceStore().listing()["data"]] == ["default"]  # no store: this process only


def test_32_concurrent_voice_uploads_of_one_name(store_url):
    from serve.voices import VoiceStore

    barrier, results = threading.Barrier(N_CONCURRENT), [None] * N_CONCURRENT

    def upload(i):
        voices = VoiceStore(store_url)  # a replica each
        barrier.wait()
        try:
            voices.add("same", [i], 1.0, owner=A)
            results[i] = 200
        except APIError as err:
            results[i] = err.status

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(N_CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [200] + [400] * (N_CONCURRENT - 1)


def test_chat_audio_ids_on_the_store(store_url):
    from serve.chat_format import AudioAnswers

    one, two = AudioAnswers(state=store_url), AudioAnswers(state=open_store(store_url))
    audio_id, expires_at = one.add("hello there", owner=A)
    assert isinstance(expires_at, int) and 3500 < expires_at - time.time() <= 3600
    assert two.transcript(audio_id, "messages[1].audio", owner=A) == "hello there"
    with pytest.raises(APIError) as err:  # another key's id reads as unknown
        two.transcript(audio_id, "messages[1].audio", owner=B)
    assert err.value.status == 400 and err.value.param == "messages[1].audio"
    streamed, expires = one.add("", owner=A)  # a streamed answer: the id first, the transcript at the end
    two.finish(streamed, "the whole answer", expires, owner=A)
    assert one.transcript(streamed, "m", owner=A) == "the whole answer"
    one.finish(streamed, "stolen", expires, owner=B)  # ignored: not B's
    assert one.transcript(streamed, "m", owner=A) == "the whole answer"
    short = AudioAnswers(ttl_s=1.5, state=store_url)
    gone, expires = short.add("brief", owner=A)
    sleep_past(expires + 1)
    with pytest.raises(APIError):
        short.transcript(gone, "m", owner=A)


def test_voice_calls_of_an_endpoint_without_keys():
    """Without keys every caller is owner "" (one shared set); `owned` is one key's view (a realtime session's)."""
    from serve.api import VoiceRef
    from serve.voices import VoiceStore

    voices = VoiceStore()
    voices.check_new("me")
    described = voices.add("me", [1, 2], 1.5).describe()
    assert described["name"] == "me" and described["type"] == "audio_sample" and described["seconds"] == 1.5
    assert voices.listing()["voices"] == ["default", "me"]
    assert voices.resolve(VoiceRef(id=described["id"])) == [1, 2] == voices.resolve("me", "audio.voice")
    assert voices.owned("").resolve("me") == [1, 2]
    with pytest.raises(APIError) as err:
        voices.owned(A).resolve("me", "session.voice")
    assert err.value.status == 400 and err.value.param == "session.voice"
    voices.delete(described["id"])
    with pytest.raises(APIError) as err:
        voices.delete(described["id"])
    assert err.value.status == 404
