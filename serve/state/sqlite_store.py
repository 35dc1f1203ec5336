"""The embedded state store: one SQLite database file in the state folder, WAL mode.

Atomicity across threads and processes of one machine: every write is one `BEGIN IMMEDIATE` transaction (SQLite's
write lock, waited for up to `busy_timeout_s`), and names are unique by a UNIQUE index on (kind, scope, name),
so of any number of concurrent creates of one name exactly one commits; a compare-and-set (`if_version`) reads
and writes the row's version in one such transaction. Expired rows never read back (every query filters on
`expires_at`) and are deleted by every write. The database survives a restart of the process (a database made
before rows had versions gains the column, every row at version 1).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from serve.state import (OWNER, Conflict, Full, NotFound, Record, Stale, StateError, StateStore, check_id,
                         check_kind, check_name, check_owner, check_version, encode_data, expiry, new_id, scope_key)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    owner TEXT NOT NULL,
    name TEXT,
    scope TEXT,
    data TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (kind, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS records_name ON records (kind, scope, name) WHERE name IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_owner ON records (kind, owner, created_at);
CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_at) WHERE expires_at IS NOT NULL;
"""
COLUMNS = "kind, id, owner, name, data, created_at, expires_at, version"
LIVE = "(expires_at IS NULL OR expires_at > ?)"


