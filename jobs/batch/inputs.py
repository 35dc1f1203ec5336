"""What a batch job reads: one `BatchInput` per item, in a fixed order, with unique ids.

    enumerate_inputs("corpus/", "asr")        # a folder of audio files (LibriSpeech *.trans.txt -> references)
    enumerate_inputs("list.jsonl", "asr")     # JSONL / CSV manifest: id, path, optional text (the reference)
    enumerate_inputs("shard-000.tar", "asr")  # WebDataset-style tar: KEY.flac (+ KEY.txt reference) per item
    enumerate_inputs("shards/", "asr")        # a folder holding only *.tar shards: all of them, in name order
    enumerate_inputs("ds/", "asr")            # Parquet files with audio bytes in a column (Hugging Face layout)
    enumerate_inputs("s3://bucket/ds/", "asr")          # any of these on an object store (jobs.storage)
    enumerate_inputs("texts.jsonl", "tts")    # JSONL / CSV with id, text (or a .txt file, one text a line)
    enumerate_inputs("ljspeech:LJSpeech-1.1/", "asr")   # a corpus by the recipes of jobs.prepare (KIND:PATH[@PARTS]):
    enumerate_inputs("commonvoice:cv/en@test", "tts")   # asr: its audio, transcripts as references; tts: its texts
    enumerate_inputs("batch/requests.jsonl", "requests")  # the OpenAI Batch API's checked lines (jobs.batch.lines)

The order and the ids are what makes a job exactly-once: the result files are keyed by blocks of this list,
so the same source must give the same list on every run (sorted paths, manifest order). Duplicate ids are
refused up front: two rows for one id could never both be "the" result. A tar member is addressed as
`SHARD.tar::MEMBER`, a Parquet row as `FILE.parquet::ROW`, both read in place with `read_audio_bytes`
(`jobs.archives`: ranged reads, no copy of the archive). A Parquet dataset's ids are its `id` column (else
`FILE_STEM-ROW`), its references a `text` / `transcription` / `sentence` column. Corpus layouts (LibriSpeech / LibriTTS transcripts in a
folder, `KIND:PATH` sources) are read by the corpus preparation's recipes (`jobs.prepare.recipes`), so the two
jobs agree on ids and texts.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from jobs import archives
from jobs.batch.lines import load_specs
from jobs.storage import ObjectPath, is_remote, location

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
TAR_SEPARATOR = "::"
TASKS = ("asr", "tts", "requests")


@dataclass(frozen=True)
class BatchInput:
    id: str
    path: str = ""  # asr: an audio file, or SHARD.tar::MEMBER
    text: str | None = None  # asr: the reference transcript (optional); tts: the text to speak
    spec: str | None = None  # requests: the line's spec (JSON; id: its custom_id)


def enumerate_inputs(source: str | os.PathLike, task: str) -> list[BatchInput]:
    """Every input of `source` for `task`, in a deterministic order; ValueError names what is wrong."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {TASKS}")
    if task == "requests":
        items = [BatchInput(spec["custom_id"], spec=json.dumps(spec)) for spec in load_specs(source)]
        _check_unique(items, location(source, "--input"))
        return items
    if is_remote(source):
        return _remote_inputs(location(source, "--input"), task)
    path = location(source, "--input")
    if not path.exists() and _is_corpus_source(str(source)):
        items = _read_corpus(str(source), task)
        _check_unique(items, path)
        return items
    if not path.exists():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if task == "tts":
        if path.is_dir():
            raise ValueError(f"--input {path}: TTS reads a JSONL / CSV / TXT file of texts, not a folder")
        items = _read_texts(path)
    elif path.is_dir():
        items = _read_folder(path)
        if not items:  # a folder of WebDataset shards
            items = [item for shard in sorted(path.glob("*.tar")) for item in _read_tar(shard)]
        if not items:  # a Parquet dataset
            items = _read_parquet(archives.parquet_files(path), task)
    elif path.suffix == ".parquet":
        items = _read_parquet([path], task)
    elif path.suffix == ".tar":
        items = _read_tar(path)
    elif path.suffix in (".jsonl", ".csv"):
        items = _read_manifest(path)
    else:
        raise ValueError(f"--input {path}: expected a folder, a .jsonl / .csv manifest, a .tar shard or a .parquet file")
    _check_unique(items, path)
    if not items:
        raise ValueError(f"--input {path}: no inputs found")
    return items


