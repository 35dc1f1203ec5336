"""The `vita-audio` command line: a thin layer whose flags map 1:1 to function arguments.

Contracts (../shared/DESIGN.md): with no model paths every command runs on the tiny set, built once
into a cache folder (`--models DIR` or `VITA_AUDIO_MODELS` points to a folder holding llm/, encoder/,
decoder/); `--json` prints one JSON object as the last line of stdout. Bad input exits with code 2
and a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = {
    "decode": "jobs.bench.decode",      # LLM + MCTP decode engine, per mode
    "encoder": "jobs.bench.encoder",    # speech tokenizer, batched vs one by one
    "decoder": "jobs.bench.decoder",    # flow + HiFT, streaming cost vs audio length
    "pipeline": "jobs.bench.pipeline",  # staged Ray pipeline vs in-process composition
}

# Subcommands implemented in their own modules: name -> (module with add_arguments(p, name) and run(args), help).
COMMANDS = {
    "tiny": ("jobs.cmd_tiny", "write the tiny random model set (llm/, encoder/, decoder/) in the released formats"),
    "generate": ("jobs.cmd_generate", "LLM + MCTP decoding from prompt ids (the decode engine alone)"),
    "tts": ("jobs.cmd_speech", "text -> speech through the staged Ray pipeline"),
    "asr": ("jobs.cmd_speech", "speech -> text through the staged Ray pipeline"),
    "chat": ("jobs.cmd_speech", "speech (or text) -> text + speech through the staged Ray pipeline"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vita-audio", description=__doc__.splitlines()[0])
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
        mod = _import(module)
        if mod is None:
            continue
        p = bench_sub.add_parser(name)
        p.add_argument("--out", default="bench-results", help="folder for the JSON + markdown report")
        p.add_argument("--json", action="store_true", help="print the results as one JSON line")
        p.set_defaults(_module=module)
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
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in command output
    try:
        result = _import(args._module).run(args)
    except (CLIError, ValueError, FileNotFoundError) as err:
        print(f"vita-audio {args.command}: error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