class SqliteStore(StateStore):
    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = str(path)
        self.url = "memory" if self.path == ":memory:" else f"sqlite://{Path(self.path).resolve()}"
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = None

    # -- connection -----------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        deadline = time.monotonic() + self.busy_timeout_s
        while True:  # many processes opening one new file at once: the WAL switch may report "locked"
            try:
                if self.path != ":memory:":
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(SCHEMA)
                if "version" not in {row[1] for row in conn.execute("PRAGMA table_info(records)")}:
                    conn.execute("ALTER TABLE records ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.01)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _write(self, work):
        """Run `work(conn, now)` in one BEGIN IMMEDIATE transaction (expired rows are deleted first)."""
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                conn.execute("DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
                out = work(conn, now)
                conn.execute("COMMIT")
                return out
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple) -> list[tuple]:
        with self._lock:
            return self._db().execute(sql, args).fetchall()

    @staticmethod
    def _record(row: tuple) -> Record:
        kind, item_id, owner, name, data, created_at, expires_at, version = row
        return Record(kind, item_id, owner, json.loads(data), name, created_at, expires_at, version)

    # -- operations -----------------------------------------------------------------------------------------
    def create(self, kind: str, owner: str, data: Any, *, id: str | None = None, name: str | None = None,
               scope: str = OWNER, expires_at: float | None = None, ttl_s: float | None = None,
               max_items: int | None = None) -> Record:
        check_kind(kind), check_owner(owner), check_name(name)
        item_id = check_id(id) if id is not None else new_id(kind)
        scope_k = scope_key(scope, owner) if name is not None else None
        blob = encode_data(data)

        def work(conn, now):
            expires = expiry(expires_at, ttl_s, now)
            if conn.execute("SELECT 1 FROM records WHERE kind = ? AND id = ?", (kind, item_id)).fetchone():
                raise Conflict(f"{kind} {item_id!r} already exists", "id")
            if name is not None and conn.execute("SELECT 1 FROM records WHERE kind = ? AND scope = ? AND name = ?",
                                                 (kind, scope_k, name)).fetchone():
                raise Conflict(f"a {kind} named {name!r} already exists", "name")
            if max_items is not None:
                (held,) = conn.execute("SELECT COUNT(*) FROM records WHERE kind = ? AND owner = ?",
                                       (kind, owner)).fetchone()
                if held >= max_items:
                    raise Full(f"the {kind} store is full ({max_items} per key); delete one first")
            conn.execute(f"INSERT INTO records ({COLUMNS}, scope) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
                         (kind, item_id, owner, name, blob, now, expires, scope_k))
            return Record(kind, item_id, owner, data, name, now, expires)

        try:
            return self._write(work)
        except sqlite3.IntegrityError as err:  # unreachable under the write lock; kept as the last guard
            raise Conflict(f"{kind} {item_id!r} or name {name!r} already exists ({err})", "name") from None

    def put(self, kind: str, owner: str, id: str, data: Any, *, expires_at: float | None = None,
            ttl_s: float | None = None, if_version: int | None = None) -> Record:
        check_kind(kind), check_owner(owner), check_id(id), check_version(if_version)
        blob = encode_data(data)

        def work(conn, now):
            expires = expiry(expires_at, ttl_s, now)
            row = conn.execute("SELECT owner, version, name, created_at FROM records WHERE kind = ? AND id = ?",
                               (kind, id)).fetchone()
            if row is None and if_version is None:
                conn.execute(f"INSERT INTO records ({COLUMNS}) VALUES (?, ?, ?, NULL, ?, ?, ?, 1)",
                             (kind, id, owner, blob, now, expires))
                return Record(kind, id, owner, data, None, now, expires, 1)
            version = self._next_version(kind, id, row, owner, if_version)
            conn.execute("UPDATE records SET data = ?, expires_at = ?, version = ? WHERE kind = ? AND id = ?",
                         (blob, expires, version, kind, id))
            return Record(kind, id, owner, data, row[2], row[3], expires, version)

        return self._write(work)

    def touch(self, kind: str, owner: str, id: str, *, expires_at: float | None = None, ttl_s: float | None = None,
              if_version: int | None = None) -> int:
        check_kind(kind), check_owner(owner), check_id(id), check_version(if_version)

        def work(conn, now):
            expires = expiry(expires_at, ttl_s, now)
            row = conn.execute("SELECT owner, version FROM records WHERE kind = ? AND id = ?", (kind, id)).fetchone()
            version = self._next_version(kind, id, row, owner, if_version)
            conn.execute("UPDATE records SET expires_at = ?, version = ? WHERE kind = ? AND id = ?",
                         (expires, version, kind, id))
            return version

        return self._write(work)

    @staticmethod
    def _next_version(kind: str, id: str, found: tuple | None, owner: str, if_version: int | None) -> int:
        """The version a write of the row found (owner, version, ...; expired rows are gone inside a write) gives
        it: the owner's live row, at `if_version` when given, else NotFound / Stale."""
        if found is None or found[0] != owner:  # another owner's reads as absent
            raise NotFound(f"{kind} {id!r} does not exist")
        if if_version is not None and found[1] != if_version:
            raise Stale(f"{kind} {id!r} is at version {found[1]}, not {if_version}")
        return found[1] + 1

    def get(self, kind: str, owner: str, id: str) -> Record:
        rows = self._read(f"SELECT {COLUMNS} FROM records WHERE kind = ? AND id = ? AND owner = ? AND {LIVE}",
                          (kind, id, owner, time.time()))
        if not rows:
            raise NotFound(f"{kind} {id!r} does not exist")
        return self._record(rows[0])

    def find(self, kind: str, owner: str, name: str, *, scope: str = OWNER) -> Record:
        rows = self._read(f"SELECT {COLUMNS} FROM records WHERE kind = ? AND scope = ? AND name = ? AND owner = ? "
                          f"AND {LIVE}", (kind, scope_key(scope, owner), name, owner, time.time()))
        if not rows:
            raise NotFound(f"no {kind} named {name!r}")
        return self._record(rows[0])

    def list(self, kind: str, owner: str) -> list[Record]:
        rows = self._read(f"SELECT {COLUMNS} FROM records WHERE kind = ? AND owner = ? AND {LIVE} "
                          "ORDER BY created_at, id", (kind, owner, time.time()))
        return [self._record(r) for r in rows]

    def delete(self, kind: str, owner: str, id: str) -> None:
        def work(conn, now):
            gone = conn.execute("DELETE FROM records WHERE kind = ? AND id = ? AND owner = ?", (kind, id, owner))
            if gone.rowcount == 0:
                raise NotFound(f"{kind} {id!r} does not exist")

        self._write(work)

    def purge(self) -> int:
        with self._lock:
            before = self._db().total_changes
            self._write(lambda conn, now: None)
            return self._db().total_changes - before

    def check(self) -> None:
        try:
            self.purge()
        except (sqlite3.Error, OSError) as err:
            raise StateError(f"state store {self.path}: {err}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

