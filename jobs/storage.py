"""Where the data jobs read and write: a local path, or a URL of any filesystem pyarrow or fsspec knows.

    out = location("s3://bucket/runs/asr", "--out")   # an ObjectPath (pyarrow.fs); a local path stays a Path
    write_atomic(out / "results" / "part-000000.parquet", table)
    read_table(out / "results" / "part-000000.parquet")

`location` resolves a URL once per (scheme, bucket) and process: `s3://`, `gs://`, `abfs://`, `hdfs://` by
`pyarrow.fs.FileSystem.from_uri` (credentials and endpoint from the usual environment: `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ... for S3 and S3-compatible stores), every other protocol fsspec has an implementation for
(`memory://`, `gcs://` with gcsfs, ...) through `pyarrow.fs.FSSpecHandler`. A scheme neither knows is refused
naming the flag, before anything starts (a plain `Path` would make a local folder `s3:`). `file://` is local.

`ObjectPath` is the small part of `pathlib.Path` the jobs use (`/`, name, parent, exists, glob, read, unlink),
so the run folder and both jobs take either. What differs on an object store:
- **Writes are moved into place.** `write_atomic` writes a temporary object beside the final key and moves it
  there (a copy and a delete) once whole, as a local file is written under a temporary name and renamed: a
  reader sees the old object or the new one, never a part, even when the data's reader fails part-way.
- **Folders are prefixes.** `mkdir` does nothing; a folder exists while an object lies under it.
- **Appends are rewrites** (`append_line` reads the object and writes it whole again).
- **Workers see the driver's store:** `forwarded_env()` are the storage variables of the driver's environment,
  given to the Ray Data tasks and actors in their runtime env so that they resolve the same endpoint and
  credentials (a Ray started elsewhere does not have them).
"""
from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import uuid
from pathlib import Path

from actors.errors import InputError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# the variables by which pyarrow / the AWS SDK / fsspec find a store and its credentials
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "GOOGLE_APPLICATION_CREDENTIALS",
                 "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING")
_FILESYSTEMS: dict[tuple[str, str], object] = {}  # (scheme, bucket) -> pyarrow FileSystem, per process


class StorageError(InputError):
    """A location the jobs cannot use: an unknown scheme, or a store that refuses the request."""


def scheme_of(location) -> str | None:
    """The URL scheme of `location` in lower case (None for a plain path)."""
    match = _SCHEME.match(os.fspath(location) if not isinstance(location, ObjectPath) else str(location))
    return match.group(1).lower() if match else None


def is_remote(location) -> bool:
    """A URL of another filesystem than the local one (`file://` is local)."""
    if isinstance(location, ObjectPath):
        return True
    return scheme_of(location) not in (None, "file")


def location(text, flag: str = "--out"):
    """A local `Path` (for a plain path or `file://`), else an `ObjectPath`; an unknown scheme is refused by
    name (a StorageError naming `flag`)."""
    if isinstance(text, (Path, ObjectPath)):
        return text
    text = os.fspath(text)
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return Path("/" + text.split("://", 1)[1].lstrip("/"))
    rest = text.split("://", 1)[1]
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{flag} {text}: name a bucket (or host) after {scheme}://")
    return ObjectPath(scheme, _filesystem(scheme, bucket, text, flag), rest.rstrip("/"))


def _filesystem(scheme: str, bucket: str, url: str, flag: str):
    key = (scheme, bucket)
    if key not in _FILESYSTEMS:
        import pyarrow.fs as pafs

        try:
            if scheme in ("s3", "s3a"):  # built here, not by from_uri, which asks the network for the bucket's region
                _FILESYSTEMS[key] = pafs.S3FileSystem(**_s3_options())
            elif scheme in _PYARROW_SCHEMES:
                _FILESYSTEMS[key] = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
            else:
                _FILESYSTEMS[key] = _fsspec_filesystem(scheme, url, flag)
        except StorageError:  # named already
            raise
        except (ValueError, OSError) as err:  # ArrowInvalid is a ValueError
            raise StorageError(f"{flag} {url}: {err}") from None
    return _FILESYSTEMS[key]


_PYARROW_SCHEMES = ("gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def _s3_options() -> dict:
    """S3FileSystem's options from the environment: the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, an
    http:// one for a store without TLS) and the region (AWS_REGION / AWS_DEFAULT_REGION, else us-east-1);
    credentials come from the SDK's usual chain (AWS_ACCESS_KEY_ID, profiles, instance roles)."""
    options = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, sep, rest = endpoint.partition("://")
        options.update(endpoint_override=rest.rstrip("/") if sep else endpoint, scheme=scheme if sep else "https")
    return options


def _fsspec_filesystem(scheme: str, url: str, flag: str):
    import fsspec
    import pyarrow.fs as pafs

    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{flag} {url}: no filesystem for {scheme}:// locations ({err}); give a local path, "
                           "s3://, gs://, or a URL of a filesystem fsspec has installed") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def reset_filesystems() -> None:
    """Forget the filesystems resolved so far (the environment changed: another endpoint, other credentials)."""
    _FILESYSTEMS.clear()


