"""The endpoint's files (OpenAI's /v1/files): metadata in the state store (kind FILE, owned by the API key
that uploaded it), bytes in the files store (`Args.files`), one object per id. Another key's file reads exactly
as an absent one (NotFound: the routes answer 404).

The files store is a local folder or a URL of any filesystem `jobs.storage` knows (`s3://bucket/vita-files`):
on a multi-node cluster the batch drivers run wherever Ray places them, and read the batches' inputs and write
their results through the same location. Each file is written whole (`jobs.storage.write_atomic`: a local file
under a temporary key beside it, then renamed or moved into place), so a reader never sees a part of it.

    files = FileStore(state, "s3://bucket/vita-files")
    obj = files.create(owner, b"...", "requests.jsonl", "batch")   # OpenAI's FileObject dict
    files.location(owner, obj["id"])                                 # where its bytes are (Path or ObjectPath)

Batch outputs (purpose `batch_output`) are files too: the batch's output and error JSONL and each spoken
answer, so an output line references audio by file id instead of carrying it as base64.
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from jobs.storage import location, write_atomic
from serve.state import FILE, Conflict, NotFound, StateStore

PURPOSES = ("batch", "batch_output", "assistants", "user_data", "fine-tune", "vision")
UPLOAD_PURPOSES = ("batch", "user_data", "assistants", "fine-tune", "vision")
CHUNK = 1 << 20  # bytes per read when a file is copied or served


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def default_files_dir(env: dict | None = None) -> str:
    """`$VITA_AUDIO_CACHE/files` (`~/.cache/vita-audio/files`): beside the embedded state store's folder."""
    env = os.environ if env is None else env
    cache = Path(env.get("VITA_AUDIO_CACHE") or Path.home() / ".cache" / "vita-audio")
    return str(cache / "files")


class FileStore:
    """Files by owner: `create`, `get`, `list`, `location`, `chunks`, `delete`."""

    def __init__(self, state: StateStore, root):
        self.state = state
        self.root = location(root, "files")  # a local Path or a jobs.storage.ObjectPath

    def blob(self, file_id: str):
        return self.root / "blobs" / file_id

    def create(self, owner: str, data: bytes | BinaryIO, filename: str, purpose: str,
               file_id: str | None = None) -> dict:
        """Write `data` (bytes, or a binary file object copied in chunks: an upload is never held whole in
        memory) as one file and record it; an id recorded already (a finalize that ran twice) keeps its first
        record."""
        file_id = file_id or new_file_id()
        path = self.blob(file_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        obj = {"id": file_id, "object": "file", "bytes": path.stat().st_size if isinstance(path, Path) else path.size(),
               "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed",
               "expires_at": None, "status_details": None}
        try:
            return self.state.create(FILE, owner, obj, id=file_id).data
        except Conflict:
            return self.get(owner, file_id)

    def get(self, owner: str, file_id: str) -> dict:
        try:
            return self.state.get(FILE, owner, file_id).data
        except ValueError:  # not an id at all: as absent
            raise NotFound(file_id) from None

    def list(self, owner: str, purpose: str | None = None) -> list[dict]:
        return [r.data for r in self.state.list(FILE, owner) if purpose is None or r.data.get("purpose") == purpose]

    def location(self, owner: str, file_id: str):
        """Where the owner's file is (NotFound for another key's)."""
        self.get(owner, file_id)
        return self.blob(file_id)

    def chunks(self, owner: str, file_id: str) -> Iterator[bytes]:
        """The owner's file, read in chunks (a ranged stream on an object store). Its owner is checked now."""
        path = self.location(owner, file_id)

        def read():
            with (open(path, "rb") if isinstance(path, Path) else path.open_input()) as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return read()

    def delete(self, owner: str, file_id: str) -> None:
        self.get(owner, file_id)
        self.state.delete(FILE, owner, file_id)
        self.blob(file_id).unlink(missing_ok=True)
