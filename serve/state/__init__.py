"""The endpoint's state store: everything the endpoint remembers, behind one small interface, on two backends.

What it holds, as typed records by kind (`Record`: kind, id, owner, name, data, created_at, expires_at, version):
uploaded voices (`VOICE`: clip codes, name, seconds, consent text), chat answers' audio ids (`AUDIO`: transcript,
with OpenAI's `expires_at`), realtime conversations (`REALTIME`: an opaque JSON blob with an expiry), and later
batch jobs and files (`BATCH`, `FILE`). `data` is any JSON value; the store never looks inside it.

Operations (every one takes the owner: the API key's hash, `serve.keys.owner_id`; never the key itself):
- `create(kind, owner, data, id=, name=, expires_at=/ttl_s=, max_items=)`: atomic create-if-absent. Fails with
  `Conflict` when the id, or the name in its scope, is taken (scope `OWNER`: unique per owner, the default;
  `GLOBAL`: unique across owners), with `Full` when the owner already holds `max_items` of that kind. Under
  concurrent creates of one name from threads, processes or replicas exactly one succeeds.
- `put(kind, owner, id, data, expires_at=/ttl_s=, if_version=)`: create or replace the data and expiry of the
  owner's item (keeps its name and created_at); an id owned by another key is `NotFound`.
- `touch(kind, owner, id, expires_at=/ttl_s=, if_version=)`: move the expiry of the owner's live item (its data
  untouched, never sent: a large item is renewed cheaply), else `NotFound`; its new version back.
- Versions: every record carries `version`, 1 at its create, one more at each put or touch. With `if_version=N`
  a put or touch is a compare-and-set: it writes only while the live item is still at version N, atomically on
  the server (one SQLite write transaction, one Redis script), else `Stale` (`NotFound` when it is gone): of
  two writers that read version N and both write, exactly one wins. A realtime session's takeover is one.
- `get(kind, owner, id)`, `find(kind, owner, name)`: the owner's live item, else `NotFound`.
- `list(kind, owner)`: the owner's live items of a kind, oldest first. Another owner's items never appear.
- `delete(kind, owner, id)`: else `NotFound`.
Another owner's item and an expired item read exactly as an absent one (`NotFound`): an HTTP layer answers 404.

Backends, chosen by `open_store(url)`:
- embedded (the default for one machine): SQLite in a state folder (`sqlite:///path/to/folder`, or the folder
  path itself; `memory` for a store private to one process), WAL mode, atomic across the processes of one
  machine (all Serve replicas on it), and it survives a restart of the endpoint. Expired rows are deleted on
  later writes. Keep the folder on a local disk (WAL needs shared memory, so not NFS).
- Redis, for clusters (`redis://host:port/db`, `rediss://…`; `?prefix=` names the key namespace, default
  `vita-audio:`): creates, puts and deletes are Lua scripts (atomic on the server), names are SET-NX-style keys,
  expiry is Redis' own key TTL (`PEXPIREAT`). Durability is the Redis server's: on KubeRay it is the Redis that
  GCS fault tolerance uses, with its own persistence; a Redis started with persistence off (`--save ""
  --appendonly no`, as the tests do) keeps nothing across its own restart, and the store then starts empty.

Calls are blocking and short (a local SQLite transaction, one Redis round trip or two): from async code call
them directly for a few per request, or via `asyncio.to_thread`. A store opens its connection lazily in the
process that uses it; it pickles as its URL (a Serve replica reopens the same store).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOICE, AUDIO, REALTIME, BATCH, FILE = "voice", "audio", "realtime", "batch", "file"
OWNER, GLOBAL = "owner", "global"  # the scope a name is unique in
GLOBAL_SCOPE_KEY = "*"  # the scope key of global names (owner ids are "" or "k_<hex>", never "*")
MAX_NAME_CHARS = 256
KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class StateError(Exception):
    """A refused state operation."""


class NotFound(StateError):
    """No such live item for this owner (absent, expired, or another owner's: all read the same)."""


class Conflict(StateError):
    """The id, or the name in its scope, is taken. `field`: "id" or "name"."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class Full(StateError):
    """The owner already holds `max_items` items of this kind."""


class Stale(StateError):
    """A compare-and-set lost: the item is no longer at the version given (another writer changed it)."""


@dataclass(frozen=True)
class Record:
    kind: str
    id: str
    owner: str
    data: Any
    name: str | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    version: int = 1

    def live(self, now: float | None = None) -> bool:
        return self.expires_at is None or self.expires_at > (time.time() if now is None else now)


def new_id(kind: str) -> str:
    """A fresh id: `<kind>_` + 16 random hex digits (`voice_…`, `audio_…`, as the endpoint already names them)."""
    import uuid

    return f"{kind}_{uuid.uuid4().hex[:16]}"


def check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
        raise ValueError(f"kind {kind!r}: lower-case letters, digits and _ (at most 32)")
    return kind


def check_id(item_id: str) -> str:
    if not isinstance(item_id, str) or not ID_RE.fullmatch(item_id):
        raise ValueError(f"id {item_id!r}: letters, digits, '_', '-', '.' (1 to 128)")
    return item_id


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or owner == GLOBAL_SCOPE_KEY or len(owner) > 128 or any(c.isspace() for c in owner):
        raise ValueError(f"owner {owner!r}: an owner id (serve.keys.owner_id), not a key")
    return owner


def check_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise ValueError(f"name: a non-empty text of at most {MAX_NAME_CHARS} characters")
    return name


def scope_key(scope: str, owner: str) -> str:
    if scope == OWNER:
        return owner
    if scope == GLOBAL:
        return GLOBAL_SCOPE_KEY
    raise ValueError(f"scope {scope!r}: {OWNER!r} or {GLOBAL!r}")


def expiry(expires_at: float | None, ttl_s: float | None, now: float) -> float | None:
    """The absolute expiry (epoch seconds) from one of `expires_at` / `ttl_s`, or None (kept until deleted)."""
    if expires_at is not None and ttl_s is not None:
        raise ValueError("give expires_at or ttl_s, not both")
    if ttl_s is not None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s}: must be > 0")
        return now + float(ttl_s)
    if expires_at is not None:
        if expires_at <= now:
            raise ValueError(f"expires_at={expires_at} is not in the future")
        return float(expires_at)
    return None


def check_version(version: int | None) -> int | None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(f"if_version={version!r}: a record's version (an integer >= 1)")
    return version


def encode_data(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class StateStore:
    """The interface (see the module doc). Backends: `SqliteStore`, `RedisStore`."""

    url: str

    def create(self, kind: str, owner: str, data: Any, *, id: str | None = None, name: str | None = None,
               scope: str = OWNER, expires_at: float | None = None, ttl_s: float | None = None,
               max_items: int | None = None) -> Record:
        raise NotImplementedError

    def put(self, kind: str, owner: str, id: str, data: Any, *, expires_at: float | None = None,
            ttl_s: float | None = None, if_version: int | None = None) -> Record:
        raise NotImplementedError

    def touch(self, kind: str, owner: str, id: str, *, expires_at: float | None = None, ttl_s: float | None = None,
              if_version: int | None = None) -> int:
        raise NotImplementedError

    def get(self, kind: str, owner: str, id: str) -> Record:
        raise NotImplementedError

    def find(self, kind: str, owner: str, name: str, *, scope: str = OWNER) -> Record:
        raise NotImplementedError

    def list(self, kind: str, owner: str) -> list[Record]:
        raise NotImplementedError

    def delete(self, kind: str, owner: str, id: str) -> None:
        raise NotImplementedError

    def purge(self) -> int:
        """Delete expired items now (they are never returned either way); how many went."""
        return 0

    def check(self) -> None:
        """Reach the store now (what a start-up checks before serving): a write transaction on SQLite, a PING
        on Redis. Raises `StateError` saying why not (a folder that cannot be written, a Redis that does not
        answer)."""

    def close(self) -> None:
        pass

    def __reduce__(self):
        return open_store, (self.url,)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


STATE_FILE = "state.sqlite3"
ENV_STATE = "VITA_AUDIO_STATE"


def default_state(env: dict | None = None) -> str:
    """Where the endpoint keeps its state when not told: `$VITA_AUDIO_STATE` (a folder or a URL), else the
    folder `$VITA_AUDIO_CACHE/state` (`~/.cache/vita-audio/state`)."""
    env = os.environ if env is None else env
    if env.get(ENV_STATE):
        return env[ENV_STATE]
    cache = Path(env.get("VITA_AUDIO_CACHE") or Path.home() / ".cache" / "vita-audio")
    return str(cache / "state")


def open_store(url: str | Path) -> StateStore:
    """The store at `url`: `redis://…` / `rediss://…` / `unix://…` (Redis), `sqlite:///folder` or a folder path
    (embedded SQLite, `folder/state.sqlite3`; a path ending in .sqlite3/.sqlite/.db is the database file itself),
    or `memory` (SQLite in this process only, gone when it ends)."""
    text = str(url).strip()
    if not text:
        raise ValueError("state store: give a folder, sqlite:///folder, redis://host:port/db or memory")
    if text.split(":", 1)[0] in ("redis", "rediss", "unix"):
        from serve.state.redis_store import RedisStore

        return RedisStore(text)
    from serve.state.sqlite_store import SqliteStore

    if text in ("memory", "memory:", "sqlite://", "sqlite://:memory:", ":memory:"):
        return SqliteStore(":memory:")
    if text.startswith("sqlite://"):
        text = text[len("sqlite://"):]
    elif "://" in text:
        raise ValueError(f"state store {text!r}: unknown scheme (sqlite://, redis://, rediss://, unix://)")
    path = Path(text).expanduser()
    if path.suffix not in (".sqlite3", ".sqlite", ".db"):
        path = path / STATE_FILE
    return SqliteStore(path)
