"""The front door: ingress replicas that keep nothing of their own, one state store, keys that own what they make.

One Serve app per test module run here, with 2 ingress replicas (the stages: one replica each), deployed on three
stores in turn: an embedded SQLite state folder, the same folder after the app was stopped and started again, and
a real Redis (`redis-server` on a loopback port, started and stopped by this module). A replica is "lost" by
killing its actor: Serve replaces it with a fresh process that has seen nothing, so whatever still resolves came
from the store. Keys come from a keys file (two keys, one revoked) besides the app's one `api_key`.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_testing import API_KEY, CAPS, clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY_A, KEY_B, REVOKED = "sk-front-alice", "sk-front-bob", "sk-front-old"
APP = "front"
INGRESS = "vita-ingress"
TOKENS = 12
N_UPLOADS = 32
SETTLE_S = 180.0  # a bound on waiting for Serve to replace a replica (not a timing assertion)


def auth(key: str | None) -> dict:
    return {"authorization": f"Bearer {key}"} if key else {}


class Door:
    """The app on one loopback port: (re)deployed on a store, its ingress replicas listed and killed."""

    def __init__(self, tiny_models, keys_file, port: int):
        self.tiny_models, self.keys_file, self.port = tiny_models, keys_file, port
        self.url = f"http://127.0.0.1:{port}"
        import httpx

        self.http = httpx.Client(base_url=self.url, timeout=120)

    def deploy(self, state: str, replicas: int = 2) -> None:
        from ray import serve

        from serve.app import build_app

        args = {"models": str(self.tiny_models), **CAPS, "api_keys_file": str(self.keys_file), "state": state,
                "ingress": {"min_replicas": replicas, "max_replicas": replicas}}
        serve.run(build_app(args), name=APP, route_prefix="/")
        self.settle(replicas)

    def stop(self) -> None:
        from ray import serve

        serve.delete(APP)

    def replicas(self) -> list[str]:
        """Names of the live ingress replica actors of the app."""
        import ray

        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == "serve" and f"{APP}#{INGRESS}#" in a["name"])

    def kill(self, name: str) -> None:
        import ray

        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def settle(self, replicas: int, gone: tuple[str, ...] = ()) -> list[str]:
        """Until `replicas` ingress replicas run, none of them one of `gone`, and a few requests in a row pass
        (the proxy has dropped a killed replica)."""
        from ray import serve

        deadline, passed = time.monotonic() + SETTLE_S, 0
        while time.monotonic() < deadline:
            names = self.replicas()
            status = serve.status().applications.get(APP)
            running = status is not None and str(status.status).endswith("RUNNING")
            if running and len(names) == replicas and not set(names) & set(gone):
                try:
                    passed = passed + 1 if self.http.get("/v1/models", headers=auth(KEY_A)).status_code == 200 else 0
                except Exception:
                    passed = 0
                if passed >= 2 * replicas:
                    return names
            time.sleep(0.5)
        pytest.fail(f"ingress replicas not settled after {SETTLE_S:g} s: {self.replicas()} (gone: {gone})")

    def lose_each_replica(self) -> None:
        """Kill the ingress replicas one at a time (the app stays up on the other), each replaced before the next:
        afterwards no replica process is one that served an earlier request."""
        before = self.replicas()
        assert len(before) == 2
        for name in before:
            self.kill(name)
            self.settle(len(before), gone=(name,))
        assert not set(self.replicas()) & set(before)

    # -- the API calls of the tests --------------------------------------------------------------------------
    def upload(self, name: str, key: str = KEY_A, seed: int = 0):
        return self.http.post("/v1/audio/voices", headers=auth(key), data={"name": name, "consent": "mine"},
                              files={"audio_sample": ("v.wav", clip(0.6, seed=seed), "audio/wav")})

    def voices(self, key: str = KEY_A) -> list[str]:
        r = self.http.get("/v1/audio/voices", headers=auth(key))
        assert r.status_code == 200, r.text
        return [v["name"] for v in r.json()["data"]]

    def speech(self, voice, key: str = KEY_A):
        return self.http.post("/v1/audio/speech", headers=auth(key),
                              json={"model": "vita-audio", "input": "Hi.", "voice": voice, "response_format": "wav",
                                    "max_new_tokens": TOKENS})

    def spoken_answer(self, key: str = KEY_A) -> dict:
        r = self.http.post("/v1/chat/completions", headers=auth(key),
                           json={"model": "vita-audio", "modalities": ["text", "audio"], "max_tokens": TOKENS,
                                 "audio": {"voice": "alloy", "format": "wav"},
                                 "messages": [{"role": "user", "content": "Hello."}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["audio"]

    def follow_up(self, audio_id: str, key: str = KEY_A):
        """A chat turn after an earlier spoken answer, referred to by its audio id."""
        return self.http.post("/v1/chat/completions", headers=auth(key),
                              json={"model": "vita-audio", "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "Hello."},
                                                 {"role": "assistant", "audio": {"id": audio_id}},
                                                 {"role": "user", "content": "Again?"}]})


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# the front door's keys\n{KEY_A} alice\n{KEY_B} bob\n{REVOKED} old\n!{REVOKED}\n")
    return path


@pytest.fixture(scope="module")
def door(ray_session, tiny_models, keys_file, tmp_path_factory):
    """The app, first on an embedded state folder (`door.folder`); Serve shut down after the module."""
    from ray import serve

    from actors.ray_runtime import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        door = Door(tiny_models, keys_file, port)
        door.folder = str(tmp_path_factory.mktemp("state"))
        door.deploy(door.folder)
        yield door
        door.http.close()
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from redis_testing import RedisServer, need_redis_server

    need_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url("front:")
    server.stop()


# -- vita-audio serve's state and keys flags (no Ray) ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["file-as-folder", "scheme", "no-redis", "both", "no-keys-file", "bad-keys-file",
                                  "all-revoked", "ingress-min-max"])
def test_serve_refuses_bad_state_and_keys_flags_before_ray(case, tmp_path, capsys, monkeypatch):
    import ray

    from cli import main as cli

    blocked, keys = tmp_path / "a-file", tmp_path / "keys.txt"
    blocked.write_text("x")
    config = tmp_path / "config.yaml"
    config.write_text("applications: [{args: {ingress: {min_replicas: 3, max_replicas: 2}}}]")
    argv, message = {
        "file-as-folder": (["--state-dir", str(blocked)], f"--state-dir {blocked}"),
        "scheme": (["--state", "mongodb://x"], "unknown scheme"),
        "no-redis": (["--state", "redis://127.0.0.1:1/0"], "--state redis://127.0.0.1:1/0: state store"),
        "both": (["--state", "memory", "--state-dir", str(tmp_path)], "not allowed with"),
        "no-keys-file": (["--api-keys-file", str(tmp_path / "none.txt")], "no such file"),
        "bad-keys-file": (["--api-keys-file", str(keys)], "keys.txt:1: sha256: needs 64 hex digits"),
        "all-revoked": (["--api-keys-file", str(keys)], "no key is accepted"),
        "ingress-min-max": (["--config", str(config)], "min_replicas=3 > max_replicas=2"),
    }[case]
    keys.write_text("sha256:abc\n" if case == "bad-keys-file" else "sk-a\n!sk-a\n")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for a bad flag"))
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vita-audio serve: error:") and message in err[0], err


def test_serve_flags_set_the_apps_state_and_keys(tmp_path):
    import argparse

    from cli import serve as cmd_serve

    parser = argparse.ArgumentParser()
    cmd_serve.add_arguments(parser, "serve")
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_A}\n")
    app = cmd_serve.load_app_config(None)
    args = cmd_serve.app_args(parser.parse_args(["--state-dir", str(tmp_path / "s"), "--api-keys-file", str(keys)]),
                              app)
    assert args.state == str((tmp_path / "s").resolve()) and args.api_keys_file == str(keys.resolve())
    assert (tmp_path / "s" / "state.sqlite3").is_file()  # checked by opening it
    assert cmd_serve.app_args(parser.parse_args(["--state", "memory"]), app).state == "memory"
    default = cmd_serve.app_args(parser.parse_args([]), app)
    assert default.state is None and default.ingress.max_replicas >= 2  # the config's: autoscaled ingress


# -- keys ----------------------------------------------------------------------------------------------------------
def _api_routes(door: Door) -> list[tuple[str, str]]:
    """Every (method, path) the running app serves under /v1 (its OpenAPI schema; path parameters filled with a
    made-up id)."""
    import re

    schema = door.http.get("/openapi.json").json()
    return [(method.upper(), re.sub(r"\{[^}]+\}", "x_made_up", path))
            for path, methods in schema["paths"].items() if path.startswith("/v1") for method in methods]


def test_no_key_or_a_revoked_key_is_401_on_every_route_but_health(door):
    routes = _api_routes(door)
    assert ("POST", "/v1/audio/voices") in routes and ("DELETE", "/v1/audio/voices/x_made_up") in routes
    for key in (None, REVOKED, "sk-never-issued"):
        for method, path in routes:
            r = door.http.request(method, path, headers=auth(key), json={})
            error = r.json().get("error", {})
            assert r.status_code == 401 and error.get("code") == "invalid_api_key", (key, method, path, r.text)
            assert error.get("type") == "authentication_error" and set(error) >= {"message", "param"}
        assert asyncio.run(_realtime_refusal(door.url, key)) == ("invalid_api_key", 1008)
    assert door.http.get("/health").status_code == 200  # no key needed
    for key in (KEY_A, KEY_B, API_KEY):  # the keys file's keys and the app's own api_key all pass
        assert door.http.get("/v1/models", headers=auth(key)).status_code == 200


async def _realtime_refusal(url: str, key: str | None) -> tuple[str, int]:
    import websockets
    from websockets.exceptions import ConnectionClosed

    ws_url = url.replace("http://", "ws://") + "/v1/realtime?model=vita-audio"
    async with websockets.connect(ws_url, additional_headers=auth(key)) as ws:
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
        try:
            await asyncio.wait_for(ws.recv(), 30)
        except ConnectionClosed as closed:
            return event["error"]["code"], closed.rcvd.code
    return event["error"]["code"], 0


def test_a_key_cannot_list_use_or_delete_another_keys_voices_and_audio_ids(door):
    r = door.upload("bobs", key=KEY_B)
    assert r.status_code == 200, r.text
    bobs = r.json()["id"]
    assert door.upload("bobs", key=KEY_A).status_code == 200  # names are per key: alice may use the same one
    assert "bobs" in door.voices(KEY_B) and door.voices(KEY_A).count("bobs") == 1
    assert bobs not in [v["id"] for v in door.http.get("/v1/audio/voices", headers=auth(KEY_A)).json()["data"]]
    never = "voice_0000000000000000"
    for voice_id in (bobs, never):  # bob's voice reads exactly as one that never existed
        got = door.http.get(f"/v1/audio/voices/{voice_id}", headers=auth(KEY_A))
        deleted = door.http.delete(f"/v1/audio/voices/{voice_id}", headers=auth(KEY_A))
        assert got.status_code == deleted.status_code == 404
        assert got.json()["error"]["code"] == deleted.json()["error"]["code"] == "voice_not_found"
        used = door.speech({"id": voice_id}, key=KEY_A)
        assert used.status_code == 400 and f"unknown voice {voice_id!r}" in used.json()["error"]["message"]
    assert door.http.get(f"/v1/audio/voices/{bobs}", headers=auth(KEY_B)).json()["name"] == "bobs"
    assert door.speech({"id": bobs}, key=KEY_B).status_code == 200  # still bob's, still usable by bob
    answer = door.spoken_answer(KEY_B)
    theirs = door.follow_up(answer["id"], key=KEY_A)
    assert theirs.status_code == 400 and "unknown or expired" in theirs.json()["error"]["message"]
    assert door.follow_up(answer["id"], key=KEY_B).status_code == 200
    assert door.http.delete(f"/v1/audio/voices/{bobs}", headers=auth(KEY_B)).status_code == 200
    assert "bobs" not in door.voices(KEY_B)


def test_concurrent_uploads_of_one_name_give_one_voice(door):
    """32 uploads of one name at once (spread over both ingress replicas): exactly one 200, 31 clear 400s."""
    start = threading.Barrier(N_UPLOADS)

    def upload(i: int):
        start.wait(60)
        return door.upload("racer", seed=i)

    with ThreadPoolExecutor(N_UPLOADS) as pool:
        answers = list(pool.map(upload, range(N_UPLOADS)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [400] * (N_UPLOADS - 1), [r.text for r in answers if r.status_code not in (200, 400)]
    for r in answers:
        if r.status_code == 400:
            error = r.json()["error"]
            assert error["param"] == "name" and error["message"] == "a voice named 'racer' already exists"
    assert door.voices().count("racer") == 1


@pytest.mark.slow
def test_voices_and_audio_ids_survive_losing_every_ingress_replica(door):
    """Embedded store: a voice and an audio id made through the first replicas resolve through their
    replacements (new processes), and a voice uploaded there is listed by the other replica."""
    voice = door.upload("kept")
    assert voice.status_code == 200, voice.text
    answer = door.spoken_answer()
    door.lose_each_replica()
    _resolves(door, voice.json()["id"], "kept", answer["id"])


@pytest.mark.slow
def test_voices_and_audio_ids_survive_stopping_the_app(door):
    """The app stopped (every replica, stages too) and started again on the same state folder."""
    voice = door.upload("restarted")
    assert voice.status_code == 200, voice.text
    answer = door.spoken_answer()
    assert answer["expires_at"] > time.time() + 3000  # OpenAI's expiry: an hour
    door.stop()
    door.deploy(door.folder)
    _resolves(door, voice.json()["id"], "restarted", answer["id"])
    assert "kept" in door.voices()


@pytest.mark.slow
def test_redis_backed_app_keeps_state_when_an_ingress_replica_is_lost(door, redis_url):
    door.deploy(redis_url)
    assert door.voices() == ["default"]  # a new store: nothing of the folder's
    voice = door.upload("in-redis")
    assert voice.status_code == 200, voice.text
    answer = door.spoken_answer()
    taken = door.upload("in-redis")
    assert taken.status_code == 400 and "already exists" in taken.json()["error"]["message"]
    lost = door.replicas()[0]
    door.kill(lost)
    door.settle(2, gone=(lost,))  # the other replica and a fresh one
    _resolves(door, voice.json()["id"], "in-redis", answer["id"])
    assert "in-redis" not in door.voices(KEY_B)
    import redis

    client = redis.Redis.from_url(redis_url.split("?")[0])
    assert any(key.startswith(b"front:") for key in client.scan_iter(count=1000))  # it is Redis that keeps them
    client.close()


def _resolves(door: Door, voice_id: str, name: str, audio_id: str) -> None:
    """Through every replica (each request goes to one of them; several of each kind): listed, used by id and
    by name, the audio id accepted."""
    for _ in range(3):
        assert name in door.voices()
        for voice in ({"id": voice_id}, name):
            r = door.speech(voice)
            assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text
        r = door.follow_up(audio_id)
        assert r.status_code == 200, r.text
