"""The `vita-audio` command line: a thin layer whose flags map 1:1 to function arguments.

Contracts (../shared/DESIGN.md): with no model paths every command runs on the tiny set, built once
into a cache folder (`--models DIR` or `VITA_AUDIO_MODELS` points to a folder holding llm/, encoder/,
decoder/); `--json` prints one JSON object as the last line of stdout (an {"error": ...} object on
failure). Exit codes: 0 ok, 2 bad input (one line naming it), 1 internal failure (one line), 130 Ctrl-C,
3 a batch job stopped by `vita-audio batch cancel`;
a traceback only with `--debug`. `--help` and argument errors import neither torch nor ray.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from actors.errors import InputError

BENCHMARKS = {
    "decode": "benchmarks.decode",      # LLM + MCTP decode engine, per mode
    "encoder": "benchmarks.encoder",    # speech encoder, batched vs one by one
    "decoder": "benchmarks.decoder",    # flow + HiFT, streaming cost vs audio length
    "pipeline": "benchmarks.pipeline",  # staged Ray pipeline vs in-process composition
    "batch": "benchmarks.batch",        # batch ASR/TTS: LLM batch size, actors per stage, vs an in-process loop
    "prepare": "benchmarks.prepare",    # corpus preparation: encoder actors vs a plain loop
    "train": "benchmarks.train",        # Ray Train + DeepSpeed vs a plain PyTorch loop, 2 workers vs 1
    "train-acceptance": "benchmarks.train_acceptance",  # small model trained on mini-speech: CER, exact vs vanilla, served
    "serve": "benchmarks.serve",        # HTTP time to first audio and RTF vs concurrency, vs in-process
    "soak": "benchmarks.soak",          # minutes of mixed load, replicas killed: errors, RSS, TTFA drift
    "prefill": "benchmarks.prefill",    # another client's time to first token while a max-length prompt prefills
    "realtime": "benchmarks.realtime",  # hands-free /v1/realtime: end of speech -> first audio, barge-in
    "gpu": "benchmarks.gpu",            # one CUDA GPU, 7B shapes built on the device: tokens/s, roofline, RTF, TTFA
}

# Subcommands implemented in their own modules: name -> (module with add_arguments(p, name) and run(args), help).
# Command modules import torch/ray only inside run(), so building the parser stays light.
COMMANDS = {
    "tiny": ("cli.tiny", "write the tiny random model set (llm/, encoder/, decoder/) in the released formats"),
    "generate": ("cli.generate", "LLM + MCTP decoding from prompt ids (the decode engine alone)"),
    "tts": ("cli.speech", "text -> speech through the staged Ray pipeline"),
    "asr": ("cli.speech", "speech -> text through the staged Ray pipeline"),
    "chat": ("cli.speech", "speech (or text) -> text + speech through the staged Ray pipeline"),
    "batch": ("cli.batch", "batch ASR / TTS over a folder, manifest or tar shards on Ray Data (resumable)"),
    "prepare": ("cli.prepare", "speech corpora -> audio-token training shards on Ray Data (resumable)"),
    "train": ("cli.train", "the four VITA-Audio training stages on Ray Train + DeepSpeed (resumable)"),
    "serve": ("cli.serve", "the OpenAI-compatible speech endpoint on Ray Serve"),
    "plan": ("cli.plan", "will it fit? memory per stage, KV per stream, a placement and its Serve config"),
}

USER_ERRORS = (InputError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as every other failure of the CLI."""

    def error(self, message):
        # "argument --workers: must be >= 1, got '0'" (cli.checks) reads "--workers must be >= 1, got '0'"
        message = re.sub(r"^argument (?:\S+/)?(\S+): must be ", r"\1 must be ", message)
        raise _ArgumentError(f"{self.prog}: error: {message}")


class _ArgumentError(Exception):
    pass