def forwarded_env() -> dict[str, str]:
    """The storage variables set in this process's environment (for the workers' runtime env)."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def ray_remote_args(*paths) -> dict:
    """Extra Ray options of a job's tasks and actors when it reads or writes an object store: the storage
    variables of the driver's environment in their runtime env (merged into the job's own env vars)."""
    env = forwarded_env()
    if not env or not any(is_remote(p) for p in paths if p):
        return {}
    return {"runtime_env": {"env_vars": env}}


class ObjectPath:
    """A file or folder (prefix) on a pyarrow filesystem, with the Path methods the jobs use."""

    def __init__(self, scheme: str, fs, path: str):
        self.scheme, self.fs, self.path = scheme, fs, path.rstrip("/")

    # -- names ----------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name) -> "ObjectPath":
        return ObjectPath(self.scheme, self.fs, posixpath.join(self.path, os.fspath(name)))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.scheme, self.fs, posixpath.dirname(self.path) or self.path)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def resolve(self) -> "ObjectPath":
        return self

    def relative_to(self, other: "ObjectPath") -> str:
        return posixpath.relpath(self.path, other.path)

    # -- what is there ----------------------------------------------------------------------------------------
    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_symlink(self) -> bool:
        return False

    def size(self) -> int:
        return self._info().size

    def iterdir(self) -> list["ObjectPath"]:
        return self._list(recursive=False)

    def glob(self, pattern: str) -> list["ObjectPath"]:
        """The direct children whose name matches `pattern` (fnmatch; no `**`)."""
        return [p for p in self._list(recursive=False) if fnmatch.fnmatchcase(p.name, pattern)]

    def files(self) -> list["ObjectPath"]:
        """Every file below this folder, sorted by path."""
        import pyarrow.fs as pafs

        return sorted((p for p, kind in self._entries(recursive=True) if kind == pafs.FileType.File),
                      key=lambda p: p.path)

    def _list(self, recursive: bool) -> list["ObjectPath"]:
        return sorted((p for p, _ in self._entries(recursive)), key=lambda p: p.path)

    def _entries(self, recursive: bool):
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [(ObjectPath(self.scheme, self.fs, info.path), info.type) for info in infos]

    # -- reading and writing --------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One whole object (atomic on an object store: readers see the old or the new object)."""
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def open_input(self):
        """A seekable file object (ranged reads on an object store)."""
        return self.fs.open_input_file(self.path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Nothing to make: a folder of an object store is the prefix of its objects."""

    def rmdir(self) -> None:
        """Nothing to remove (see mkdir); an object store has no empty folders."""

    def rmtree(self) -> None:
        self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
        try:
            self.fs.delete_dir(self.path)
        except (FileNotFoundError, OSError):
            pass


# ---------------------------------------------------------------------------------------------------------
# the operations of the jobs, on a Path or an ObjectPath


def write_atomic(path, data) -> None:
    """Write text, bytes, a binary file object (copied in chunks, never whole in memory: an upload) or a pyarrow
    Table (as Parquet) so that `path` is never seen part-written: the data goes to a temporary file beside it
    (`.NAME.<token>.tmp`: two writers never share one), moved into place once whole and deleted if the
    write fails (a reader that raises part-way, a store that refuses). Locally the move is a rename; on an object
    store a copy and a delete, so the final key appears whole or not at all (pyarrow's output stream cannot abort:
    closing it completes what was uploaded, which must not happen at the final key). A killed writer can leave a
    temporary file (`jobs.run_folder.clear_temporaries` removes them)."""
    path = path if isinstance(path, ObjectPath) else Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # two writers never share one
    try:
        with _open_output(temp) as out:
            if hasattr(data, "read"):
                _copy(data, out)
            elif isinstance(data, (str, bytes)):
                out.write(data.encode("utf-8") if isinstance(data, str) else data)
            else:
                import pyarrow.parquet as pq

                pq.write_table(data, out)
        if isinstance(path, ObjectPath):
            path.fs.move(temp.path, path.path)
        else:
            os.replace(temp, path)
    except BaseException:
        try:
            temp.unlink(missing_ok=True)
        except OSError:  # the store is unreachable: the write's own error is the one to raise
            pass
        raise


def _open_output(path):
    return path.fs.open_output_stream(path.path) if isinstance(path, ObjectPath) else open(path, "wb")


def _copy(source, out, chunk: int = 1 << 20) -> None:
    while block := source.read(chunk):
        out.write(block)


def append_line(path, line: str) -> None:
    """Append one line (a local append; on an object store the object is read and written whole)."""
    if isinstance(path, ObjectPath):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + line + "\n")
        return
    with open(path, "a") as f:
        f.write(line + "\n")


def read_table(path, **kwargs):
    """A Parquet file as a pyarrow Table (columns=, schema= as pyarrow.parquet.read_table takes them)."""
    import pyarrow.parquet as pq

    if isinstance(path, ObjectPath):
        return pq.read_table(path.path, filesystem=path.fs, **kwargs)
    return pq.read_table(path, **kwargs)


def read_metadata(path):
    """A Parquet file's footer (its row count, row groups)."""
    import pyarrow.parquet as pq

    if isinstance(path, ObjectPath):
        with path.fs.open_input_file(path.path) as f:
            return pq.read_metadata(f)
    return pq.read_metadata(path)


def read_json(path) -> dict:
    return json.loads(path.read_text())
