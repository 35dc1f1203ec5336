"""The CLI as a careful user meets it: every bad input exits 2 (or 1 / 130) with one line naming it, no
traceback, `--json` ends with an error object, nothing is destroyed, and none of it starts Ray."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cli.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models):
    """Good and damaged inputs, and model folders with one broken file each (copies of the tiny set)."""
    root = tmp_path_factory.mktemp("careful")
    t = np.arange(16000) / 16000
    sf.write(root / "ok.wav", (0.3 * np.sin(2 * np.pi * 140 * t)).astype(np.float32), 16000)
    sf.write(root / "one.wav", np.zeros(1, np.float32), 16000)
    sf.write(root / "lowrate.wav", np.zeros(16, np.float32), 1, subtype="PCM_16")
    sf.write(root / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    (root / "garbage.wav").write_bytes(b"not audio at all" * 10)
    (root / "empty.wav").write_bytes(b"")
    (root / "afile").write_text("x")
    corrupt = root / "corrupt-config"
    shutil.copytree(tiny_models, corrupt)
    (corrupt / "llm" / "config.json").write_text("{not json")
    partial = root / "partial"
    (partial / "llm").mkdir(parents=True)
    for name, part, weights in (("trunc-llm", "llm", "model.safetensors"), ("trunc-encoder", "encoder", "model.safetensors"),
                                ("trunc-flow", "decoder", "flow.pt"), ("junk-hift", "decoder", "hift.pt")):
        broken = root / name
        shutil.copytree(tiny_models, broken)
        data = (broken / part / weights).read_bytes()
        (broken / part / weights).write_bytes(data[: len(data) // 2] if name.startswith("trunc") else b"<html>404</html>")
    return root


def run_cli(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *names: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], lines[0]


def _user_error_cases(files, models):
    m = ["--models", str(models)]
    out = str(files / "out.wav")
    return [
        (["tts", "hi", "-o", str(files / "out.mp3"), *m], "out.mp3"),
        (["tts", "hi", "-o", str(files / "out"), *m], "out"),
        (["tts", "hi", "-o", "/proc/x.wav", *m], "/proc/x.wav"),
        (["tts", "hi", "-o", str(files / "afile" / "x.wav"), *m], "afile"),
        (["tts", "hi", "-o", str(files), *m], str(files)),
        (["tts", "   ", "-o", out, *m], "TEXT"),
        (["tts", "hi", "-o", out, "--mode", "1,99999999999999999999", *m], "--mode"),
        (["tts", "hi", "-o", out, "--mode", "1,x", *m], "--mode"),
        (["tts", "hi", "-o", out, "--mode", "1,10,4", *m], "--mode"),
        (["tts", "hi", "-o", out, "--mode", "warp", *m], "--mode"),
        (["tts", "hi", "-o", out, "--top-k", "5", *m], "--top-k"),
        (["tts", "hi", "-o", out, "--top-p", "0.5", *m], "--top-p"),
        (["tts", "hi", "-o", out, "--seed", "3", *m], "--seed"),
        (["tts", "hi", "-o", out, "--temperature", "0", *m], "--temperature"),
        (["tts", "hi", "-o", out, "--temperature", "1", "--top-p", "2", *m], "--top-p"),
        (["tts", "hi", "-o", out, "--max-new-tokens", "0", *m], "--max-new-tokens"),
        (["tts", "hi", "-o", out, "--max-new-tokens", "1000000000", *m], "--max-new-tokens"),
        (["tts", "x" * 100_000, "-o", out, *m], "TEXT"),
        (["tts", "hi", "-o", out, "--max-audio-seconds", "0", *m], "--max-audio-seconds"),
        (["tts", "hi", "-o", out, "--timeout", "-1", *m], "--timeout"),
        (["tts", "hi", "-o", out, "--voice", str(files / "missing.wav"), *m], "missing.wav"),
        (["tts", "hi", "-o", out, "--models", str(files / "nowhere")], "nowhere"),
        (["tts", "hi", "-o", out, "--models", str(files / "partial")], "encoder/"),
        (["tts", "hi", "-o", out, "--models", str(files / "corrupt-config")], "config.json"),
        (["tts", "hi", "-o", out, "--models", str(files / "afile")], "afile"),
        (["tts", "hi", "-o", out, "--models", str(files / "trunc-llm")], "llm/model.safetensors: truncated"),
        (["tts", "hi", "-o", out, "--models", str(files / "trunc-encoder")], "encoder/model.safetensors"),
        (["asr", str(files / "ok.wav"), "--models", str(files / "trunc-flow")], "decoder/flow.pt: truncated"),
        (["tts", "hi", "-o", out, "--models", str(files / "junk-hift")], "hift.pt: not a torch checkpoint"),
        (["tts", "hi", "-o", out, "--placement", "STRICT_SPREAD", *m], "STRICT_SPREAD"),
        (["chat", str(files / "missing.wav"), "-o", out, *m], "missing.wav"),
        (["tts", "say <|audio|> twice", "-o", out, *m], "<|audio|>"),
        (["chat", str(files / "garbage.wav"), "-o", out, *m], "garbage.wav"),
        (["chat", str(files / "empty.wav"), "-o", out, *m], "empty.wav"),
        (["chat", str(files / "one.wav"), "-o", out, *m], "one.wav"),
        (["chat", str(files / "lowrate.wav"), "-o", out, *m], "1 Hz"),
        (["chat", str(files / "long.wav"), "-o", out, "--max-audio-seconds", "2", *m], "--max-audio-seconds"),
        (["chat", str(files / "ok.wav"), "-o", out, "--system", "y" * 100_000, *m], "--system"),
        (["tts", "hi", "-o", out, "--address", "127.0.0.1:1", *m], "127.0.0.1:1"),
        (["generate", "--prompt-ids", "1,x"], "--prompt-ids"),
        (["generate", "--prompt-ids", ""], "--prompt-ids"),
        (["generate", "--prompt-ids", "1,2", "--device", "foo", "--llm", str(models / "llm")], "--device"),
        (["generate", "--prompt-ids", "1,2", "--device", "cuda", "--llm", str(models / "llm")], "cuda"),
        (["generate", "--prompt-ids", "1,2", "--max-new-tokens", "1000000000", "--llm", str(models / "llm")],
         "--max-new-tokens"),
        (["generate", "--prompt-ids", "1,2", "--llm", str(files / "corrupt-config" / "llm")], "config.json"),
        (["tiny", str(files / "afile")], "afile"),
        (["tiny", str(models)], "--force"),
        (["tts", "hi"], "-o/--output"),
        (["asr"], "audio"),
        (["tts", "hi", "-o", out, "--placement", "NOPE"], "--placement"),
        (["generate", "--prompt-ids", "1", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["nosuchcommand"], "nosuchcommand"),
        (["bench", "nosuch"], "nosuch"),
    ]


CASES = 53


@pytest.mark.parametrize("index", range(CASES))
def test_user_error_is_one_line_exit_2_before_ray(files, tiny_models, capsys, index, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_inits = _forbid_ray_init(monkeypatch)
    cases = _user_error_cases(files, tiny_models)
    assert len(cases) == CASES
    argv, name = cases[index]
    before = sorted(p.name for p in files.iterdir())
    code, out, err = run_cli(capsys, argv)
    assert code == 2, (argv[:3], err)
    assert_one_line(err, name)
    assert sorted(p.name for p in files.iterdir()) == before  # nothing created, nothing deleted
    assert ray_inits == []


def _forbid_ray_init(monkeypatch) -> list:
    """Make `ray.init` record and refuse any call, and Ray look not started (another test module's session
    Ray may be up in this process): a command that reached start-up fails the test instead of starting Ray."""
    import ray

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(kwargs)
        raise AssertionError("ray.init called before the argument checks finished")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


def test_asr_with_only_bad_files_reports_each_on_its_own_line(files, tiny_models, capsys):
    bad = [files / "garbage.wav", files / "empty.wav", files / "missing.wav"]
    code, out, err = run_cli(capsys, ["asr", *map(str, bad), "--models", str(tiny_models)])
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 4 and "none of the 3" in lines[-1]
    for path, line in zip(bad, lines):
        assert line.startswith(f"vita-audio asr: error: {path}") and line.count(str(path)) == 1
    code, out, err = run_cli(capsys, ["asr", *map(str, bad), "--models", str(tiny_models), "--json"])
    rows = [json.loads(ln) for ln in out.strip().splitlines()]
    assert [r["audio"] for r in rows[:3]] == list(map(str, bad)) and not any(r["ok"] for r in rows[:3])
    assert rows[-1]["exit_code"] == 2


def test_json_error_object_is_the_last_line(files, tiny_models, capsys):
    code, out, err = run_cli(capsys, ["tts", "hi", "-o", str(files / "x.mp3"), "--models", str(tiny_models), "--json"])
    assert code == 2
    last = json.loads(out.strip().splitlines()[-1])
    assert last["exit_code"] == 2 and "x.mp3" in last["error"] and last["command"] == "tts"
    code, out, err = run_cli(capsys, ["asr", "--json"])
    assert code == 2 and json.loads(out.strip().splitlines()[-1])["exit_code"] == 2


def test_address_auto_without_cluster_names_it(files, tiny_models, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(files / "no-ray-here"))
    code, out, err = run_cli(capsys, ["asr", str(files / "ok.wav"), "--models", str(tiny_models), "--address", "auto"])
    assert code == 2
    assert_one_line(err.replace("vita-audio asr: starting Ray\n", "").replace(
        "vita-audio asr: joining Ray at auto\n", ""), "--address auto", "no running Ray cluster")


def test_internal_error_is_one_line_exit_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    import cli.tiny as cmd_tiny

    def boom(args):
        raise RuntimeError("\x1b[31mstage died\x1b[0m\n  long trace line")

    monkeypatch.setattr(cmd_tiny, "run", boom)
    code, out, err = run_cli(capsys, ["tiny", "/tmp/never-written"])
    assert code == 1
    assert_one_line(err, "RuntimeError: stage died", "--debug")
    assert "\x1b" not in err
    with pytest.raises(RuntimeError):
        main(["tiny", "/tmp/never-written", "--debug"])


def test_ctrl_c_is_exit_130_one_line(capsys, monkeypatch):
    import cli.tiny as cmd_tiny

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd_tiny, "run", interrupted)
    code, out, err = run_cli(capsys, ["tiny", "/tmp/never-written"])
    assert code == 130
    assert_one_line(err, "interrupted")


def test_wrapped_checkpoint_error_is_a_user_error(capsys, monkeypatch):
    import cli.tiny as cmd_tiny
    from pipeline.checkpoints import CheckpointError

    class ActorDiedError(Exception):
        def __init__(self, cause):
            super().__init__("\x1b[36mThe actor died\x1b[0m\nTraceback ...")
            self.cause = cause

    def died(args):
        raise ActorDiedError(CheckpointError("/m/llm/model.safetensors: truncated"))

    monkeypatch.setattr(cmd_tiny, "run", died)
    code, out, err = run_cli(capsys, ["tiny", "/tmp/never-written"])
    assert code == 2
    assert_one_line(err, "model.safetensors: truncated")


def test_actor_creation_error_text_surfaces_as_one_user_line(ray_session, capsys, monkeypatch):
    """A real ActorDiedError keeps only the remote traceback text: its last user-error line is the message."""
    import ray

    import cli.tiny as cmd_tiny

    @ray.remote(num_cpus=0)
    class Stage:
        def __init__(self):
            raise ValueError("/m/llm/config.json: vocab_size 3 does not fit the tokenizer")

        def ping(self):
            return 1

    def died(args):
        ray.get(Stage.remote().ping.remote(), timeout=60)

    monkeypatch.setattr(cmd_tiny, "run", died)
    code, out, err = run_cli(capsys, ["tiny", "/tmp/never-written"])
    assert code == 2
    assert_one_line(err, "/m/llm/config.json: vocab_size 3 does not fit the tokenizer")
    assert "ActorDiedError" not in err and "\x1b" not in err


def test_tiny_never_deletes_user_files(tmp_path, capsys):
    target = tmp_path / "set"
    code, out, err = run_cli(capsys, ["tiny", str(target)])
    assert code == 0 and str(target) in out and "llm/" in out
    mine = target / "llm" / "my-notes.txt"
    mine.write_text("keep me")
    for argv in (["tiny", str(target)], ["tiny", str(target), "--force"]):
        code, out, err = run_cli(capsys, argv)
        assert code == 2
        assert_one_line(err, str(target))
        assert mine.read_text() == "keep me"
    mine.unlink()
    user = tmp_path / "user"
    user.mkdir()
    (user / "weights.bin").write_bytes(b"precious")
    code, out, err = run_cli(capsys, ["tiny", str(user), "--force"])
    assert code == 2 and (user / "weights.bin").read_bytes() == b"precious"
    assert sorted(p.name for p in user.iterdir()) == ["weights.bin"]
    code, out, err = run_cli(capsys, ["tiny", str(target), "--force", "--json"])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["replaced"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_help_imports_neither_torch_nor_ray_and_is_fast():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = ("import sys, time; t = time.perf_counter()\n"
            "from cli.main import main\n"
            "for argv in (['--help'], ['tts', '--help'], ['asr', '--help'], ['tts']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print('HEAVY', 'torch' in sys.modules, 'ray' in sys.modules, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    heavy = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY")][0].split()
    assert heavy[1:3] == ["False", "False"] and float(heavy[3]) < 1.0
    assert "max-audio-seconds" in proc.stdout


def test_audio_decoded_before_a_timeout_is_kept(tmp_path, capsys):
    """A request that fails late (here: its timeout) still writes the audio it had, and says where, exit 1."""
    import argparse

    from actors.payloads import AudioChunk, ErrorEvent
    from actors.results import collect
    from cli.speech import _report

    pcm = np.linspace(-0.5, 0.5, 22050, dtype=np.float32)
    result = collect([AudioChunk(pcm=pcm, sample_rate=22050, index=0), ErrorEvent(stage="pipeline", message="timed out after 1.0 s")])
    args = argparse.Namespace(task="tts", json=True, output=tmp_path / "partial.wav")
    with pytest.raises(SystemExit) as exit_:
        _report(args, ["hi"], [result], [], {}, {})
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert_one_line(err, "timed out", "1.0 s of audio", "partial.wav")
    audio, rate = sf.read(tmp_path / "partial.wav")
    assert rate == 22050 and len(audio) == 22050