def build_parser(with_benchmarks: bool = True) -> argparse.ArgumentParser:
    """The full parser; benchmark modules (which import torch) are only imported when `bench` is asked for."""
    parser = _Parser(prog="vita-audio", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = _import(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        mod.add_arguments(p, name)
    bench = sub.add_parser("bench", help="benchmarks -> JSON + markdown report")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHMARKS.items():
        mod = _import(module) if with_benchmarks else None
        p = bench_sub.add_parser(name)
        p.add_argument("--out", default="bench-results", help="folder for the JSON + markdown report")
        p.add_argument("--json", action="store_true", help="print the results as one JSON line")
        p.set_defaults(_module=module)
        if mod is not None:
            mod.add_arguments(p, name)
    return parser


def version() -> str:
    """The installed package's version (pyproject.toml's when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("vita-audio-ray")
    except PackageNotFoundError:
        match = re.search(r'^version = "([^"]+)"', (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(),
                          re.M)
        return match.group(1) if match else "unknown"


def _import(module: str):
    """Import a command module; None if that module is not part of this install (other import errors raise)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    want_json = "--json" in argv
    command = next((a for a in argv if not a.startswith("-")), "vita-audio")
    try:
        args = build_parser(with_benchmarks="bench" in argv).parse_args(argv)
    except _ArgumentError as err:
        return _error(str(err), 2, command, want_json)
    command = args.command if args.command != "bench" else f"bench {args.bench}"
    with _Interrupts(quiet=not debug, command=command) as ctrl_c:
        code, result = _run(args, command, want_json, debug, ctrl_c)
    if code is not None:
        return code
    if want_json and result is not None:
        print(json.dumps(result, default=float))
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


def _run(args, command: str, want_json: bool, debug: bool, ctrl_c: "_Interrupts"):
    """(exit code, None) on failure or Ctrl-C, else (None, the command's result)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in command output
        module = _import(args._module)
        result = module.run(args)
    except BaseException as err:  # noqa: BLE001 - sorted below; Ctrl-C first, whatever it became on its way up
        if ctrl_c.fired() or isinstance(err, KeyboardInterrupt):
            if debug:
                raise
            return ctrl_c.report(command, want_json), None
        if isinstance(err, SystemExit):
            raise
        return _failure(err, command, want_json, debug), None
    if ctrl_c.fired() and not getattr(module, "SIGINT_STOPS", False):
        # a library caught the Ctrl-C and returned early: still an interrupt (`serve` stops on it: its normal end)
        return ctrl_c.report(command, want_json), None
    return None, result


def _failure(err: BaseException, command: str, want_json: bool, debug: bool) -> int:
    try:
        raise err
    except USER_ERRORS as err:
        if debug:
            raise
        return _error(_one_line(err), 2, command, want_json)
    except Exception as err:  # internal: one line, the traceback only with --debug
        if debug:
            raise
        cause = _user_cause(err)
        if cause is not None:
            return _error(_one_line(cause), 2, command, want_json)
        return _error(f"{type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)", 1,
                      command, want_json)


class _Interrupts:
    """Ctrl-C during a command, however it travels: the first SIGINT raises KeyboardInterrupt in the main thread
    (Ray, asyncio and thread code may turn it into other exceptions on its way up, or a library may install its
    own handler, as Ray Train does: the signal's byte on a wakeup socket, read by a watcher thread, still says it
    came); a second one is ignored so the clean-up (stages, workers, Ray) finishes; a third ends the process at
    once (exit 130).

    With `quiet`, from the first Ctrl-C on the process's stderr goes to /dev/null — the tracebacks, log lines
    and C++ stacks of the parts being torn down never reach the user — and the one `interrupted` line is written
    to the original stderr (--debug keeps everything)."""

    _STOP = b"\xff"  # wakes the watcher at the end (no signal has this number)
    JOIN_S = 30.0  # at most this long for Ray Data's executor threads before Ray shuts down
    DEADLINE_S = 120.0  # the whole clean-up after a Ctrl-C

    def __init__(self, quiet: bool = True, command: str = "vita-audio"):
        self.quiet, self.count, self.stderr_fd, self.command = quiet, 0, None, command
        self.done = threading.Event()
        self.restore_shutdown = None
        self.installed = threading.current_thread() is threading.main_thread()
        self.seen = threading.Event()
        self.lock = threading.Lock()

    def __enter__(self):
        if not self.installed:
            return self
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        try:
            self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        except ValueError:
            self.previous_fd = None
        self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.watcher = threading.Thread(target=self._watch, name="vita-audio-ctrl-c", daemon=True)
        self.watcher.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.restore_shutdown is not None:
            ray, real = self.restore_shutdown
            ray.shutdown = real
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)
            signal.set_wakeup_fd(self.previous_fd if self.previous_fd is not None else -1)
            try:
                self.writer.send(self._STOP)
            except OSError:
                pass
            self.watcher.join(timeout=2)
            self.reader.close()
            self.writer.close()
        return False

    def _watch(self) -> None:
        while True:
            try:
                data = self.reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if bytes([signal.SIGINT]) in data:
                self._fired()
            if self._STOP in data:
                return

    def _fired(self) -> None:
        with self.lock:
            first = self.count == 0 or not self.seen.is_set()
            self.count = max(self.count, 1)
            self._silence()
            if first:
                self._patient_ray_shutdown()
                threading.Thread(target=self._watchdog, name="vita-audio-ctrl-c-deadline", daemon=True).start()
        self.seen.set()

    def _patient_ray_shutdown(self) -> None:
        """While Ctrl-C unwinds, `ray.shutdown` first lets Ray Data's executor threads end: Ray Data joins them
        for 2 s only, and one still calling into Ray after the shutdown ends the process with exit 1 (a Ray
        race, frequent on a loaded machine)."""
        ray = sys.modules.get("ray")
        if ray is None or getattr(ray.shutdown, "_vita_patient", False):
            return
        real = ray.shutdown

        def shutdown(*args, **kwargs):
            deadline = time.monotonic() + self.JOIN_S
            for thread in threading.enumerate():
                if thread is not threading.current_thread() and thread.name.startswith("StreamingExecutor"):
                    thread.join(timeout=max(0.0, deadline - time.monotonic()))
            return real(*args, **kwargs)

        shutdown._vita_patient = True
        self.restore_shutdown = (ray, real)
        ray.shutdown = shutdown

    def _watchdog(self) -> None:
        """A clean-up that hangs does not keep the user waiting: after DEADLINE_S the line, and exit 130."""
        if self.done.wait(self.DEADLINE_S):
            return
        self._write(f"vita-audio {self.command}: error: interrupted (Ctrl-C); stopped (clean-up did not finish in "
                    f"{self.DEADLINE_S:g} s)\n".encode())
        os._exit(130)

    def _on_sigint(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self._fired()
            raise KeyboardInterrupt
        if self.count >= 3:
            self._write(b"vita-audio: interrupted again: stopped without cleaning up\n")
            os._exit(130)

    def fired(self) -> bool:
        if self.installed and not self.seen.is_set():
            self.seen.wait(0.05)  # (the watcher reads the signal's byte a moment after it came)
        return self.count > 0

    def _silence(self) -> None:
        if not self.quiet or self.stderr_fd is not None:
            return
        try:
            sys.stderr.flush()
            self.stderr_fd = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        except (OSError, ValueError):
            self.stderr_fd = None

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.stderr_fd if self.stderr_fd is not None else 2, data)
        except OSError:
            pass

    def report(self, command: str, want_json: bool) -> int:
        """The one `interrupted` line (on the user's stderr) and, with --json, the error object; exit 130."""
        message = f"vita-audio {command}: error: interrupted (Ctrl-C); stopped"
        if self.stderr_fd is None:
            return _error("interrupted (Ctrl-C); stopped", 130, command, want_json)
        self._write((message + "\n").encode())
        if want_json:
            print(json.dumps({"error": "interrupted (Ctrl-C); stopped", "exit_code": 130, "command": command}),
                  flush=True)
        return 130


def _error(message: str, code: int, command: str, want_json: bool) -> int:
    prefix = message if message.startswith("vita-audio") else f"vita-audio {command}: error: {message}"
    print(prefix, file=sys.stderr)
    if want_json:
        print(json.dumps({"error": message, "exit_code": code, "command": command}))
    return code


def _one_line(err: BaseException) -> str:
    """The first meaningful line of an error, without ANSI colours, at most 400 characters."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:400]


def _user_cause(err: BaseException) -> BaseException | None:
    """A user error (e.g. CheckpointError) wrapped by Ray (ActorDiedError, RayTaskError) surfaces as itself."""
    seen = set()
    current = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, USER_ERRORS):
            return current
        text_cause = _cause_in_text(getattr(current, "error_msg", None))
        if text_cause is not None:  # an actor's creation task failed: Ray keeps only the traceback text
            return text_cause
        nested = getattr(current, "cause", None)  # RayTaskError keeps the original here
        current = nested if isinstance(nested, BaseException) else (current.__cause__ or current.__context__)
    return None


_USER_ERROR_NAMES = {cls.__name__ for cls in USER_ERRORS} | {"CheckpointError", "AudioError"}
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$")


def _cause_in_text(text) -> InputError | None:
    """The last `SomeUserError: message` line of a remote traceback, as a InputError with that message."""
    if not isinstance(text, str):
        return None
    for line in reversed(_ANSI.sub("", text).splitlines()):
        match = _ERROR_LINE.match(line.strip())
        if match and match.group(1) in _USER_ERROR_NAMES:
            return InputError(match.group(2))
    return None


if __name__ == "__main__":
    sys.exit(main())
