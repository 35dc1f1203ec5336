"""Corpus recipes: a corpus folder -> its utterances, one `Utterance` per input, in a fixed order.

    prepare_librispeech("LibriSpeech/", parts=["dev-clean"])   # {part: [Utterance, ...]}
    prepare_libritts("LibriTTS/")                               # every part found
    prepare_ljspeech("LJSpeech-1.1/")
    prepare_commonvoice("cv-corpus-17.0/en/")                   # train.tsv, dev.tsv, ... + clips/
    prepare_vita_jsonl("data/vita_jsonl/")                      # *.jsonl: {"messages": [...], "audios": [...]}
    prepare_lhotse("manifests/")                                # *_recordings_*/ *_supervisions_*/ *_cuts_*.jsonl[.gz]
    prepare_parquet("s3://bucket/ds/")                          # Parquet audio dataset (Hugging Face layout)
    prepare_webdataset("s3://bucket/shards/")                   # WebDataset tar shards: KEY.flac + KEY.txt

In the manner of Lhotse's recipes (`prepare_<corpus>(corpus_dir, output_dir, parts)`): each is a pure parser
that reads only the corpus's text files (transcripts, metadata, manifests) and never opens an audio file; the
audio is read later, in the Ray Data pipeline, where a bad file becomes an error row instead of a crash. A
line that cannot be parsed is an `Utterance` with `error` set, for the same reason. With `output_dir` the
utterances of each part are also written to `output_dir/<corpus>_<part>.jsonl`. Split names are constants;
when none are named every split found is read; a folder where nothing is found is a ValueError naming it.

The archive recipes (`parquet`, `webdataset`) read a local folder or an object-store prefix (`s3://...`,
`jobs.storage`) in place: their utterances' audio is `ARCHIVE::ROW` or `SHARD.tar::MEMBER`, read by
`jobs.archives` when the pipeline checks it (ranged reads, never a copy of the archive). A file's split is
its name up to the first `-` (Hugging Face names them `train-00000-of-00004.parquet`).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.tokens.chat import ASR_INSTRUCTION, TTS_INSTRUCTION
from pipeline.tokens.vocab import AUDIO_PLACEHOLDER

AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus")
LIBRISPEECH_PARTS = ("dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100", "train-clean-360",
                     "train-other-500")
LIBRITTS_PARTS = LIBRISPEECH_PARTS  # LibriTTS (and LibriTTS-R) reuse LibriSpeech's split names
LJSPEECH_PARTS = ("all",)  # LJSpeech ships no splits
COMMONVOICE_PARTS = ("train", "dev", "test", "validated", "other", "invalidated")
COMMONVOICE_DEFAULT_SKIP = ("invalidated",)  # rejected by Common Voice's own reviewers: only when named
LHOTSE_TYPES = ("recordings", "supervisions", "cuts")


# The rates the corpora are published at (a file at another rate is resampled like any other, and counted).
LIBRISPEECH_RATE = 16000
LIBRITTS_RATE = 24000
LJSPEECH_RATE = 22050


@dataclass(frozen=True)
class AudioRef:
    """One audio of an utterance: a file, or a segment of it (Lhotse supervisions and cuts)."""

    path: str
    offset: float = 0.0  # seconds into the file
    duration: float | None = None  # seconds from offset (None: to the end)
    channel: int | None = None  # None: the pipeline's channel policy
    sample_rate: int | None = None  # declared by the corpus or a manifest (informational: every rate is resampled)


@dataclass(frozen=True)
class Utterance:
    """One input of a corpus. Recipes' utterances (a transcript + one audio) give an ASR and a TTS sample;
    VITA JSONL lines carry their own conversation and task."""

    id: str  # the corpus's own id, unique within the source
    part: str  # the split it came from
    audio: tuple[AudioRef, ...] = ()
    text: str | None = None  # transcript (what is said in audio[0])
    messages: str | None = None  # VITA JSONL: the conversation as JSON (with <|audio|> placeholders)
    task: str | None = None  # VITA JSONL: asr | tts | sqa | text (from the prompts); recipes: None
    speaker: str | None = None
    language: str | None = None
    error: str | None = None  # the line could not be parsed: the input becomes an error row with this reason


# ---------------------------------------------------------------------------------------------------------
# LibriSpeech / LibriTTS


def prepare_librispeech(corpus_dir, output_dir=None, parts=None) -> dict[str, list[Utterance]]:
    """`PART/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt` ("UTT TRANSCRIPT" lines) beside `UTT.flac`.

    corpus_dir may be the LibriSpeech folder (parts below it) or one part folder itself."""
    root = _folder(corpus_dir, "LibriSpeech")
    found = _parts_with(root, "*.trans.txt")
    out = {}
    for part, folder in _choose(found, parts, root, "LibriSpeech transcripts (*.trans.txt)").items():
        items = []
        for trans in sorted(folder.rglob("*.trans.txt")):
            speaker = trans.name.split("-")[0]
            for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                audio = _sibling_audio(trans.parent, utt)
                items.append(Utterance(utt, part, (AudioRef(str(audio), sample_rate=LIBRISPEECH_RATE),),
                                       text.strip() or None, speaker=speaker,
                                       language="en", error=None if text.strip() else f"{trans}:{n}: no transcript"))
        out[part] = items
    return _written(out, output_dir, "librispeech")


def prepare_libritts(corpus_dir, output_dir=None, parts=None, text: str = "normalized") -> dict[str, list[Utterance]]:
    """`PART/SPEAKER/CHAPTER/UTT.wav` with `UTT.normalized.txt` (or `.original.txt`, `text="original"`)."""
    if text not in ("normalized", "original"):
        raise ValueError(f"text={text!r}; expected 'normalized' or 'original'")
    root = _folder(corpus_dir, "LibriTTS")
    found = _parts_with(root, f"*.{text}.txt")
    out = {}
    for part, folder in _choose(found, parts, root, f"LibriTTS transcripts (*.{text}.txt)").items():
        items = []
        for txt in sorted(folder.rglob(f"*.{text}.txt")):
            utt = txt.name[: -len(f".{text}.txt")]
            transcript = txt.read_text(encoding="utf-8").strip()
            items.append(Utterance(utt, part, (AudioRef(str(_sibling_audio(txt.parent, utt)), sample_rate=LIBRITTS_RATE),),
                                   transcript or None,
                                   speaker=utt.split("_")[0], language="en",
                                   error=None if transcript else f"{txt}: empty transcript"))
        out[part] = items
    return _written(out, output_dir, "libritts")


# ---------------------------------------------------------------------------------------------------------
# LJSpeech


def prepare_ljspeech(corpus_dir, output_dir=None, parts=None) -> dict[str, list[Utterance]]:
    """`metadata.csv` ("ID|raw text|normalized text", no header) and `wavs/ID.wav`; the normalized text is used."""
    root = _folder(corpus_dir, "LJSpeech")
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise ValueError(f"{root}: no LJSpeech metadata.csv found")
    _choose({"all": root}, parts, root, "LJSpeech")
    items = []
    for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        utt = fields[0].strip()
        transcript = (fields[2] if len(fields) > 2 and fields[2].strip() else fields[1] if len(fields) > 1 else "").strip()
        items.append(Utterance(utt, "all", (AudioRef(str(root / "wavs" / f"{utt}.wav"), sample_rate=LJSPEECH_RATE),),
                               transcript or None,
                               speaker="LJ", language="en",
                               error=None if transcript else f"{metadata}:{n}: no text"))
    if not items:
        raise ValueError(f"{metadata}: no utterances found")
    return _written({"all": items}, output_dir, "ljspeech")


# ---------------------------------------------------------------------------------------------------------
# Common Voice


def prepare_commonvoice(corpus_dir, output_dir=None, parts=None) -> dict[str, list[Utterance]]:
    """A locale folder: `PART.tsv` (tab-separated, a header with `path` and `sentence`) and `clips/`.

    With no parts named, every split found except `invalidated` (Common Voice's rejected clips)."""
    root = _folder(corpus_dir, "Common Voice")
    found = {p: root / f"{p}.tsv" for p in COMMONVOICE_PARTS if (root / f"{p}.tsv").is_file()}
    if parts is None:
        found = {p: f for p, f in found.items() if p not in COMMONVOICE_DEFAULT_SKIP}
    out = {}
    for part, tsv in _choose(found, parts, root, "Common Voice split files (train.tsv, dev.tsv, ...)").items():
        items = []
        with open(tsv, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if not reader.fieldnames or "path" not in reader.fieldnames or "sentence" not in reader.fieldnames:
                raise ValueError(f"{tsv}: expected a header with 'path' and 'sentence', got {reader.fieldnames}")
            for n, row in enumerate(reader, start=2):
                clip = (row.get("path") or "").strip()
                sentence = (row.get("sentence") or "").strip()
                utt = Path(clip).stem or f"{part}-line{n}"
                error = None if clip and sentence else f"{tsv}:{n}: {'no path' if not clip else 'no sentence'}"
                items.append(Utterance(utt, part, (AudioRef(str(root / "clips" / clip)),) if clip else (),
                                       sentence or None, speaker=row.get("client_id") or None,
                                       language=row.get("locale") or root.name, error=error))
        out[part] = items
    return _written(out, output_dir, "commonvoice")


# ---------------------------------------------------------------------------------------------------------
# VITA-Audio JSONL


def prepare_vita_jsonl(corpus_dir, output_dir=None, parts=None, audio_root=None) -> dict[str, list[Utterance]]:
    """One `.jsonl` file, or a folder of them (each file is a part, named by its stem). Each line is
    `{"messages": [{"role", "content"}, ...], "audios": [path, ...]}` ("conversations" also accepted); every
    `<|audio|>` of the contents takes the next path. Relative paths are resolved against `audio_root`, else the
    file's folder, else its parent (mini-speech's vita_jsonl/ names paths from the corpus root)."""
    path = Path(os.fspath(corpus_dir))
    if path.is_file():
        found = {path.stem: path}
    else:
        root = _folder(path, "VITA JSONL")
        found = {f.stem: f for f in sorted(root.glob("*.jsonl"))}
    out = {}
    for part, file in _choose(found, parts, path, "VITA JSONL files (*.jsonl)").items():
        bases = [Path(audio_root)] if audio_root else [file.parent, file.parent.parent]
        items = []
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                items.append(_vita_line(line, f"{file.stem}-{n:06d}", part, bases, f"{file}:{n}"))
        out[part] = items
    return _written(out, output_dir, "vita_jsonl")


def _vita_line(line: str, utt: str, part: str, bases: list[Path], where: str) -> Utterance:
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as err:
        return Utterance(utt, part, error=f"{where}: not JSON ({err.msg})")
    messages = sample.get("messages") or sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        return Utterance(utt, part, error=f"{where}: needs 'messages': a list of {{'role', 'content'}} objects")
    audios = sample.get("audios") or []
    if not isinstance(audios, list) or not all(isinstance(a, str) for a in audios):
        return Utterance(utt, part, error=f"{where}: 'audios' must be a list of paths")
    placeholders = sum(m["content"].count(AUDIO_PLACEHOLDER) for m in messages)
    if placeholders != len(audios):
        return Utterance(utt, part, messages=json.dumps(messages),
                         error=f"{where}: {placeholders} {AUDIO_PLACEHOLDER} placeholder(s) but {len(audios)} audio path(s)")
    refs = tuple(AudioRef(_resolve(a, bases)) for a in audios)
    text = next((m["content"].replace(AUDIO_PLACEHOLDER, "").strip() for m in messages
                 if m.get("role") in ("assistant", "gpt")), None)
    return Utterance(utt, part, refs, text or None, json.dumps(messages, ensure_ascii=False), vita_task(messages))


def vita_task(messages: list[dict]) -> str:
    """The task of a conversation, from the original's prompts: asr, tts, sqa (any other speech), text."""
    user = " ".join(m["content"] for m in messages if m.get("role") in ("user", "human"))
    if ASR_INSTRUCTION in user:
        return "asr"
    if TTS_INSTRUCTION in user:
        return "tts"
    if any(AUDIO_PLACEHOLDER in m["content"] for m in messages):
        return "sqa"
    return "text"


def _resolve(path: str, bases: list[Path]) -> str:
    if os.path.isabs(path):
        return path
    for base in bases:
        if (base / path).exists():
            return str(base / path)
    return str(bases[0] / path)  # missing: an error row naming this path


# ---------------------------------------------------------------------------------------------------------
# Lhotse manifests


def prepare_lhotse(corpus_dir, output_dir=None, parts=None) -> dict[str, list[Utterance]]:
    """Lhotse manifests (JSONL or JSONL.gz), read with the `lhotse` package: `<name>_cuts_<part>` files (one
    utterance per cut with supervisions: its span of the recording, the supervisions' texts joined), or
    `<name>_recordings_<part>` + `<name>_supervisions_<part>` pairs (one utterance per supervision). A path
    to one cuts or supervisions file is read as that part alone. Relative audio paths are resolved against
    the manifest's folder, else the working folder."""
    path = Path(os.fspath(corpus_dir))
    files = [path] if path.is_file() else sorted(p for p in _folder(path, "Lhotse").iterdir()
                                                 if p.name.endswith((".jsonl", ".jsonl.gz")))
    found: dict[str, dict[str, Path]] = {}
    for file in files:
        kind, part = _lhotse_name(file)
        if kind:
            found.setdefault(part, {})[kind] = file
    usable = {p: f for p, f in found.items() if "cuts" in f or "supervisions" in f}
    out = {}
    for part, group in _choose(usable, parts, path, "Lhotse cuts or supervisions manifests").items():
        base = group.get("cuts", group.get("supervisions")).parent
        if "cuts" in group:
            out[part] = _from_cuts(group["cuts"], part, base)
        else:
            recordings = group.get("recordings") or _sibling_recordings(group["supervisions"])
            out[part] = _from_supervisions(group["supervisions"], recordings, part, base)
    return _written(out, output_dir, "lhotse")


def _lhotse_name(file: Path) -> tuple[str | None, str]:
    stem = file.name.removesuffix(".gz").removesuffix(".jsonl")
    for kind in LHOTSE_TYPES:
        marker = f"_{kind}"
        if stem == kind or stem.endswith(marker) or f"{marker}_" in stem:
            part = stem.split(f"{marker}_", 1)[1] if f"{marker}_" in stem else "all"
            return kind, part
    return None, ""


def _sibling_recordings(supervisions: Path) -> Path:
    candidate = supervisions.with_name(supervisions.name.replace("_supervisions", "_recordings"))
    if not candidate.is_file():
        raise ValueError(f"{supervisions}: no recordings manifest beside it (expected {candidate.name})")
    return candidate


def _from_supervisions(supervisions: Path, recordings: Path, part: str, base: Path) -> list[Utterance]:
    from lhotse import load_manifest_lazy

    recs = {r.id: r for r in load_manifest_lazy(recordings)}
    items = []
    for sup in load_manifest_lazy(supervisions):
        rec = recs.get(sup.recording_id)
        if rec is None:
            items.append(Utterance(sup.id, part, error=f"{supervisions}: recording {sup.recording_id!r} not in "
                                                       f"{recordings.name}"))
            continue
        channel = sup.channel if isinstance(sup.channel, int) else None
        items.append(_lhotse_utterance(sup.id, part, rec, sup.start, sup.duration, channel, [sup], base))
    return items


def _from_cuts(cuts_file: Path, part: str, base: Path) -> list[Utterance]:
    from lhotse import load_manifest_lazy

    items = []
    for cut in load_manifest_lazy(cuts_file):
        if not cut.supervisions:
            continue  # a cut without a transcript holds no sample
        rec = getattr(cut, "recording", None)
        if rec is None:
            items.append(Utterance(cut.id, part, error=f"{cuts_file}: cut {cut.id!r} has no recording"))
            continue
        channel = cut.channel if isinstance(getattr(cut, "channel", None), int) else None
        items.append(_lhotse_utterance(cut.id, part, rec, cut.start, cut.duration, channel, cut.supervisions, base))
    return items


def _lhotse_utterance(utt, part, rec, start, duration, channel, supervisions, base: Path) -> Utterance:
    texts = [s.text.strip() for s in supervisions if s.text and s.text.strip()]
    sources = [s for s in rec.sources if s.type == "file"]
    if not sources:
        types = sorted({s.type for s in rec.sources})
        return Utterance(utt, part, text=" ".join(texts) or None,
                         error=f"recording {rec.id!r}: audio source type {types} is not supported (only 'file')")
    path = sources[0].source
    path = path if os.path.isabs(path) or not (base / path).exists() else str(base / path)
    whole = start <= 0 and abs(duration - rec.duration) < 1e-3
    ref = AudioRef(str(path), 0.0 if whole else float(start), None if whole else float(duration), channel,
                   int(rec.sampling_rate))
    first = supervisions[0]
    return Utterance(utt, part, (ref,), " ".join(texts) or None, speaker=first.speaker, language=first.language,
                     error=None if texts else f"supervision {first.id!r}: no text")


# ---------------------------------------------------------------------------------------------------------
# archives: Parquet datasets with the audio in a column, WebDataset tar shards (local or on an object store)


def prepare_parquet(corpus_dir, output_dir=None, parts=None) -> dict[str, list[Utterance]]:
    """A Parquet audio dataset (a file or every `*.parquet` below a folder or prefix): one utterance per row,
    its audio the row's audio column (`jobs.archives.audio_column`), its transcript a `text` /
    `transcription` / `sentence` column, its id an `id` column (else `FILE_STEM-ROW`)."""
    from jobs import archives

    found: dict[str, list] = {}
    for file in _archive_files(corpus_dir, ".parquet", "Parquet"):
        found.setdefault(_split_of(file.name), []).append(file)
    out = {}
    for part, files in _choose(found, parts, corpus_dir, "Parquet files (*.parquet)").items():
        items = []
        for file in files:
            for row, values in archives.parquet_items(file):
                utt = next((str(values[c]) for c in archives.ID_COLUMNS if values.get(c) is not None),
                           f"{file.stem}-{row:06d}")
                text = next((str(values[c]).strip() for c in archives.TEXT_COLUMNS if values.get(c)), None)
                items.append(Utterance(utt, part, (AudioRef(f"{file}{archives.SEPARATOR}{row}"),), text or None,
                                       speaker=_maybe(values, "speaker_id", "speaker", "client_id"),
                                       language=_maybe(values, "language", "locale"),
                                       error=None if text else f"{file}{archives.SEPARATOR}{row}: no transcript"))
        out[part] = items
    return _written(out, output_dir, "parquet")


def prepare_webdataset(corpus_dir, output_dir=None, parts=None) -> dict[str, list[Utterance]]:
    """WebDataset tar shards (a `.tar` or every `*.tar` below a folder or prefix): members sharing a key form one
    utterance, the audio member its audio (`KEY.flac`, `.wav`, ...), `KEY.txt` its transcript."""
    from jobs import archives

    found: dict[str, list] = {}
    for shard in _archive_files(corpus_dir, ".tar", "WebDataset"):
        found.setdefault(_split_of(shard.name), []).append(shard)
    out = {}
    for part, shards in _choose(found, parts, corpus_dir, "tar shards (*.tar)").items():
        items = []
        for shard in shards:
            for key, members in archives.tar_items(shard):
                audio = next((m for ext, m in members.items() if "." + ext in AUDIO_SUFFIXES), None)
                text = (members.get("txt") or "").strip()
                if audio is None:
                    items.append(Utterance(key, part, text=text or None, error=f"{shard}: {key} has no audio member"))
                    continue
                items.append(Utterance(key, part, (AudioRef(f"{shard}{archives.SEPARATOR}{audio}"),), text or None,
                                       error=None if text else f"{shard}: {key} has no .txt transcript"))
        out[part] = items
    return _written(out, output_dir, "webdataset")


def _archive_files(corpus_dir, suffix: str, what: str) -> list:
    from jobs.storage import ObjectPath, location

    root = location(corpus_dir, "--source")
    if not root.exists():
        raise FileNotFoundError(f"{what} corpus {root}: no such file, folder or prefix")
    if root.is_file():
        return [root]
    files = root.files() if isinstance(root, ObjectPath) else sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
    return [f for f in files if f.name.endswith(suffix)]


def _split_of(name: str) -> str:
    return name.split(".")[0].split("-")[0] or "all"


def _maybe(values: dict, *columns: str) -> str | None:
    return next((str(values[c]) for c in columns if values.get(c) is not None), None)


# ---------------------------------------------------------------------------------------------------------
# helpers


def _folder(corpus_dir, what: str) -> Path:
    root = Path(os.fspath(corpus_dir))
    if not root.exists():
        raise FileNotFoundError(f"{what} corpus {root}: no such folder")
    if not root.is_dir():
        raise ValueError(f"{what} corpus {root}: not a folder")
    return root


def _parts_with(root: Path, pattern: str) -> dict[str, Path]:
    """Split folders: root itself if it is one (or a speaker or chapter folder: `pattern` files at most two
    levels below it), else its children holding `pattern` files anywhere below them."""
    if any(next(root.glob(f"{'*/' * depth}{pattern}"), None) is not None for depth in range(3)):
        return {root.name: root}
    return {child.name: child for child in sorted(root.iterdir())
            if child.is_dir() and next(child.rglob(pattern), None) is not None}


def _choose(found: dict, parts, root: Path, what: str) -> dict:
    """The named parts (each must exist), or every part found; ValueError naming the folder if none."""
    if parts is not None:
        parts = [parts] if isinstance(parts, str) else list(parts)
        missing = [p for p in parts if p not in found]
        if missing:
            have = ", ".join(sorted(found)) or "none"
            raise ValueError(f"{root}: no part {', '.join(map(repr, missing))} (found: {have})")
        return {p: found[p] for p in parts}
    if not found:
        raise ValueError(f"{root}: no {what} found")
    return dict(found)


def _sibling_audio(folder: Path, utt: str) -> Path:
    for suffix in AUDIO_SUFFIXES:
        if (folder / f"{utt}{suffix}").exists():
            return folder / f"{utt}{suffix}"
    return folder / f"{utt}{AUDIO_SUFFIXES[0]}"  # missing: the pipeline reports it


def _written(parts: dict[str, list[Utterance]], output_dir, corpus: str) -> dict[str, list[Utterance]]:
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for part, items in parts.items():
            with open(out / f"{corpus}_{part}.jsonl", "w", encoding="utf-8") as f:
                for item in items:
                    f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
    return parts


def read_utterances(path) -> list[Utterance]:
    """The utterances a recipe wrote with `output_dir` (`.jsonl`, or `.jsonl.gz`)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Utterance(**{**row, "audio": tuple(AudioRef(**a) for a in row["audio"])}) for row in rows]


RECIPES = {
    "librispeech": prepare_librispeech,
    "libritts": prepare_libritts,
    "ljspeech": prepare_ljspeech,
    "commonvoice": prepare_commonvoice,
    "vita-jsonl": prepare_vita_jsonl,
    "lhotse": prepare_lhotse,
    "parquet": prepare_parquet,
    "webdataset": prepare_webdataset,
}
ARCHIVE_KINDS = ("parquet", "webdataset")  # the recipes that read an object store as well as a local path
