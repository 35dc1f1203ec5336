"""Audio inside archives, read in place (local or on an object store): WebDataset tar shards and Parquet datasets
with the audio bytes in a column (the layout of Hugging Face audio datasets), one item at a time.

    tar_items("s3://b/shards/train-000.tar")      # [(key, {ext: member}), ...], `.txt` members read
    parquet_items("s3://b/ds/train-0.parquet")    # [(row, {column: value}), ...] without the audio bytes
    read_audio("s3://b/shards/train-000.tar::k1.flac")   # bytes of one member (ranged reads, no download)
    read_audio("s3://b/ds/train-0.parquet::17")           # the audio bytes of row 17
    read_audio("s3://b/clips/a.flac")                     # a whole object's bytes; a local path stays a path

An item is addressed as `ARCHIVE::MEMBER` (a tar member's name, or a Parquet file's row number). Nothing is
copied to local disk: a tar shard is read through a seekable file (ranged GETs on an object store, buffered)
whose member offsets are indexed once per process; a Parquet row is read from its row group, the audio
column alone, and the last few row groups stay cached, so the rows of one batch (neighbours in the input
order) cost one read. Parquet audio: the `audio` column (else the first struct column with a `bytes` field,
else the first binary column), a struct `{bytes, path}` as `datasets.Audio` writes it, or plain bytes.
"""
from __future__ import annotations

import io
import os
import posixpath
import tarfile
import threading
from collections import OrderedDict

from jobs.storage import ObjectPath, location

SEPARATOR = "::"
TEXT_COLUMNS = ("text", "transcription", "transcript", "sentence", "normalized_text", "raw_text")
ID_COLUMNS = ("id", "key", "utt_id", "audio_id", "file", "file_id")
_LOCK = threading.Lock()
_TAR_INDEX: dict[str, dict[str, tuple[int, int]]] = {}  # shard -> member -> (data offset, size)
_ROW_GROUPS: OrderedDict = OrderedDict()  # (file, row group) -> list of audio values
_LAYOUTS: dict[str, tuple[list[int], str]] = {}  # file -> row group starts, audio column
_KEEP_ROW_GROUPS = 4


class ArchiveItemMissing(FileNotFoundError):
    """The archive has no such member or row."""


def _key(archive) -> str:
    """A cache key of an archive: its name, and for a local file its size and time (a rewritten file is read
    anew; an object store's archives are written once)."""
    path = location(archive, "--input")
    if isinstance(path, ObjectPath):
        return str(path)
    stat = os.stat(path)
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def split(reference: str) -> tuple[str, str] | None:
    """`ARCHIVE::MEMBER` -> (archive, member); None for a plain path or URL."""
    if SEPARATOR not in reference:
        return None
    archive, member = reference.split(SEPARATOR, 1)
    return archive, member


def read_audio(reference: str, max_bytes: int | None = None) -> bytes | str:
    """The encoded audio of a reference: a tar member or a Parquet row by `ARCHIVE::MEMBER`, an object by its
    URL; a local file's path is returned as it is (the audio reader opens it). Over `max_bytes` is refused
    before it is read (pipeline.audio.AudioTooLarge)."""
    parts = split(reference)
    if parts is None:
        path = location(reference, "audio")
        if not isinstance(path, ObjectPath):
            return str(path)
        _check_size(reference, path.size() if path.is_file() else _missing(reference), max_bytes)
        return path.read_bytes()
    archive, member = parts
    if archive.endswith(".parquet"):
        return _parquet_audio(archive, member, max_bytes)
    return _tar_member(archive, member, max_bytes)


def _missing(reference: str):
    raise FileNotFoundError(f"{reference}: no such file or object")


