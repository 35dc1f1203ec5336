"""A resumable job's run folder (prepare, batch, train), written once here for all three jobs.

    folder = RunFolder(out, "batch", outputs=("results", "audio", "summary.json", ...))
    with folder.open(plan, restart=config.restart):     # lock, then compare the plan (or clear on restart)
        writer = BlockWriter(folder, {b: ids}, key="id", write=write_block)
        for batch in stream:
            writer.add(batch)                            # writes a block once all its rows came

- **One driver at a time:** an exclusive lock on `OUT/.lock` while the run is open (a local `flock`; on an
  object store a lease object, `LeaseLock`, whose limits its docstring states).
- **The plan:** `OUT/plan.json` pins the settings that define the output (inputs, models, the recipe...). A
  rerun with another plan is refused in one line naming the first setting that differs; `restart=True` (the
  CLI's `--restart`) clears what the job wrote (`outputs`, never other files) and starts over.
- **A failed start changes nothing:** the plan is written when the job first writes output (`commit`, called
  by the block writer before its first block); a run that fails before that removes the folders, the lock file
  and the folder itself it created, so the next run is not refused by a plan of a run that never ran.
- **Blocks:** input k of the fixed input order belongs to block k // block_size; `block_file` names a block's
  file; every file is written whole (`write_atomic`: under a temporary name beside it, then renamed locally or
  moved into place on an object store), so a block's file is there whole or not at all.
- **Locations:** OUT is a local path or a URL of an object store or any filesystem pyarrow / fsspec knows
  (`jobs.storage.location`: `s3://bucket/run`); an unknown scheme is refused by name before anything starts.
  `local_path` (the training job's folders) still refuses every URL by name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from actors.errors import InputError
from jobs.storage import ObjectPath, StorageError, location, write_atomic

__all__ = ["BlockWriter", "LeaseLock", "RunFolder", "RunFolderError", "block_file", "clear_temporaries",
           "local_path", "lock_run_folder", "write_atomic", "write_if_changed"]

PLAN = "plan.json"
LOCK = ".lock"
RESTART_FLAG = "--restart"  # how the CLI spells `restart=True` in the refusal's advice
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


class RunFolderError(InputError):
    """The run folder refuses this run: another driver holds it, it holds a run with other settings, or the
    location is not one the job can use."""


def out_location(out, flag: str = "--out"):
    """OUT as a local Path or an ObjectPath (`jobs.storage.location`), refused as a RunFolderError by name."""
    try:
        return location(out, flag)
    except StorageError as err:
        raise RunFolderError(str(err)) from None


def local_path(location, flag: str = "--out") -> Path:
    """`location` as a local path; a URL with another scheme than file:// is refused naming the flag."""
    text = os.fspath(location)
    match = _SCHEME.match(text)
    if match is None:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme == "file":
        path = text[len(match.group(1)) + 1:].lstrip("/")
        return Path("/" + path)
    raise RunFolderError(f"{flag} {text}: {scheme}:// locations are not supported; give a local or "
                         "shared-filesystem path")


def block_file(folder, block: int, stem: str = "part", suffix: str = ".parquet"):
    """`folder/<stem>-<block, 6 digits><suffix>`: block b's file (one per block, so a rerun finds it)."""
    return location(folder) / f"{stem}-{block:06d}{suffix}"


def write_if_changed(path, text: str) -> None:
    """Atomically write `text` unless the file already holds it (a finished rerun changes no file)."""
    path = location(path)
    if path.exists() and path.read_text() == text:
        return
    write_atomic(path, text)


