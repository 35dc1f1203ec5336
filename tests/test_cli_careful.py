"""The CLI as a careful user meets it: every bad input exits 2 (or 1 / 130) with one line naming it, no
traceback, `--json` ends with an error object, nothing is destroyed, and none of it starts Ray."""
from __future__ import annotations

import json
import os
import shutil
import importlib.util
import signal
import subprocess
import sys
import time
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
    nomtp = root / "nomtp"  # an LLM without MCTP modules (a plain Qwen2-style config): only vanilla runs on it
    shutil.copytree(tiny_models, nomtp)
    config = json.loads((nomtp / "llm" / "config.json").read_text())
    (nomtp / "llm" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    no_encoder_config = root / "no-encoder-config"
    shutil.copytree(tiny_models, no_encoder_config)
    (no_encoder_config / "encoder" / "config.json").unlink()
    (root / "data").mkdir()  # a folder for `train --data` (the cases fail before it is read)
    for name, part, weights in (("trunc-llm", "llm", "model.safetensors"), ("trunc-encoder", "encoder", "model.safetensors"),
                                ("trunc-flow", "decoder", "flow.pt"), ("junk-hift", "decoder", "hift.pt")):
        broken = root / name
        shutil.copytree(tiny_models, broken)
        data = (broken / part / weights).read_bytes()
        (broken / part / weights).write_bytes(data[: len(data) // 2] if name.startswith("trunc") else b"<html>404</html>")
    return root


def _job_error_cases(files, models):
    """prepare, batch, train, plan, serve, generate and every resource flag of every command: each refused by
    the one flag check (cli.checks) or the model-folder checks (actors.models) before anything starts."""
    m = ["--models", str(models)]
    out = str(files / "out.wav")
    tts = ["tts", "hi", "-o", out, *m]
    asr = ["asr", str(files / "ok.wav"), *m]
    prepare = ["prepare", "--source", f"ljspeech:{files / 'no-corpus'}", "--out", str(files / "prepared"), *m]
    batch = ["batch", "asr", "--input", str(files / "ok.wav"), "--out", str(files / "batch-out"), *m]
    batch_tts = ["batch", "tts", "--input", str(files / "texts.txt"), "--out", str(files / "batch-out"), *m]
    train = ["train", "--data", str(files / "data"), "--init", str(models / "llm"), "--out", str(files / "run")]
    serve = ["serve", *m]
    generate = ["generate", "--prompt-ids", "1,2", "--llm", str(models / "llm")]
    cases = [
        # the speech commands' resources: NaN, infinite, negative, a share of more than one GPU, zero CPUs
        ([*tts, "--gpus-per-stage", "nan"], "--gpus-per-stage"),
        ([*tts, "--gpus-per-stage", "inf"], "--gpus-per-stage"),
        ([*tts, "--gpus-per-stage", "-1"], "--gpus-per-stage"),
        ([*tts, "--gpus-per-stage", "1.5"], "--gpus-per-stage"),
        ([*tts, "--gpus-per-stage", "0.00001"], "--gpus-per-stage"),
        ([*tts, "--num-gpus", "1", "--gpus-per-stage", "1"], "--gpus-per-stage"),
        ([*tts, "--num-cpus", "0"], "--num-cpus"),
        ([*tts, "--num-cpus", "-2"], "--num-cpus"),
        ([*tts, "--num-gpus", "-1"], "--num-gpus"),
        ([*tts, "--num-gpus", "1.5"], "--num-gpus"),
        ([*asr, "--gpus-per-stage", "nan"], "--gpus-per-stage"),
        ([*asr, "--max-audio-seconds", "-5"], "--max-audio-seconds"),
        ([*asr, "--max-audio-seconds", "nan"], "--max-audio-seconds"),
        ([*tts, "--timeout", "inf"], "--timeout"),
        ([*tts, "--timeout", "nan"], "--timeout"),
        ([*tts, "--temperature", "nan"], "--temperature"),
        ([*tts, "--max-new-tokens", "1e3"], "--max-new-tokens"),
        # models: a mode the model cannot run, a folder of the wrong kind or incomplete, --llm
        ([*tts, "--mode", "boost", "--models", str(files / "nomtp")], "--mode boost"),
        ([*tts, "--mode", "1,10,4,10", "--models", str(files / "nomtp")], "no MCTP modules"),
        ([*tts, "--mode", "exact", "--models", str(files / "nomtp")], "num_nextn_predict_layers 0"),
        ([*tts, "--models", str(files / "no-encoder-config")], "encoder/"),
        ([*tts, "--llm", str(models / "encoder")], "speech-encoder"),
        ([*tts, "--llm", str(files / "nowhere")], "--llm"),
        ([*tts, "--llm", str(models)], "give its llm/"),
        ([*tts, "--llm", str(files / "nomtp" / "llm"), "--mode", "turbo"], "no MCTP modules"),
        (["generate", "--prompt-ids", "1,2", "--llm", str(files / "nomtp" / "llm"), "--mode", "boost"], "--mode boost"),
        (["generate", "--prompt-ids", "1,2", "--llm", str(models / "decoder")], "audio-decoder"),
        ([*generate, "--max-new-tokens", "nan"], "--max-new-tokens"),
        ([*generate, "--top-p", "nan"], "--top-p"),
        # prepare
        ([*prepare, "--gpus-per-actor", "nan"], "--gpus-per-actor"),
        ([*prepare, "--gpus-per-actor", "2.5"], "--gpus-per-actor"),
        ([*prepare, "--cpus-per-actor", "inf"], "--cpus-per-actor"),
        ([*prepare, "--cpus-per-actor", "-1"], "--cpus-per-actor"),
        ([*prepare, "--encoder-actors", "0"], "--encoder-actors"),
        ([*prepare, "--encoder-rows", "0"], "--encoder-rows"),
        ([*prepare, "--read-tasks", "-1"], "--read-tasks"),
        ([*prepare, "--block-size", "0"], "--block-size"),
        ([*prepare, "--max-seconds", "nan"], "--max-seconds"),
        ([*prepare, "--min-seconds", "-1"], "--min-seconds"),
        ([*prepare, "--min-seconds", "5", "--max-seconds", "2"], "--min-seconds"),
        ([*prepare, "--min-sample-rate", "-8000"], "--min-sample-rate"),
        ([*prepare, "--torch-threads", "-1"], "--torch-threads"),
        ([*prepare, "--models", str(files / "no-encoder-config")], "encoder/"),
        ([*prepare, "--models", str(models / "encoder")], "speech-encoder"),
        ([*prepare, "--ratio", "1,2"], "--ratio"),
        # batch
        ([*batch, "--llm-gpus", "nan"], "--llm-gpus"),
        ([*batch, "--encoder-gpus", "1.5"], "--encoder-gpus"),
        ([*batch, "--decoder-gpus", "-0.5"], "--decoder-gpus"),
        ([*batch, "--llm-cpus", "nan"], "--llm-cpus"),
        ([*batch, "--encoder-cpus", "-1"], "--encoder-cpus"),
        ([*batch, "--decoder-pool", "0"], "--decoder-pool"),
        ([*batch, "--llm-rows", "0"], "--llm-rows"),
        ([*batch, "--llm-batch-size", "0"], "--llm-batch-size"),
        ([*batch, "--block-size", "-3"], "--block-size"),
        ([*batch, "--max-audio-seconds", "-5"], "--max-audio-seconds"),
        ([*batch, "--window", "nan"], "--window"),
        ([*batch, "--overlap", "20"], "--overlap"),
        ([*batch, "--max-new-tokens", "0"], "--max-new-tokens"),
        ([*batch, "--models", str(files / "no-encoder-config")], "encoder/"),
        ([*batch_tts, "--mode", "boost", "--models", str(files / "nomtp")], "no MCTP modules"),
        # train
        ([*train, "--gpus-per-worker", "nan"], "--gpus-per-worker"),
        ([*train, "--gpus-per-worker", "1.5"], "--gpus-per-worker"),
        ([*train, "--gpus-per-worker", "inf"], "--gpus-per-worker"),
        ([*train, "--cpus-per-worker", "0"], "--cpus-per-worker"),
        ([*train, "--cpus-per-worker", "nan"], "--cpus-per-worker"),
        ([*train, "--workers", "0"], "--workers"),
        ([*train, "--max-failures", "-1"], "--max-failures"),
        (["train", "--data", str(files / "data"), "--init", str(models / "encoder"), "--out", str(files / "run")],
         "speech-encoder"),
        (["train", "--data", str(files / "data"), "--init", str(models), "--out", str(files / "run")], "llm/"),
        (["train", "--data", str(files / "data"), "--init", str(files / "trunc-llm" / "llm"), "--out",
          str(files / "run")], "truncated"),
        # serve
        ([*serve, "--port", "0"], "--port"),
        ([*serve, "--port", "70000"], "--port"),
        ([*serve, "--ready-timeout", "nan"], "--ready-timeout"),
        ([*serve, "--llm", str(models / "encoder")], "speech-encoder"),
        (["serve", "--models", str(files / "no-encoder-config")], "encoder/"),
        # tiny
        (["tiny", str(files / "new-set"), "--seed", "-1"], "--seed"),
    ]
    if importlib.util.find_spec("cli.plan") is not None:  # `vita-audio plan` (its own module)
        cases += [
            (["plan", "--gpus", "0", "--gpu-memory", "80GB"], "--gpus"),
            (["plan", "--gpus", "1", "--gpu-memory", "nan"], "--gpu-memory"),
            (["plan", "--gpus", "1", "--gpu-memory", "80GB", "--context", "0"], "--context"),
            (["plan", "--gpus", "1", "--gpu-memory", "80GB", "--models", str(files / "afile")], "afile"),
        ]
    return cases


JOB_CASES = 76 + (4 if importlib.util.find_spec("cli.plan") is not None else 0)


@pytest.mark.parametrize("index", range(JOB_CASES))
def test_job_and_resource_errors_are_one_line_exit_2_before_ray(files, tiny_models, capsys, index, monkeypatch):
    """Each bad flag or model folder of prepare, batch, train, plan, serve and the resource flags: exit 2 and one
    line naming it, within seconds, without ray.init, creating and deleting nothing."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_inits = _forbid_ray_init(monkeypatch)
    cases = _job_error_cases(files, tiny_models)
    assert len(cases) == JOB_CASES
    argv, name = cases[index]
    before = sorted(str(p.relative_to(files)) for p in files.rglob("*"))
    t0 = time.perf_counter()
    json_flag = argv[0] != "serve"  # (serve prints its URL, not a JSON object)
    code, out, err = run_cli(capsys, [*argv, "--json"] if json_flag else argv)
    seconds = time.perf_counter() - t0
    assert code == 2, (argv, err)
    assert_one_line(err, name)
    assert not json_flag or json.loads(out.strip().splitlines()[-1])["exit_code"] == 2
    assert sorted(str(p.relative_to(files)) for p in files.rglob("*")) == before  # nothing created or deleted
    assert ray_inits == []
    assert seconds < 20, f"{argv[:2]} took {seconds:.1f} s to refuse"


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"vita-audio {version('vita-audio-ray')}"


def test_resource_amounts_of_the_one_flag_check():
    """cli.checks: what Ray can grant (a share of one GPU or whole GPUs, 1e-4 precision), finite numbers only."""
    import argparse

    from cli import checks

    assert checks.gpus("0.5") == 0.5 and checks.gpus("2") == 2.0 and checks.gpus("0") == 0.0
    assert checks.cpus("1.5") == 1.5 and checks.positive_int("3") == 3 and checks.port("8000") == 8000
    for convert, text in ((checks.gpus, "nan"), (checks.gpus, "1.5"), (checks.gpus, "-1"), (checks.gpus, "1e-6"),
                          (checks.cpus, "inf"), (checks.positive_cpus, "0"), (checks.local_cpus, "0"),
                          (checks.positive_int, "1.0"), (checks.positive_float, "-inf"), (checks.port, "65536"),
                          (checks.seed, "-1"), (checks.non_negative_float, "nan")):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            convert(text)


def test_a_trained_llm_folder_runs_with_the_given_encoder_and_decoder(files, tiny_models):
    """--llm DIR: a models folder whose llm/ is DIR and whose encoder/ and decoder/ are the set's (links)."""
    from actors.models import resolve_models_dir

    stage = files / "nomtp" / "llm"
    root = resolve_models_dir(tiny_models, stage)
    assert (root / "llm").resolve() == stage.resolve()
    assert (root / "encoder").resolve() == (tiny_models / "encoder").resolve()
    assert (root / "decoder").resolve() == (tiny_models / "decoder").resolve()
    assert resolve_models_dir(tiny_models, stage) == root  # made once


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
        (["tts", "hi", "-o", out, "--temperature", "-1", *m], "--temperature"),  # 0 is greedy
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


class _Command:
    """`vita-audio ...` in a subprocess, its stderr lines read as they come (with their arrival times)."""

    def __init__(self, argv, cwd):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[tuple[float, str]] = []  # stderr, with arrival times
        self.out: list[str] = []
        threading = __import__("threading")
        self.readers = [threading.Thread(target=self._read_err, daemon=True),
                        threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_err(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready(self):
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.stderr()}"
            assert time.monotonic() < deadline, f"not ready after {timeout_s} s: {self.stderr()[-2000:]}"
            time.sleep(0.2)

    def interrupt(self, timeout_s: float = 120.0):
        """SIGINT (what Ctrl-C sends); (exit code, stdout, the stderr lines that came after the signal)."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout_s} s after SIGINT: {self.stderr()[-2000:]}")
        for reader in self.readers:
            reader.join(timeout=10)
        return self.proc.returncode, "".join(self.out), [line for t, line in self.lines if t >= sent and line.strip()]

    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _assert_interrupted(code, out, after, command: str) -> None:
    assert code == 130, (code, after)
    assert len(after) == 1 and after[0] == f"vita-audio {command}: error: interrupted (Ctrl-C); stopped", after
    last = json.loads(out.strip().splitlines()[-1])
    assert last["exit_code"] == 130 and "interrupted" in last["error"] and last["command"] == command


@pytest.mark.slow
def test_ctrl_c_in_tts_generation_is_exit_130_and_one_line(tiny_models, tmp_path):
    """SIGINT while the stages generate (KeyboardInterrupt inside Ray and async code): exit 130, one stderr line,
    the --json error object last on stdout, no traceback (before: exit 1 and 45 lines of tracebacks)."""
    out = tmp_path / "out.wav"
    cmd = _Command(["tts", "a long text to speak " * 8, "-o", str(out), "--models", str(tiny_models),
                    "--max-new-tokens", "8000", "--json"], tmp_path)
    try:
        cmd.wait_for(lambda c: "stages loaded" in c.stderr(), 240)
        time.sleep(1.0)  # generating
        code, stdout, after = cmd.interrupt()
    finally:
        cmd.kill()
    _assert_interrupted(code, stdout, after, "tts")
    assert "Traceback" not in cmd.stderr() and not out.exists()


def _write_shard(out_dir: Path, llm: Path, n: int = 12) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm)
    rows = {c: [] for c in ("id", "source", "task", "input_ids", "labels", "audio_seconds")}
    for i in range(n):
        prompt = tok("Convert the speech to text.\n")["input_ids"]
        answer = tok(f"hello world {i}")["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        for key, value in (("id", f"s{i:03d}"), ("source", "tiny"), ("task", "asr"), ("input_ids", prompt + answer),
                           ("labels", [-100] * len(prompt) + answer), ("audio_seconds", 0.0)):
            rows[key].append(value)
    out_dir.mkdir(parents=True)
    pq.write_table(pa.table(rows), out_dir / "part-00000.parquet")


@pytest.mark.slow
def test_ctrl_c_in_train_is_exit_130_and_one_line(tiny_models, tmp_path):
    """SIGINT while a stage trains (Ray Train installs its own SIGINT handler and aborts its run): exit 130, one
    stderr line, the --json error object (before: exit 1, no error line, no JSON)."""
    data, run = tmp_path / "shards", tmp_path / "run"
    _write_shard(data, tiny_models / "llm")
    cmd = _Command(["train", "--data", str(data), "--init", str(tiny_models / "llm"), "--out", str(run),
                    "--workers", "1", "--json"], tmp_path)

    def training(c) -> bool:
        try:
            return json.loads((run / "run.json").read_text())["stages"]["1"]["status"] == "running"
        except (OSError, ValueError, KeyError):
            return False

    try:
        cmd.wait_for(training, 300)
        time.sleep(3.0)  # inside Ray Train's fit
        code, stdout, after = cmd.interrupt()
    finally:
        cmd.kill()
    _assert_interrupted(code, stdout, after, "train")
    assert "Traceback" not in cmd.stderr()


@pytest.mark.slow
def test_ctrl_c_in_batch_is_exit_130_and_one_line(files, tiny_models, tmp_path):
    """SIGINT while Ray Data runs the stage pools: exit 130 and one line (Ray Data joins its executor thread for
    2 s only; one still calling into Ray after ray.shutdown ended the process with exit 1 and no line)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(30):
        shutil.copy(files / "ok.wav", inputs / f"a{i:02d}.wav")
    cmd = _Command(["batch", "asr", "--input", str(inputs), "--out", str(tmp_path / "out"), "--models",
                    str(tiny_models), "--no-progress", "--json"], tmp_path)
    try:
        cmd.wait_for(lambda c: "Starting execution" in c.stderr(), 240)
        time.sleep(3.0)  # the pools start and work
        code, stdout, after = cmd.interrupt()
    finally:
        cmd.kill()
    _assert_interrupted(code, stdout, after, "batch")
    assert "Traceback" not in cmd.stderr()


@pytest.mark.slow
def test_ctrl_c_in_prepare_is_exit_130_one_line_and_keeps_what_finished(shared_dir, tiny_models, tmp_path):
    """SIGINT while the preparation's pools run: exit 130 and one line; the folder is left resumable (a rerun is
    not refused as another run and finishes with every input accounted for)."""
    corpus = shared_dir / "corpora" / "mini-speech" / "LibriSpeech"
    out = tmp_path / "out"
    argv = ["prepare", "--source", f"librispeech:{corpus}", "--out", str(out), "--models", str(tiny_models),
            "--tasks", "asr", "--block-size", "4", "--no-progress", "--json"]
    cmd = _Command(argv, tmp_path)
    try:
        cmd.wait_for(lambda c: "Starting execution" in c.stderr(), 240)
        time.sleep(3.0)  # the encoder pool works
        code, stdout, after = cmd.interrupt()
    finally:
        cmd.kill()
    _assert_interrupted(code, stdout, after, "prepare")
    assert "Traceback" not in cmd.stderr()
    rerun = subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["inputs"] > 0 and counts["samples"] + counts["errors"] == counts["inputs"], counts