def _check_size(reference: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        from pipeline.audio import AudioTooLarge

        raise AudioTooLarge(f"{reference} is {size} bytes, over the limit of {{limit}}={max_bytes}",
                            "max_decoded_bytes")


# ---------------------------------------------------------------------------------------------------------
# tar shards


def open_seekable(path):
    """A buffered, seekable binary file of a local path or an object (ranged reads of 256 KiB)."""
    path = location(path, "--input")
    if not isinstance(path, ObjectPath):
        return open(path, "rb")
    return io.BufferedReader(_RawFile(path.open_input()), buffer_size=256 * 1024)


class _RawFile(io.RawIOBase):
    """A pyarrow random-access file as a raw file object (so that io.BufferedReader can buffer it)."""

    def __init__(self, native):
        self.native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.native.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.native.seek(offset, whence)

    def tell(self) -> int:
        return self.native.tell()

    def close(self) -> None:
        self.native.close()
        super().close()


def tar_items(shard) -> list[tuple[str, dict[str, str]]]:
    """WebDataset samples of a shard: members sharing a key (the name up to the first dot) form one sample,
    `(key, {extension: member name or, for .txt members, their text})`, sorted by key. Indexes the shard's
    members for `read_audio` as it goes (one pass over the headers)."""
    samples: dict[str, dict[str, str]] = {}
    index = {}
    with open_seekable(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            index[member.name] = (member.offset_data, member.size)
            key, _, ext = posixpath.basename(member.name).partition(".")
            key = posixpath.join(posixpath.dirname(member.name), key)
            if ext == "txt":
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read().decode("utf-8").strip()
            else:
                samples.setdefault(key, {})[ext.lower()] = member.name
    with _LOCK:
        _TAR_INDEX[_key(shard)] = index
    return sorted(samples.items())


def _tar_member(shard: str, member: str, max_bytes: int | None) -> bytes:
    key = _key(shard)
    with _LOCK:
        index = _TAR_INDEX.get(key)
    if index is None:
        tar_items(shard)
        with _LOCK:
            index = _TAR_INDEX[key]
    if member not in index:
        raise ArchiveItemMissing(f"{shard} has no member {member!r}")
    offset, size = index[member]
    _check_size(f"{shard}{SEPARATOR}{member}", size, max_bytes)
    path = location(shard, "--input")
    if not isinstance(path, ObjectPath):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    with path.open_input() as f:
        return f.read_at(size, offset)


# ---------------------------------------------------------------------------------------------------------
# Parquet datasets


def parquet_files(root) -> list:
    """The Parquet files of a dataset: the file itself, or every `*.parquet` below a folder, sorted."""
    root = location(root, "--input")
    if isinstance(root, ObjectPath):
        return [root] if root.is_file() else [p for p in root.files() if p.name.endswith(".parquet")]
    return [root] if root.is_file() else sorted(p for p in root.rglob("*.parquet") if p.is_file())


def audio_column(schema) -> str:
    """The column holding the audio (see the module docstring); ValueError naming the columns if none."""
    import pyarrow as pa

    if "audio" in schema.names:
        return "audio"
    for field in schema:
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            return field.name
    for field in schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field.name
    raise ValueError(f"no audio column (a struct with 'bytes', or binary) among {schema.names}")


def parquet_items(file) -> list[tuple[int, dict]]:
    """(row number, the row's other columns) of every row of one Parquet file; the audio column is not read."""
    from jobs.storage import read_table

    path = location(file, "--input")
    schema = _schema(path)
    audio = audio_column(schema)
    columns = [n for n in schema.names if n != audio and n in (*TEXT_COLUMNS, *ID_COLUMNS)]
    table = read_table(path, columns=columns) if columns else None
    n = table.num_rows if table is not None else _metadata(path).num_rows
    rows = table.to_pylist() if table is not None else [{} for _ in range(n)]
    return list(enumerate(rows))


def _parquet_layout(file: str, key: str) -> tuple[list[int], str]:
    """(the first row of each row group, and the total at the end; the audio column) of a file, read from its
    footer once per process."""
    with _LOCK:
        layout = _LAYOUTS.get(key)
    if layout is None:
        meta = _metadata(location(file, "--input"))
        starts = [0]
        for g in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        layout = (starts, audio_column(meta.schema.to_arrow_schema()))
        with _LOCK:
            _LAYOUTS[key] = layout
    return layout


def _schema(path):
    return _metadata(path).schema.to_arrow_schema()


def _metadata(path):
    from jobs.storage import read_metadata

    return read_metadata(path)


def _parquet_audio(file: str, member: str, max_bytes: int | None) -> bytes:
    try:
        row = int(member)
    except ValueError:
        raise ArchiveItemMissing(f"{file}: {member!r} is not a row number") from None
    key = _key(file)
    layout = _parquet_layout(file, key)
    starts, column = layout
    if not 0 <= row < starts[-1]:
        raise ArchiveItemMissing(f"{file} has {starts[-1]} rows, no row {row}")
    g = next(i for i in range(len(starts) - 1) if row < starts[i + 1])
    start = starts[g]
    with _LOCK:
        values = _ROW_GROUPS.get((key, g))
        if values is not None:
            _ROW_GROUPS.move_to_end((key, g))
    if values is None:  # one ranged read of the row group's audio column
        import pyarrow.parquet as pq

        path = location(file, "--input")
        with (path.open_input() if isinstance(path, ObjectPath) else open(path, "rb")) as f:
            values = pq.ParquetFile(f).read_row_group(g, columns=[column]).column(0).to_pylist()
        with _LOCK:
            _ROW_GROUPS[(key, g)] = values
            while len(_ROW_GROUPS) > _KEEP_ROW_GROUPS:
                _ROW_GROUPS.popitem(last=False)
    value = values[row - start]
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        source = value.get("path") if isinstance(value, dict) else None
        if source:  # a dataset that references its files instead of embedding them
            return read_audio(source if os.path.isabs(source) or "://" in source
                              else str(location(file, "--input").parent / source), max_bytes)
        raise ValueError(f"{file}{SEPARATOR}{row}: the row holds no audio bytes")
    _check_size(f"{file}{SEPARATOR}{row}", len(data), max_bytes)
    return data