def clear_temporaries(*folders) -> None:
    """Remove the temporary files (`.*.tmp`) a killed run left in `folders` (local or on an object store)."""
    for folder in folders:
        for stale in location(folder).glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def flat_settings(plan: dict, prefix: str = "") -> dict:
    """{"decode": {"mode": 1}} -> {"decode.mode": 1}: each setting under the name a refusal uses."""
    flat = {}
    for key, value in plan.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def plan_difference(old: dict, new: dict) -> list[str]:
    """The settings (dotted names, sorted) whose values differ between two plans."""
    a, b = flat_settings(old), flat_settings(json.loads(json.dumps(new)))
    return [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


class RunFolder:
    """One job's output folder: lock, plan, restart, commit, undo of a failed start (module docstring)."""

    def __init__(self, out, job: str, outputs: tuple[str, ...] = (), flag: str = "--out"):
        self.out = out_location(out, flag)
        self.job, self.outputs, self.flag = job, tuple(outputs), flag
        self.plan: dict | None = None
        self.committed = False
        self._made: list[Path] = []

    # -- before start-up (read-only) ----------------------------------------------------------------------

    def check(self, plan: dict, restart: bool = False) -> None:
        """Refuse a plan the folder cannot take (not a folder, another run's settings), changing nothing."""
        if self.out.exists() and not self.out.is_dir():
            raise RunFolderError(f"{self.flag} {self.out}: exists and is not a folder")
        path = self.out / PLAN
        if restart or not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise RunFolderError(f"{self.flag} {self.out}: {PLAN} is not readable JSON; start over with "
                                 f"{RESTART_FLAG} or choose a new {self.flag}") from None
        changed = plan_difference(old, plan)
        if changed:
            name = changed[0]
            was, now = flat_settings(old).get(name, "<unset>"), flat_settings(json.loads(json.dumps(plan))).get(name, "<unset>")
            more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])}{', ...' if len(changed) > 4 else ''})" \
                if len(changed) > 1 else ""
            raise RunFolderError(
                f"{self.flag} {self.out} holds a {self.job} run with other settings: {name} was {_short(was)}, now "
                f"{_short(now)}{more}; rerun with the same settings to resume it, start over with {RESTART_FLAG}, "
                f"or choose a new {self.flag}")

    # -- the run ------------------------------------------------------------------------------------------

    @contextmanager
    def open(self, plan: dict, restart: bool = False):
        """Lock the folder, check (or, with `restart`, clear) it, and yield; a run that fails before `commit`
        leaves the folder as it found it."""
        self.check(plan, restart)
        existed = self.out.exists()
        self.mkdir(self.out)
        lock_existed = (self.out / LOCK).exists()
        handle = lock_run_folder(self.out, self.job, self.flag)
        try:
            if restart:
                self._clear()
            else:
                self.check(plan)  # again under the lock: another driver may have started the folder meanwhile
            before = {p for pattern in self.outputs for p in self.out.glob(pattern)}
            self.plan = plan
            self.committed = (self.out / PLAN).is_file()
            yield self
        except BaseException:
            if not self.committed:  # empty output folders made by others (a stage's actor) go too
                self._made += [p for pattern in self.outputs for p in self.out.glob(pattern) if p not in before]
                self._undo(existed, lock_existed)
            raise
        finally:
            handle.close()

    def mkdir(self, path):
        """Make a folder (and its parents), remembered so that a failed start removes it again (an object
        store has no folders to make)."""
        if isinstance(path, ObjectPath):
            return path
        path = Path(path)
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True)
        self._made += reversed(missing)
        return path

    def commit(self) -> None:
        """Pin the plan (OUT/plan.json) before the first output is written; idempotent."""
        if not self.committed:
            write_atomic(self.out / PLAN, json.dumps(self.plan, indent=1) + "\n")
            self.committed = True

    def _clear(self) -> None:
        for pattern in (*self.outputs, PLAN):
            for path in self.out.glob(pattern):
                if isinstance(path, ObjectPath) and path.is_dir():
                    path.rmtree()
                elif path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def _undo(self, existed: bool, lock_existed: bool) -> None:
        if not lock_existed:
            (self.out / LOCK).unlink(missing_ok=True)
        for path in sorted(set(self._made), key=lambda p: len(p.parts), reverse=True):  # deepest first
            if path == self.out and existed:
                continue
            try:
                path.rmdir()  # only an empty folder goes
            except OSError:
                pass