def _remote_inputs(path: ObjectPath, task: str) -> list[BatchInput]:
    """The same sources on an object store: a manifest / texts / .tar / .parquet object, or a prefix holding
    Parquet files, else .tar shards, else audio files (ids: their paths below the prefix without suffix)."""
    if path.is_file():
        if path.suffix == ".parquet":
            items = _read_parquet([path], task)
        elif task == "tts":
            items = _read_texts(path)
        elif path.suffix == ".tar":
            items = _read_tar(path)
        elif path.suffix in (".jsonl", ".csv"):
            items = _read_manifest(path)
        else:
            raise ValueError(f"--input {path}: expected a prefix, a .jsonl / .csv manifest, a .tar shard or a "
                             ".parquet object")
    elif path.exists():
        files = path.files()
        parquet = [f for f in files if f.name.endswith(".parquet")]
        shards = [f for f in files if f.name.endswith(".tar")]
        if parquet:
            items = _read_parquet(parquet, task)
        elif task == "tts":
            raise ValueError(f"--input {path}: TTS reads a JSONL / CSV / TXT object or a Parquet dataset of texts")
        elif shards:
            items = [item for shard in shards for item in _read_tar(shard)]
        else:
            items = [BatchInput(posixpath.splitext(f.relative_to(path))[0], str(f)) for f in files
                     if f.suffix.lower() in AUDIO_SUFFIXES]
    else:
        raise FileNotFoundError(f"--input {path}: no such object or prefix")
    _check_unique(items, path)
    if not items:
        raise ValueError(f"--input {path}: no inputs found")
    return items


# ---------------------------------------------------------------------------------------------------------
# sources


def _read_folder(root: Path) -> list[BatchInput]:
    """Audio files under `root` (recursive, sorted); ids are relative paths without suffix, except in a
    LibriSpeech or LibriTTS layout, where the utterance ids of the recipes are the ids and their transcripts
    the references."""
    references = _folder_references(root)
    items = []
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES):
        key = (file.parent, file.stem)
        item_id = file.stem if key in references else file.relative_to(root).with_suffix("").as_posix()
        items.append(BatchInput(item_id, str(file), references.get(key)))
    return items


def _folder_references(root: Path) -> dict[tuple[Path, str], str | None]:
    """(folder, utterance id) -> transcript, by the LibriSpeech recipe, else the LibriTTS one (none: {})."""
    from jobs.prepare.recipes import prepare_librispeech, prepare_libritts

    for recipe in (prepare_librispeech, prepare_libritts):
        try:
            parts = recipe(root)
        except ValueError:  # not this layout
            continue
        return {(Path(u.audio[0].path).parent, u.id): u.text for items in parts.values() for u in items if u.audio}
    return {}


def _is_corpus_source(source: str) -> bool:
    from jobs.prepare.recipes import RECIPES

    kind, sep, _ = source.partition(":")
    return bool(sep) and kind.strip().lower().replace("_", "-") in RECIPES


def _read_corpus(source: str, task: str) -> list[BatchInput]:
    """A `KIND:PATH[@PARTS]` corpus by its recipe: ASR reads each utterance's audio (its transcript is the
    reference), TTS speaks each transcript. Segments of longer recordings (Lhotse) are refused: the batch job
    reads whole files."""
    from jobs.prepare.job import SourceSpec
    from jobs.prepare.recipes import RECIPES

    spec = SourceSpec.parse(source)
    parts = RECIPES[spec.kind](spec.path, parts=list(spec.parts) if spec.parts else None)
    items = []
    for utt in (u for group in parts.values() for u in group):
        if utt.task not in (None, task):  # a VITA JSONL line of another task
            continue
        if task == "tts":
            items.append(BatchInput(utt.id, text=utt.text or ""))  # no text: an error row of its own
            continue
        if len(utt.audio) != 1:
            items.append(BatchInput(utt.id, "", utt.text))  # no audio (an unparsable line): an error row
            continue
        ref = utt.audio[0]
        if ref.offset or ref.duration is not None:
            raise ValueError(f"--input {source}: {utt.id} is a {ref.duration:.2f} s segment of {ref.path}; the batch "
                             "job reads whole files (cut the recordings, or use a cuts manifest of whole files)")
        items.append(BatchInput(utt.id, ref.path, utt.text))
    if not items:
        raise ValueError(f"--input {source}: no {task} inputs found")
    return items


