"""The endpoint's files (OpenAI's /v1/files): metadata in the state store (kind FILE, owned by the API key
that uploaded it), bytes in the files folder (`Args.files`), one file per id, written under a temporary name
and renamed. Another key's file reads exactly as an absent one (NotFound: the routes answer 404).

    files = FileStore(state, "/srv/vita-files")
    obj = files.create(owner, b"...", "requests.jsonl", "batch")   # OpenAI's FileObject dict
    files.path(owner, obj["id"])                                     # where its bytes are

Batch outputs (purpose `batch_output`) are files too: the batch's output and error JSONL and each spoken
answer, so an output line references audio by file id instead of carrying it as base64.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from serve.state import FILE, Conflict, NotFound, StateStore

PURPOSES = ("batch", "batch_output", "assistants", "user_data", "fine-tune", "vision")
UPLOAD_PURPOSES = ("batch", "user_data", "assistants", "fine-tune", "vision")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def default_files_dir(env: dict | None = None) -> str:
    """`$VITA_AUDIO_CACHE/files` (`~/.cache/vita-audio/files`): beside the embedded state store's folder."""
    env = os.environ if env is None else env
    cache = Path(env.get("VITA_AUDIO_CACHE") or Path.home() / ".cache" / "vita-audio")
    return str(cache / "files")


class FileStore:
    """Files by owner: `create`, `add` (bytes already written), `get`, `list`, `path`, `delete`."""

    def __init__(self, state: StateStore, root: str | os.PathLike):
        self.state = state
        self.root = Path(root)

    def blob(self, file_id: str) -> Path:
        return self.root / "blobs" / file_id

    def create(self, owner: str, data: bytes, filename: str, purpose: str, file_id: str | None = None) -> dict:
        file_id = file_id or new_file_id()
        path = self.blob(file_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{file_id}.{uuid.uuid4().hex[:8]}.tmp")
        temp.write_bytes(data)
        os.replace(temp, path)
        return self.add(owner, file_id, filename, purpose)

    def add(self, owner: str, file_id: str, filename: str, purpose: str) -> dict:
        """Record a file whose bytes are at `blob(file_id)`; an id recorded already keeps its first record."""
        obj = {"id": file_id, "object": "file", "bytes": self.blob(file_id).stat().st_size,
               "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed",
               "expires_at": None, "status_details": None}
        try:
            return self.state.create(FILE, owner, obj, id=file_id).data
        except Conflict:  # a finalize that ran twice: the first record stands
            return self.get(owner, file_id)

    def get(self, owner: str, file_id: str) -> dict:
        try:
            return self.state.get(FILE, owner, file_id).data
        except ValueError:  # not an id at all: as absent
            raise NotFound(file_id) from None

    def list(self, owner: str, purpose: str | None = None) -> list[dict]:
        return [r.data for r in self.state.list(FILE, owner) if purpose is None or r.data.get("purpose") == purpose]

    def path(self, owner: str, file_id: str) -> Path:
        self.get(owner, file_id)
        return self.blob(file_id)

    def delete(self, owner: str, file_id: str) -> None:
        self.get(owner, file_id)
        self.state.delete(FILE, owner, file_id)
        self.blob(file_id).unlink(missing_ok=True)