def lock_run_folder(out, job: str, flag: str = "--out"):
    """An exclusive lock on OUT/.lock, held while the returned handle is open (or its process lives): two
    drivers on one folder would each write the blocks they lack. On an object store: a `LeaseLock`."""
    import fcntl

    if isinstance(out, ObjectPath):
        return LeaseLock(out / LOCK, job, flag).acquire()

    handle = open(Path(out) / LOCK, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunFolderError(f"{flag} {out}: another {job} run is writing there (wait for it, or choose a new "
                             f"{flag})") from None
    return handle


class LeaseLock:
    """OUT/.lock on an object store: a lease object naming its holder (host, pid, a random token) and when it
    expires; the holder renews it every `ttl_s / 3` seconds on a thread and deletes it when the run ends.

    A run is refused while another holder's lease is live. A lease is taken over when it expired (its driver
    died on another machine, or lost the store for `ttl_s`), or at once when its holder ran on this machine
    and its process is gone (a killed driver rerun where it ran waits for nothing).

    Limits, chosen over a conditional create (`If-None-Match: *`, which not every S3-compatible store honours
    and pyarrow cannot send): two drivers that start within `settle_s` of each other both write the lease;
    the read-back after `settle_s` lets only the last writer go on, which holds when the store's reads follow
    its writes (S3 is strongly consistent) and neither write takes longer than `settle_s`. A driver whose
    renewals fail for `ttl_s` (a partitioned network) can overlap with a driver that took the lease over; a
    block then may be written twice, by two identical computations (greedy, same plan), each write whole.
    """

    def __init__(self, path: ObjectPath, job: str, flag: str = "--out", ttl_s: float = 60.0, settle_s: float = 0.5):
        self.path, self.job, self.flag, self.ttl_s, self.settle_s = path, job, flag, ttl_s, settle_s
        self.token = uuid.uuid4().hex
        self.holder = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "job": job}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "LeaseLock":
        other = self._read()
        if other is not None and other.get("token") != self.token and not self._stale(other):
            raise self._refusal(other)
        self._write()
        time.sleep(self.settle_s)
        other = self._read()
        if other is None or other.get("token") != self.token:
            raise self._refusal(other or {})
        self._thread = threading.Thread(target=self._renew, name="run-folder-lease", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if (self._read() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if (self._read() or {}).get("token") == self.token:
                    self._write()
            except OSError:  # the store is unreachable for now: the next renewal tries again
                pass

    def _write(self) -> None:
        self.path.write_text(json.dumps({**self.holder, "expires_at": time.time() + self.ttl_s}))

    def _read(self) -> dict | None:
        try:
            value = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # not a lease (a half-written one cannot exist): stale
        return value if isinstance(value, dict) else {}

    def _stale(self, holder: dict) -> bool:
        if not isinstance(holder.get("expires_at"), (int, float)) or holder["expires_at"] < time.time():
            return True
        if holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # its driver ran here and is gone
            except PermissionError:
                return False
        return False

    def _refusal(self, holder: dict) -> RunFolderError:
        left = max(0.0, (holder.get("expires_at") or 0) - time.time())
        who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}"
        return RunFolderError(f"{self.flag} {self.path.parent}: another {self.job} run is writing there ({who}; its "
                              f"lease {self.path} expires in {left:.0f} s unless renewed); wait for it, or choose a "
                              f"new {self.flag}")


class BlockWriter:
    """The resumable block writer of both Ray Data jobs: gathers the stream's rows by block (each row's block
    from its `key` column; the first row of a key wins, repeats and foreign keys are dropped) and calls
    `write(block, rows)` once every expected key of the block has its row, rows in the expected order. The
    folder's plan is committed before the first block is written."""

    def __init__(self, folder: RunFolder | None, expected: dict[int, list], key: str,
                 write: Callable[[int, list[dict]], None]):
        self.folder, self.key, self.write = folder, key, write
        self.block_of = {k: b for b, keys in expected.items() for k in keys}
        self.order = {k: i for keys in expected.values() for i, k in enumerate(keys)}
        self.expected = {b: len(keys) for b, keys in expected.items()}
        self.rows: dict[int, dict] = {b: {} for b in expected}
        self.written: set[int] = set()
        self.batches = 0
        self.first = self.last = None  # perf_counter of the first and the latest batch

    def add(self, batch) -> list[dict]:
        """Take a batch (a pyarrow Table or a list of dicts); returns the rows it contributed."""
        now = time.perf_counter()
        self.first = self.first if self.first is not None else now
        self.last = now
        self.batches += 1
        taken = []
        for row in (batch.to_pylist() if hasattr(batch, "to_pylist") else batch):
            b = self.block_of.get(row[self.key])
            if b is None or b in self.written or row[self.key] in self.rows[b]:
                continue
            self.rows[b][row[self.key]] = row
            taken.append(row)
            if len(self.rows[b]) == self.expected[b]:
                rows = sorted(self.rows.pop(b).values(), key=lambda r: self.order[r[self.key]])
                if self.folder is not None:
                    self.folder.commit()
                self.write(b, rows)
                self.written.add(b)
        return taken

    def missing(self) -> list:
        """Expected keys without a row (after the stream ended: a step dropped rows, a bug)."""
        return [k for k, b in self.block_of.items() if b not in self.written and k not in self.rows.get(b, {})]


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