def _read_manifest(path: Path) -> list[BatchInput]:
    """JSONL or CSV rows with `path` (relative to the manifest's folder), optional `id` (default: the path
    stem) and optional `text` (the reference)."""
    items = []
    for line, row in _rows(path):
        file = str(row.get("path") or row.get("audio") or "")
        if not file and not row.get("id"):
            raise ValueError(f"{path}:{line}: a row needs a 'path' or at least an 'id' (got keys {sorted(row)})")
        if file and not os.path.isabs(file) and "://" not in file:
            file = str(path.parent / file)
        item_id = str(row.get("id") or Path(file).stem)
        items.append(BatchInput(item_id, file, _text(row.get("text"))))  # no path: an error row, not a crash
    return items


def _read_texts(path: Path) -> list[BatchInput]:
    """TTS texts: JSONL / CSV rows with `text` and optional `id` (default: the line number), or plain lines
    (ids: the line numbers, blank lines skipped)."""
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return [BatchInput(f"{i:06d}", text=ln) for i, ln in enumerate(lines) if ln]
    if path.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"--input {path}: TTS reads a .jsonl, .csv or .txt file of texts")
    # a row without text is kept: it becomes an error row of its own instead of stopping the job
    return [BatchInput(str(row.get("id") or f"{line:06d}"), text=_text(row.get("text")) or "")
            for line, row in _rows(path)]


def _read_tar(path) -> list[BatchInput]:
    """WebDataset convention: members sharing a key (the name up to the first dot) form one sample; the
    audio member is the input, a `.txt` member its reference."""
    items = []
    for key, members in archives.tar_items(path):
        audio = next((name for ext, name in members.items() if "." + ext in AUDIO_SUFFIXES), None)
        if audio is not None:
            items.append(BatchInput(key, f"{path}{TAR_SEPARATOR}{audio}", _text(members.get("txt"))))
    return items


def _read_parquet(files: list, task: str) -> list[BatchInput]:
    """A Parquet dataset's rows: ASR reads each row's audio bytes (`FILE::ROW`), TTS speaks its text."""
    items = []
    for file in files:
        for row, values in archives.parquet_items(file):
            item_id = next((str(values[c]) for c in archives.ID_COLUMNS if values.get(c) is not None),
                           f"{file.stem}-{row:06d}")
            text = next((_text(values[c]) for c in archives.TEXT_COLUMNS if values.get(c) is not None), None)
            items.append(BatchInput(item_id, text=text or "") if task == "tts"
                         else BatchInput(item_id, f"{file}{TAR_SEPARATOR}{row}", text))
    return items


def read_audio_bytes(path: str, max_bytes: int | None = None) -> bytes | str:
    """The bytes of a tar member (`SHARD.tar::MEMBER`), a Parquet row's audio (`FILE.parquet::ROW`) or an
    object (a URL); a local path is returned as it is (admit_audio reads both). Over `max_bytes` is refused
    before it is read (AudioTooLarge)."""
    return archives.read_audio(path, max_bytes)


# ---------------------------------------------------------------------------------------------------------
# helpers


def _rows(path: Path):
    """(line number, dict) per row of a JSONL or CSV file; a malformed JSON line is named."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        for i, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            yield i, {k.strip(): (v or "").strip() for k, v in row.items() if k}
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _check_unique(items: list[BatchInput], source: Path) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise ValueError(f"--input {source}: id {item.id!r} appears twice (items {seen[item.id]} and {i}); "
                             "ids must be unique for exactly-once results")
        seen[item.id] = i
