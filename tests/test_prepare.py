"""Corpus preparation (jobs/prepare): recipes on tiny folders written here; the Ray Data job on mini-speech and on
a damaged corpus (one error row per damaged file, rows + errors == inputs); samples decode back to the chat
layout with the encoder's codes; a finished rerun changes nothing; a killed driver resumes to the same samples."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from driver_kill import kill_driver_when

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini(shared_dir) -> Path:
    return shared_dir / "corpora" / "mini-speech"


# ---------------------------------------------------------------------------------------------------------
# recipes (pure parsers: audio files are never opened, so empty placeholder files do)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_librispeech_recipe_parts_and_errors(tmp_path):
    from jobs.prepare.recipes import prepare_librispeech, read_utterances

    root = tmp_path / "LibriSpeech"
    for part, spk in (("dev-clean", "84"), ("test-clean", "61")):
        chapter = root / part / spk / "121"
        (chapter).mkdir(parents=True)
        (chapter / f"{spk}-121.trans.txt").write_text(f"{spk}-121-0000 HELLO WORLD\n{spk}-121-0001 SECOND ONE\n\n")
        _touch(chapter / f"{spk}-121-0000.flac")  # -0001 is missing: the pipeline reports it, the recipe lists it
    parts = prepare_librispeech(root, output_dir=tmp_path / "manifests")
    assert sorted(parts) == ["dev-clean", "test-clean"]
    first = parts["dev-clean"][0]
    assert (first.id, first.text, first.speaker, first.part) == ("84-121-0000", "HELLO WORLD", "84", "dev-clean")
    assert first.audio[0].path.endswith("84-121-0000.flac") and parts["dev-clean"][1].audio[0].path.endswith("0001.flac")
    assert read_utterances(tmp_path / "manifests" / "librispeech_dev-clean.jsonl") == parts["dev-clean"]
    assert list(prepare_librispeech(root, parts=["test-clean"])) == ["test-clean"]
    assert list(prepare_librispeech(root / "dev-clean")) == ["dev-clean"]  # a part folder itself
    with pytest.raises(ValueError, match="no part 'train-clean-100'.*found: dev-clean, test-clean"):
        prepare_librispeech(root, parts=["train-clean-100"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no LibriSpeech transcripts"):
        prepare_librispeech(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        prepare_librispeech(tmp_path / "nope")


def test_libritts_ljspeech_commonvoice_recipes(tmp_path):
    from jobs.prepare.recipes import prepare_commonvoice, prepare_libritts, prepare_ljspeech

    tts = tmp_path / "LibriTTS" / "train-clean-100" / "19" / "198"
    tts.mkdir(parents=True)
    _touch(tts / "19_198_000000_000000.wav")
    (tts / "19_198_000000_000000.normalized.txt").write_text("Hello, world.\n")
    (tts / "19_198_000000_000000.original.txt").write_text("HELLO world\n")
    (utt,) = prepare_libritts(tmp_path / "LibriTTS")["train-clean-100"]
    assert (utt.id, utt.text, utt.speaker) == ("19_198_000000_000000", "Hello, world.", "19")
    assert utt.audio[0].path.endswith(".wav")
    assert prepare_libritts(tmp_path / "LibriTTS", text="original")["train-clean-100"][0].text == "HELLO world"

    lj = tmp_path / "LJSpeech-1.1"
    (lj / "wavs").mkdir(parents=True)
    (lj / "metadata.csv").write_text("LJ001-0001|Printing, in 1st|Printing, in first\nLJ001-0002|raw only|\nLJ001-0003|\n")
    items = prepare_ljspeech(lj)["all"]
    assert [(u.id, u.text) for u in items] == [("LJ001-0001", "Printing, in first"), ("LJ001-0002", "raw only"),
                                               ("LJ001-0003", None)]
    assert items[0].audio[0].path == str(lj / "wavs" / "LJ001-0001.wav") and "no text" in items[2].error
    with pytest.raises(ValueError, match="no LJSpeech metadata.csv"):
        prepare_ljspeech(tmp_path)

    cv = tmp_path / "cv" / "en"
    (cv / "clips").mkdir(parents=True)
    header = "client_id\tpath\tsentence_id\tsentence\tup_votes\tdown_votes\tlocale\n"
    (cv / "train.tsv").write_text(header + "c1\tcommon_voice_en_1.mp3\ts1\tA \"quoted\" line.\t2\t0\ten\n"
                                  "c2\tcommon_voice_en_2.mp3\ts2\t\t2\t0\ten\n")
    (cv / "dev.tsv").write_text(header + "c3\tcommon_voice_en_3.mp3\ts3\tDev line.\t2\t0\ten\n")
    (cv / "invalidated.tsv").write_text(header + "c4\tcommon_voice_en_4.mp3\ts4\tBad.\t0\t3\ten\n")
    parts = prepare_commonvoice(cv)
    assert sorted(parts) == ["dev", "train"]  # invalidated only when named
    first, second = parts["train"]
    assert (first.id, first.text, first.speaker, first.language) == ("common_voice_en_1", 'A "quoted" line.', "c1", "en")
    assert first.audio[0].path == str(cv / "clips" / "common_voice_en_1.mp3") and "no sentence" in second.error
    assert list(prepare_commonvoice(cv, parts=["invalidated"])) == ["invalidated"]


def test_vita_jsonl_recipe(mini, tmp_path):
    from jobs.prepare.recipes import prepare_vita_jsonl

    parts = prepare_vita_jsonl(mini / "vita_jsonl")
    assert sorted(parts) == ["asr", "sqa", "tts"]
    assert {u.task for u in parts["asr"]} == {"asr"} and {u.task for u in parts["tts"]} == {"tts"}
    sqa = parts["sqa"][0]
    assert sqa.task == "sqa" and [Path(a.path).name for a in sqa.audio] == ["q00.wav", "a00.wav"]
    assert all(Path(a.path).is_file() for items in parts.values() for u in items for a in u.audio)

    bad = tmp_path / "mixed.jsonl"
    bad.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "<|audio|>"}], "audios": []}),
        json.dumps({"conversations": [{"role": "human", "content": "<|audio|>"}, {"role": "gpt", "content": "x"}],
                    "audios": ["/abs/q.wav"]}),
    ]) + "\n")
    text, broken, mismatch, old = prepare_vita_jsonl(bad)["mixed"]
    assert text.task == "text" and text.error is None
    assert "not JSON" in broken.error and f"{bad}:2" in broken.error
    assert "1 <|audio|> placeholder(s) but 0 audio path(s)" in mismatch.error
    assert old.task == "sqa" and old.audio[0].path == "/abs/q.wav"


def test_lhotse_recipe_supervisions_and_cuts(tmp_path):
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    from jobs.prepare.recipes import prepare_lhotse

    audio = tmp_path / "audio"
    audio.mkdir()
    rate = 16000
    sf.write(audio / "rec1.wav", np.zeros(rate * 4, np.float32), rate)
    sf.write(audio / "rec2.wav", np.zeros(rate * 2, np.float32), rate)
    recs = RecordingSet.from_recordings([Recording.from_file(audio / "rec1.wav"), Recording.from_file(audio / "rec2.wav")])
    sups = SupervisionSet.from_segments([
        SupervisionSegment("rec1-a", "rec1", start=0.5, duration=1.5, text="first part", speaker="s1", language="en"),
        SupervisionSegment("rec1-b", "rec1", start=2.0, duration=2.0, text="second part"),
        SupervisionSegment("rec2-a", "rec2", start=0.0, duration=2.0, text="whole file"),
    ])
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    recs.to_file(manifests / "mini_recordings_dev.jsonl.gz")
    sups.to_file(manifests / "mini_supervisions_dev.jsonl.gz")
    CutSet.from_manifests(recordings=recs, supervisions=sups).trim_to_supervisions().to_file(
        tmp_path / "mini_cuts_train.jsonl")

    items = prepare_lhotse(manifests)["dev"]
    assert [(u.id, u.text) for u in items] == [("rec1-a", "first part"), ("rec1-b", "second part"),
                                               ("rec2-a", "whole file")]
    first = items[0].audio[0]
    assert (first.offset, first.duration, first.sample_rate) == (0.5, 1.5, 16000) and items[0].speaker == "s1"
    assert items[2].audio[0].duration is None  # the whole recording: read as a file
    with gzip.open(manifests / "mini_supervisions_dev.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 3  # read from the documented JSONL.gz format by lhotse itself

    cuts = prepare_lhotse(tmp_path / "mini_cuts_train.jsonl")["train"]
    assert sorted(u.text for u in cuts) == ["first part", "second part", "whole file"]
    with pytest.raises(ValueError, match="no Lhotse cuts or supervisions manifests"):
        prepare_lhotse(audio)


def test_source_specs_and_config_errors(tmp_path, mini):
    from cli import prepare as cmd_prepare
    from jobs.prepare.job import PrepareConfig, SourceSpec
    from jobs.prepare.recipes import RECIPES

    assert cmd_prepare.KINDS == tuple(RECIPES) and set(cmd_prepare.TASKS) == set(__import__("jobs.prepare.samples",
                                                                                          fromlist=["TASKS"]).TASKS)
    spec = SourceSpec.parse(f"librispeech:{mini / 'LibriSpeech'}@dev-clean-mini")
    assert spec.kind == "librispeech" and spec.parts == ("dev-clean-mini",)
    assert SourceSpec.parse(f"vita_jsonl:{mini / 'vita_jsonl'}").kind == "vita-jsonl"
    for text, words in (("nokind", "expected KIND:PATH"), ("wav:/x", "unknown kind 'wav'"),
                        (f"ljspeech:{tmp_path}/missing", "does not exist"), (f"ljspeech:{tmp_path}@", "name parts")):
        with pytest.raises((ValueError, FileNotFoundError), match=words):
            SourceSpec.parse(text)
    with pytest.raises(ValueError, match="choose from asr, tts, sqa, text"):
        PrepareConfig(sources=[f"ljspeech:{tmp_path}"], out=str(tmp_path / "o"), tasks=("asr", "qa"))
    with pytest.raises(ValueError, match="every text count >= 1"):
        PrepareConfig(sources=[f"ljspeech:{tmp_path}"], out=str(tmp_path / "o"), ratio=(0, 10))


# ---------------------------------------------------------------------------------------------------------
# the Ray Data job


def _config(models, sources, out, **kw):
    from jobs.pools import PoolConfig
    from jobs.prepare.job import PrepareConfig

    kw.setdefault("encoder", PoolConfig(size=1, batch_size=8))
    return PrepareConfig(sources=[str(s) for s in sources], out=str(out), models=str(models), progress=False, **kw)


@pytest.fixture(scope="module")
def prepared(ray_session, tiny_models, mini, tmp_path_factory):
    """mini-speech (LibriSpeech layout + the VITA JSONL files) prepared once for the tests below."""
    from jobs.prepare.job import run_prepare

    out = tmp_path_factory.mktemp("prepared")
    manifest = run_prepare(_config(tiny_models, [f"librispeech:{mini / 'LibriSpeech'}", f"vita-jsonl:{mini / 'vita_jsonl'}"],
                                   out, block_size=16))
    return out, manifest


def test_mini_speech_to_shards(prepared):
    from jobs.prepare.shards import read_shards
    from jobs.prepare.samples import SAMPLE_SCHEMA

    out, manifest = prepared
    c = manifest["counts"]
    # 40 LibriSpeech utterances x (asr, tts) + 20 asr + 20 tts + 6 sqa JSONL lines; the JSONL's ASR/TTS lines
    # reuse LibriSpeech files, so they are duplicates of the LibriSpeech samples (same task, same audio)
    assert c["inputs"] == 126 and c["samples"] + c["errors"] == c["inputs"]
    assert c["by_task"] == {"asr": 40, "sqa": 6, "tts": 40} and c["rejects"] == {"duplicate": 40}
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert {e["id"].split("/")[0] for e in errors} == {"vita-jsonl"} and all(e["reason"] == "duplicate" for e in errors)
    table = read_shards(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 86 and table.schema.equals(SAMPLE_SCHEMA)
    for f in (out / "shards").glob("*.parquet"):
        names = pq.read_schema(f).names
        assert {"id", "source", "task", "input_ids", "labels", "audio_seconds"} <= set(names)
    rows = table.to_pylist()
    assert all(len(r["input_ids"]) == len(r["labels"]) == r["num_tokens"] for r in rows)
    assert c["sample_hours"] == pytest.approx(sum(r["audio_seconds"] for r in rows) / 3600)
    assert c["hours"] == pytest.approx(sum(r["audio_seconds"] for r in rows if r["task"] == "asr" or
                                           r["source"] == "vita-jsonl") / 3600)  # each audio once
    assert c["tokens"] == sum(r["num_tokens"] for r in rows)
    report = (out / "report.md").read_text()
    assert "| librispeech | asr | 40 |" in report and "| duplicate | 40 |" in report and "audio s per wall s" in report
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == 1


def test_samples_decode_to_the_chat_layout(prepared, tiny_models, mini):
    from jobs.prepare.shards import read_shards
    from pipeline.encoder.speech_encoder import load_encoder
    from pipeline.tokens.chat import BOOST_RATIO, IGNORE_INDEX, interleave
    from pipeline.tokens.vocab import TokenLayout, encode_text, load_tokenizer

    out, _ = prepared
    tokenizer = load_tokenizer(tiny_models / "llm")
    layout = TokenLayout.from_tokenizer(tokenizer)
    encoder = load_encoder(tiny_models / "encoder")
    rows = {r["id"]: r for r in read_shards(out).to_pylist()}

    def split(row):  # (prompt ids, assistant body ids) at the first scored label; the body ends "<|im_end|>\n"
        n = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        assert row["labels"][:n] == [IGNORE_INDEX] * n and row["labels"][n:] == row["input_ids"][n:]
        return row["input_ids"][:n], row["input_ids"][n:]

    def span(codes):
        return "<|begin_of_audio|>" + "".join(f"<|audio_{c}|>" for c in codes) + "<|end_of_audio|>"

    tail = [layout.im_end, *encode_text(tokenizer, "\n")]
    asr = rows["librispeech/1000-5000-0000/asr"]
    path = mini / "LibriSpeech" / "dev-clean-mini" / "1000" / "5000" / "1000-5000-0000.flac"
    codes = encoder.encode(str(path))
    assert layout.audio_codes(asr["input_ids"]) == codes == asr["audio_codes"][0]
    assert asr["audio_seconds"] == pytest.approx(sf.info(path).duration, abs=1e-3)
    prompt, body = split(asr)
    assert tokenizer.decode(prompt) == f"<|im_start|>user\nConvert the speech to text.\n{span(codes)}<|im_end|>\n" \
                                       "<|im_start|>assistant\n"
    assert tokenizer.decode(body) == "THE BIRCH CANOE SLID ON THE SMOOTH PLANKS<|im_end|>\n"

    # TTS: the assistant turn is the text interleaved with its audio at the Boost ratio (spec §2.3)
    tts = rows["librispeech/1000-5000-0000/tts"]
    words = "THE BIRCH CANOE SLID ON THE SMOOTH PLANKS"
    prompt, body = split(tts)
    assert tokenizer.decode(prompt) == f"<|im_start|>user\nConvert the text to speech.\n{words}<|im_end|>\n" \
                                       "<|im_start|>assistant\n"
    audio_ids = [layout.to_id(c) for c in codes]
    assert body == interleave(encode_text(tokenizer, words), audio_ids, BOOST_RATIO, layout) + tail
    first_text = body.index(layout.boa)
    assert body[first_text + 1 : first_text + 9] == audio_ids[:8] and body[first_text + 9] == layout.eoa  # 8 codes

    # spoken QA: the question's audio in the user turn, the answer text interleaved with the answer's audio
    sqa = rows["vita-jsonl/sqa-000001/sqa"]
    q, a = (encoder.encode(str(mini / "qa_wavs" / n)) for n in ("q00.wav", "a00.wav"))
    assert sqa["audio_codes"] == [q, a] and layout.audio_codes(sqa["input_ids"]) == q + a
    prompt, body = split(sqa)
    assert tokenizer.decode(prompt) == f"<|im_start|>user\n{span(q)}<|im_end|>\n<|im_start|>assistant\n"
    answer = encode_text(tokenizer, "On a clear day the sky is blue.\n")
    assert body == interleave(answer, [layout.to_id(c) for c in a], BOOST_RATIO, layout) + tail


def test_finished_rerun_is_a_noop(prepared, tiny_models, mini):
    from jobs.prepare.job import run_prepare

    out, manifest = prepared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run_prepare(_config(tiny_models, [f"librispeech:{mini / 'LibriSpeech'}", f"vita-jsonl:{mini / 'vita_jsonl'}"],
                                out, block_size=16))
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    from actors.errors import InputError

    with pytest.raises(InputError, match="holds a prepare run with other settings: block_size was 16, now 8; .*--restart"):
        run_prepare(_config(tiny_models, [f"librispeech:{mini / 'LibriSpeech'}", f"vita-jsonl:{mini / 'vita_jsonl'}"],
                            out, block_size=8))


def test_a_failed_start_leaves_the_folder_as_it_found_it(tiny_models, mini, tmp_path, monkeypatch):
    """Ray cannot start: no plan.json (which would refuse the next run with other settings), no shards/ or
    .blocks/ folders, no lock file; a folder that did not exist does not exist afterwards."""
    import actors.ray_runtime
    from actors.errors import InputError
    from jobs.prepare.job import run_prepare

    def no_ray(*args, **kwargs):
        raise InputError("--address 127.0.0.1:1: no Ray cluster answering there")

    monkeypatch.setattr(actors.ray_runtime, "start_ray", no_ray)
    source = [f"librispeech:{mini / 'LibriSpeech'}"]
    with pytest.raises(InputError, match="no Ray cluster"):
        run_prepare(_config(tiny_models, source, tmp_path / "new" / "out", tasks=("asr",)))
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="no Ray cluster"):
        run_prepare(_config(tiny_models, source, kept, tasks=("asr",), block_size=4))
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="no Ray cluster"):  # not "holds a run with other settings"
        run_prepare(_config(tiny_models, source, kept, tasks=("asr",), block_size=8))


def _speech(mini: Path, k: int = 0) -> np.ndarray:
    return sf.read(sorted((mini / "LibriSpeech").rglob("*.flac"))[k], dtype="float32")[0]


def _damaged_corpus(mini: Path, root: Path) -> dict[str, str]:
    """A LibriSpeech-layout part with one good file and damaged ones; utterance -> the expected outcome."""

    chapter = root / "damaged" / "9" / "9"
    chapter.mkdir(parents=True)
    speech = _speech(mini)
    files = {}

    def put(name, pcm, rate, subtype="PCM_16", expect="ok"):
        sf.write(chapter / f"9-9-{name}.wav", pcm, rate, subtype=subtype)
        files[name] = expect

    shutil.copy(sorted((mini / "LibriSpeech").rglob("*.flac"))[0], chapter / "9-9-good.flac")
    files["good"] = "ok"
    put("truncated", speech, 16000, expect="truncated")
    data = (chapter / "9-9-truncated.wav").read_bytes()
    (chapter / "9-9-truncated.wav").write_bytes(data[: len(data) // 2])
    (chapter / "9-9-empty.wav").write_bytes(b"")
    files["empty"] = "empty"
    (chapter / "9-9-notaudio.wav").write_text("this is a text file, not audio\n" * 20)
    files["notaudio"] = "unreadable"
    nan = speech.copy()
    nan[1000:1100] = np.nan
    put("nan", nan, 16000, subtype="FLOAT", expect="non_finite")
    put("lowrate", soxr.resample(speech, 16000, 8000), 8000, expect="low_sample_rate")
    other = _speech(mini, 2)  # not the good file's speech: that would be a duplicate of it
    put("stereo", np.stack([other, np.resize(_speech(mini, 1), len(other))], axis=1), 16000)  # channel 0 kept
    put("rate48k", soxr.resample(_speech(mini, 3), 16000, 48000), 48000)  # resampled, as in a 48 kHz corpus
    put("silent", np.zeros(16000, np.float32), 16000, expect="silent")
    put("clipped", np.clip(np.sin(np.linspace(0, 2000, 32000)) * 3, -1, 1).astype(np.float32), 16000, expect="clipped")
    put("short", speech[:1600], 16000, expect="too_short")
    files["missing"] = "missing_file"  # in the transcript, no file
    (chapter / "9-9.trans.txt").write_text("".join(f"9-9-{name} SOME WORDS {name.upper()}\n" for name in files))
    return files


def test_damaged_corpus_one_error_row_each(ray_session, tiny_models, mini, tmp_path):
    """Each damaged file is one error row naming its reason; rows + error rows == inputs. A 48 kHz file in a
    16 kHz corpus is resampled and a stereo file keeps channel 0 (as the original tokenizer does), both counted
    in the report (README's prepare section); with channels="reject" the stereo file is an error row whose
    detail names the flag that accepts it."""
    from jobs.prepare.checks import AudioChecks
    from jobs.prepare.job import run_prepare
    from jobs.prepare.shards import read_shards
    from pipeline.encoder.speech_encoder import load_encoder

    expected = _damaged_corpus(mini, tmp_path / "corpus")
    out = tmp_path / "out"
    manifest = run_prepare(_config(tiny_models, [f"librispeech:{tmp_path / 'corpus'}"], out, tasks=("asr",), block_size=4))
    errors = {e["utterance"].removeprefix("9-9-"): e for e in pq.read_table(out / "errors.parquet").to_pylist()}
    rows = {r["utterance"].removeprefix("9-9-"): r for r in read_shards(out).to_pylist()}
    c = manifest["counts"]
    assert c["inputs"] == len(expected) == 12 and c["samples"] + c["errors"] == c["inputs"]
    assert sorted(rows) == sorted(n for n, e in expected.items() if e == "ok")
    assert {n: e["reason"] for n, e in errors.items()} == {n: e for n, e in expected.items() if e != "ok"}
    assert "truncated" in errors["truncated"]["detail"] and "8000 Hz" in errors["lowrate"]["detail"]
    assert "--min-sample-rate" in errors["lowrate"]["detail"] and "--min-seconds" in errors["short"]["detail"]
    assert errors["missing"]["path"].endswith("9-9-missing.flac") and "no such file" in errors["missing"]["detail"]
    report = (out / "report.md").read_text()
    assert all(f"| {reason} | 1 |" in report for reason in set(expected.values()) - {"ok"})
    assert rows["stereo"]["converted"] == ["channel 0 of 2"] and rows["rate48k"]["converted"] == ["resampled 48000 Hz"]
    assert c["converted"] == {"channel 0 of 2": 1, "resampled 48000 Hz": 1}
    assert "| resampled 48000 Hz | 1 |" in report and "| channel 0 of 2 | 1 |" in report
    left = sf.read(tmp_path / "corpus/damaged/9/9/9-9-stereo.wav", dtype="float32")[0][:, 0]
    assert rows["stereo"]["audio_codes"][0] == load_encoder(tiny_models / "encoder").encode(left, 16000)

    strict = run_prepare(_config(tiny_models, [f"librispeech:{tmp_path / 'corpus'}"], tmp_path / "strict",
                                 tasks=("asr",), block_size=4, checks=AudioChecks(channels="reject")))
    assert strict["counts"]["samples"] == 2 and strict["counts"]["rejects"]["multichannel"] == 1
    stereo = next(e for e in pq.read_table(tmp_path / "strict" / "errors.parquet").to_pylist()
                  if e["utterance"].endswith("stereo"))
    assert "2 channels" in stereo["detail"] and "--channels first" in stereo["detail"]


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_samples(ray_session, tiny_models, mini, tmp_path):
    """The driver (a subprocess on the test's Ray) is killed once about half the blocks are written; the rerun
    does only the rest: the same sample ids as an uninterrupted run, none twice."""
    from jobs.prepare.job import run_prepare
    from jobs.prepare.shards import read_shards

    source = f"librispeech:{mini / 'LibriSpeech'}"
    out = tmp_path / "killed"
    address = ray_session.get_runtime_context().gcs_address
    argv = ["prepare", "--source", source, "--out", str(out), "--models", str(tiny_models), "--address", address,
            "--block-size", "2", "--encoder-rows", "2", "--no-progress"]
    written = kill_driver_when(argv, lambda: len(list((out / ".blocks").glob("done-*.json"))), at=20)
    assert 20 <= written < 40, f"{written} of 40 blocks written when killed"
    assert not (out / "manifest.json").exists()

    resumed = run_prepare(_config(tiny_models, [source], out, block_size=2, encoder=_pool(2)))
    assert resumed["runs"][-1]["blocks"] == 40 - written
    ids = read_shards(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 80 and resumed["counts"]["errors"] == 0

    whole = run_prepare(_config(tiny_models, [source], tmp_path / "whole", block_size=2))
    assert sorted(read_shards(tmp_path / "whole").column("id").to_pylist()) == sorted(ids)
    assert whole["counts"] == resumed["counts"]


def test_cli_checks_before_ray_and_prints_counts(ray_session, tiny_models, mini, tmp_path, capsys, monkeypatch):
    """`vita-audio prepare` as the registry runs it: bad flags and sources are one line, exit 2, before any
    Ray work; a run on an LJSpeech-layout folder prints the manifest's counts as the last line (--json)."""
    import cli.main as cli

    monkeypatch.setitem(cli.COMMANDS, "prepare", ("cli.prepare", "corpus preparation"))
    monkeypatch.setitem(cli.BENCHMARKS, "prepare", "benchmarks.prepare")
    assert cli.main(["bench", "prepare", "--actors", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--actors must list integers >= 1" in capsys.readouterr().err
    out = str(tmp_path / "o")
    for argv, words in ((["--source", "wav:/x"], "unknown kind 'wav'"),
                        (["--source", f"ljspeech:{tmp_path}/nope"], "does not exist"),
                        (["--source", f"ljspeech:{tmp_path}"], "no LJSpeech metadata.csv"),
                        (["--source", f"librispeech:{mini / 'LibriSpeech'}@train-clean-100"], "no part 'train-clean-100'"),
                        (["--source", f"librispeech:{mini / 'LibriSpeech'}", "--tasks", "asr,qa"], "--tasks"),
                        (["--source", f"librispeech:{mini / 'LibriSpeech'}", "--ratio", "1,x"], "--ratio"),
                        (["--source", f"librispeech:{mini / 'LibriSpeech'}", "--encoder-actors", "0"], "--encoder-actors"),
                        (["--source", f"librispeech:{mini / 'LibriSpeech'}", "--channels", "all"], "invalid choice")):
        assert cli.main(["prepare", *argv, "--out", out, "--json"]) == 2, argv
        captured = capsys.readouterr()
        assert words in json.loads(captured.out.strip().splitlines()[-1])["error"], (argv, captured)
        assert len(captured.err.strip().splitlines()) == 1
    assert not Path(out).exists()  # nothing written before the checks passed

    lj = tmp_path / "LJSpeech"
    (lj / "wavs").mkdir(parents=True)
    flacs = sorted((mini / "LibriSpeech").rglob("*.flac"))[:3]
    for k, f in enumerate(flacs):
        sf.write(lj / "wavs" / f"LJ001-{k:04d}.wav", soxr.resample(sf.read(f)[0], 16000, 22050), 22050)  # LJSpeech's rate
    (lj / "metadata.csv").write_text("".join(f"LJ001-{k:04d}|Text {k}.|Text {k}.\n" for k in range(3)))
    argv = ["prepare", "--source", f"ljspeech:{lj}", "--out", out, "--models", str(tiny_models), "--no-progress", "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    counts = json.loads(captured.out.strip().splitlines()[-1])
    assert counts["inputs"] == counts["samples"] == 6 and counts["by_task"] == {"asr": 3, "tts": 3}
    assert "6 samples, 0 error rows from 6 inputs" in captured.err
    assert cli.main(argv) == 0 and "already complete, nothing to do" in capsys.readouterr().err


def _pool(rows: int):
    from jobs.pools import PoolConfig

    return PoolConfig(size=1, batch_size=rows)


def test_batch_inputs_share_the_recipes(tmp_path, mini):
    """The batch job reads corpus layouts with these recipes: `KIND:PATH` inputs, LibriTTS folders."""
    from jobs.batch.inputs import enumerate_inputs

    lj = tmp_path / "LJ"
    (lj / "wavs").mkdir(parents=True)
    (lj / "metadata.csv").write_text("LJ001-0001|One.|One.\nLJ001-0002|Two.|Two.\n")
    asr = enumerate_inputs(f"ljspeech:{lj}", "asr")
    assert [(i.id, Path(i.path).name, i.text) for i in asr] == [("LJ001-0001", "LJ001-0001.wav", "One."),
                                                              ("LJ001-0002", "LJ001-0002.wav", "Two.")]
    assert [(i.id, i.text) for i in enumerate_inputs(f"ljspeech:{lj}", "tts")] == [("LJ001-0001", "One."),
                                                                                ("LJ001-0002", "Two.")]
    vita = enumerate_inputs(f"vita-jsonl:{mini / 'vita_jsonl'}@asr", "asr")
    assert len(vita) == 20 and vita[0].text == "The birch canoe slid on the smooth planks." and Path(vita[0].path).is_file()
    libri = enumerate_inputs(f"librispeech:{mini / 'LibriSpeech'}", "asr")
    assert [(i.id, i.path, i.text) for i in libri] == [(i.id, i.path, i.text)
                                                       for i in enumerate_inputs(mini / "LibriSpeech", "asr")]
    tts = tmp_path / "LibriTTS" / "dev-clean" / "19" / "198"
    tts.mkdir(parents=True)
    shutil.copy(sorted(mini.rglob("*.flac"))[0], tts / "19_198_000000_000000.flac")
    (tts / "19_198_000000_000000.normalized.txt").write_text("Hello there.\n")
    (item,) = enumerate_inputs(tmp_path / "LibriTTS", "asr")
    assert (item.id, item.text) == ("19_198_000000_000000", "Hello there.")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        enumerate_inputs("wav:/nope", "asr")  # not a corpus kind: a path that does not exist


def test_reading_in_the_encoder_actor_gives_the_same_rows(tiny_models, mini):
    """`read_tasks=0`: the SampleBuilder reads its own rows; the same rows as read tasks then the builder (no Ray)."""
    import dataclasses

    from jobs.prepare.checks import AudioChecks
    from jobs.prepare.recipes import prepare_librispeech
    from jobs.prepare.samples import plan_inputs
    from jobs.prepare.steps import SampleBuilder, read_and_check

    utts = prepare_librispeech(mini / "LibriSpeech")["dev-clean-mini"][:3]
    rows = [dataclasses.asdict(i) for i in plan_inputs("librispeech", utts, ("asr", "tts"))]
    rows.append({**rows[0], "key": 99, "id": "x/missing/asr", "refs": '[{"path": "/nope.flac"}]'})
    apart = SampleBuilder(str(tiny_models / "encoder"), str(tiny_models / "llm"))(read_and_check(rows))
    inside = SampleBuilder(str(tiny_models / "encoder"), str(tiny_models / "llm"), read=AudioChecks())(rows)
    assert apart.equals(inside) and apart.column("status").to_pylist() == ["ok"] * 6 + ["error"]
    assert apart.column("reason").to_pylist()[-1] == "missing_file"
