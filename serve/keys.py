"""The endpoint's API keys: which keys are accepted, which are revoked, and the owner id each key's items get.

Sources, all optional, merged (no source at all: the endpoint is open and every caller is the one owner ""):
- one key (`api_key`, the simple case: `vita-audio serve --api-key KEY`);
- the environment variable `VITA_AUDIO_API_KEYS` (keys separated by commas, spaces or newlines);
- a keys file (`VITA_AUDIO_API_KEYS_FILE`, or the `keys_file` argument), one entry a line:

      # comments and blank lines are ignored; a label may follow the key after whitespace
      sk-alice-0123456789          alice
      sha256:9f86d081884c7d65...   bob      (the key's SHA-256 in hex: the file need not hold the key itself)
      !sk-old-key                           (a leading "!" revokes: that key gets 401 whatever lists it)
      !sha256:2c26b46b68ffc68f...

  The file is read again whenever its modification time or size changes, so a key is added or revoked on every
  replica that reads the same file without a restart. A keys file that is missing, or that a later edit broke,
  accepts no key from it (logged) until fixed; a broken file at start is an error.

A key's owner id is a hash of the key (`owner_id`): the state store keeps that, never the key. Checks compare
SHA-256 digests with `hmac.compare_digest` against every accepted key, without an early exit.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from serve.api import APIError

ENV_KEYS = "VITA_AUDIO_API_KEYS"
ENV_KEYS_FILE = "VITA_AUDIO_API_KEYS_FILE"
BEARER = "Bearer "
OPEN_OWNER = ""  # the one owner of an endpoint without keys
_HEX64 = re.compile(r"[0-9a-f]{64}")
logger = logging.getLogger(__name__)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def owner_id(key: str) -> str:
    """The owner id of a key's items: `k_` + 32 hex digits of SHA-256(key) (the key cannot be read back from it)."""
    return "k_" + key_digest(key).hex()[:32]


def owner_of_digest(digest: bytes) -> str:
    return "k_" + digest.hex()[:32]


class KeyFileError(ValueError):
    """A keys file line that is neither a key, a `sha256:` digest nor a revocation of one."""


@dataclass(frozen=True)
class KeyEntries:
    accepted: dict[bytes, str] = field(default_factory=dict)  # digest -> label
    revoked: frozenset[bytes] = frozenset()


def parse_entries(text: str, where: str = "keys") -> KeyEntries:
    """Entries of a keys file (see the module doc)."""
    accepted, revoked = {}, set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, *rest = re.split(r"\s+#", line, maxsplit=1)[0].split(None, 1)
        label = rest[0].strip() if rest else ""
        revoke = token.startswith("!")
        token = token[1:] if revoke else token
        if not token:
            raise KeyFileError(f"{where}:{n}: '!' without a key")
        if token.startswith("sha256:"):
            hexdigest = token[len("sha256:"):].lower()
            if not _HEX64.fullmatch(hexdigest):
                raise KeyFileError(f"{where}:{n}: sha256: needs 64 hex digits")
            digest = bytes.fromhex(hexdigest)
        else:
            digest = key_digest(token)
        if revoke:
            revoked.add(digest)
        else:
            accepted[digest] = label or owner_of_digest(digest)
    return KeyEntries(accepted, frozenset(revoked))


def _split_keys(value: str) -> list[str]:
    return [k for k in re.split(r"[,\s]+", value) if k]


class KeySet:
    """The accepted keys of one endpoint. `owner(key)`: the key's owner id, or None (missing, unknown, revoked)."""

    def __init__(self, api_key: str | None = None, keys: list[str] | tuple[str, ...] = (),
                 keys_file: str | os.PathLike | None = None, env: dict | None = None):
        env = os.environ if env is None else env
        fixed = [k for k in (api_key, *keys) if k] + _split_keys(env.get(ENV_KEYS, ""))
        self._fixed = parse_entries("\n".join(fixed), ENV_KEYS) if fixed else KeyEntries()
        path = keys_file or env.get(ENV_KEYS_FILE) or None
        self.keys_file = Path(path) if path else None
        self._file_stamp = None
        self._file = KeyEntries()
        self._lock = threading.Lock()
        self._reload(force=True)

    def __getstate__(self) -> dict:  # digests only (never a key), and no lock: a Serve deployment's argument
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def open(self) -> bool:
        """No key configured at all: every request is accepted, as owner "" (the single-user default)."""
        return not self._fixed.accepted and self.keys_file is None

    def _reload(self, force: bool = False) -> None:
        if self.keys_file is None:
            return
        try:
            st = self.keys_file.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if not force and stamp == self._file_stamp:
            return
        with self._lock:
            entries = KeyEntries()  # a missing or broken file accepts no key from it (fails closed)
            if stamp is not None:
                try:
                    entries = parse_entries(self.keys_file.read_text(), str(self.keys_file))
                except (KeyFileError, OSError, UnicodeDecodeError) as err:
                    if force:  # at start: refuse to start
                        raise
                    logger.error("keys file %s is unreadable; accepting no key from it until fixed: %s",
                                 self.keys_file, err)
            self._file, self._file_stamp = entries, stamp

    def _entries(self) -> tuple[dict[bytes, str], frozenset[bytes]]:
        self._reload()
        accepted = {**self._fixed.accepted, **self._file.accepted}
        return accepted, self._fixed.revoked | self._file.revoked

    def accepts_any(self) -> bool:
        """Some key is accepted now (keys given but every one revoked, or an empty file: every request is a 401)."""
        accepted, revoked = self._entries()
        return bool(set(accepted) - revoked)

    def owner(self, key: str | None) -> str | None:
        """The owner id of `key`, or None where it is missing, unknown or revoked (open endpoint: always "")."""
        if self.open:
            return OPEN_OWNER
        if not key:
            return None
        digest = key_digest(key)
        accepted, revoked = self._entries()
        found = False
        for known in accepted:  # every entry, no early exit
            found |= hmac.compare_digest(known, digest)
        gone = False
        for known in revoked:
            gone |= hmac.compare_digest(known, digest)
        return owner_of_digest(digest) if found and not gone else None

    def label(self, key: str) -> str | None:
        owner = self.owner(key)
        if owner is None or self.open:
            return None
        return self._entries()[0].get(key_digest(key))

    def owner_from_header(self, authorization: str | None) -> str | None:
        """The owner id for an `Authorization: Bearer KEY` header value (None: refused)."""
        if self.open:
            return OPEN_OWNER
        if not authorization or not authorization.startswith(BEARER):
            return None
        return self.owner(authorization[len(BEARER):].strip())

    def check(self, authorization: str | None, extra_keys: list[str] | tuple[str, ...] = ()) -> str:
        """The owner id of a request, or APIError 401. `extra_keys`: keys offered another way (the realtime
        subprotocol `openai-insecure-api-key.KEY`), tried after the header."""
        owner = self.owner_from_header(authorization)
        for key in extra_keys:
            if owner is not None:
                break
            owner = self.owner(key)
        if owner is None:
            raise APIError(401, "missing, wrong or revoked API key (Authorization: Bearer KEY)",
                           code="invalid_api_key", type="authentication_error")
        return owner
