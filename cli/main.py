"""The `vita-audio` command line: a thin layer whose flags map 1:1 to function arguments.

Contracts (../shared/DESIGN.md): with no model paths every command runs on the tiny set, built once
into a cache folder (`--models DIR` or `VITA_AUDIO_MODELS` points to a folder holding llm/, encoder/,
decoder/); `--json` prints one JSON object as the last line of stdout (an {"error": ...} object on
failure). Exit codes: 0 ok, 2 bad input (one line naming it), 1 internal failure (one line), 130 Ctrl-C;
a traceback only with `--debug`. `--help` and argument errors import neither torch nor ray.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import sys

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
    "prefill": "benchmarks.prefill",    # another client's time to first token while a max-length prompt prefills
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
}

USER_ERRORS = (InputError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as every other failure of the CLI."""

    def error(self, message):
        raise _ArgumentError(f"{self.prog}: error: {message}")


class _ArgumentError(Exception):
    pass


def build_parser(with_benchmarks: bool = True) -> argparse.ArgumentParser:
    """The full parser; benchmark modules (which import torch) are only imported when `bench` is asked for."""
    parser = _Parser(prog="vita-audio", description=__doc__.splitlines()[0])
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
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in command output
        result = _import(args._module).run(args)
    except KeyboardInterrupt:
        return _error("interrupted", 130, command, want_json)
    except SystemExit:
        raise
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
    if want_json and result is not None:
        print(json.dumps(result, default=float))
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


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
