"""`vita-audio prepare`: speech corpora -> audio-token training shards on Ray Data, once, resumable.

    vita-audio prepare --source librispeech:/data/LibriSpeech --out prepared/
    vita-audio prepare --source librispeech:/data/LibriSpeech@train-clean-100,dev-clean \\
                       --source vita-jsonl:/data/sqa.jsonl --tasks asr,tts,sqa --out prepared/ --encoder-actors 4 \\
                       --gpus-per-actor 0.5 --address auto --json

KIND is librispeech, libritts, ljspeech, commonvoice, vita-jsonl, lhotse, parquet (audio bytes in a column, the
Hugging Face layout) or webdataset (tar shards); `@PART,...` names splits (default: every split found). parquet:
and webdataset: sources and --out may be object-store URLs (`s3://bucket/prefix`: the store's endpoint and
credentials from the usual environment, e.g. AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID). Writes DIR/shards/*.parquet (schema: jobs/prepare/__init__.py), DIR/errors.parquet,
DIR/manifest.json and DIR/report.md. Rerunning on the same --out resumes; a finished run rerun does nothing.
Every flag and source is checked before Ray starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

from actors.errors import InputError
from jobs.storage import location
from cli import checks

KINDS = ("librispeech", "libritts", "ljspeech", "commonvoice", "vita-jsonl", "lhotse", "parquet", "webdataset")
TASKS = ("asr", "tts", "sqa", "text")


def add_arguments(p, name: str) -> None:
    p.add_argument("--source", action="append", required=True, metavar="KIND:PATH[@PART,...]",
                   help=f"a corpus to read (repeatable); KIND: {', '.join(KINDS)}")
    p.add_argument("--out", required=True, help="output folder or object-store prefix, e.g. s3://bucket/prepared (rerun on it to resume)")
    p.add_argument("--tasks", default="asr,tts,sqa", help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--models", type=Path, default=None,
                   help="folder with llm/ (tokenizer) and encoder/ (default: $VITA_AUDIO_MODELS, else the tiny set)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--encoder-actors", type=checks.positive_int, default=1, help="speech-encoder actors (each loads the encoder once)")
    p.add_argument("--gpus-per-actor", type=checks.gpus, default=0.0, help="GPUs per encoder actor (fractions allowed)")
    p.add_argument("--cpus-per-actor", type=checks.cpus, default=0.5, help="logical CPUs per encoder actor")
    p.add_argument("--encoder-rows", type=checks.positive_int, default=16, help="rows per encoder call (their audio is batched)")
    p.add_argument("--read-tasks", type=checks.non_negative_int, default=2,
                   help="read-and-check tasks at once (0: the encoder actors read their rows themselves)")
    p.add_argument("--block-size", type=checks.positive_int, default=64, help="inputs per shard (the unit of resumption)")
    p.add_argument("--ratio", default="1,10,4,10",
                   help="text-audio interval ratio T1,A1,T2,A2,... of assistant turns (Balance: 1,4,3,8,4,10; "
                        "'none': no interleaving)")
    p.add_argument("--min-seconds", type=checks.non_negative_float, default=0.3, help="shorter audio is rejected")
    p.add_argument("--max-seconds", type=checks.positive_float, default=60.0, help="longer audio is rejected")
    p.add_argument("--min-sample-rate", type=checks.non_negative_int, default=16000, help="audio recorded at a lower rate is rejected")
    p.add_argument("--channels", default="first", choices=["first", "mix", "reject"],
                   help="multi-channel audio: keep channel 0 (as the original tokenizer), average, or reject")
    p.add_argument("--torch-threads", type=checks.non_negative_int, default=1, help="torch threads per encoder actor (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    p.add_argument("--restart", action="store_true", help="clear this job's files in --out and start over (else a "
                                                           "rerun with other settings is refused)")
    p.add_argument("--json", action="store_true", help="print the manifest's counts as the last line")


def config_from_args(args):
    """The typed PrepareConfig of the flags; a bad flag or source is a InputError naming it (before Ray)."""
    from jobs.prepare.checks import AudioChecks
    from jobs.pools import PoolConfig
    from jobs.prepare.job import PrepareConfig

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks or any(t not in TASKS for t in tasks):
        raise InputError(f"--tasks {args.tasks!r}: a comma list of {', '.join(TASKS)}")
    if args.ratio.strip().lower() == "none":
        ratio = None
    else:
        try:
            ratio = tuple(int(v) for v in args.ratio.split(","))
        except ValueError:
            raise InputError(f"--ratio {args.ratio!r}: a comma list of integers like 1,10,4,10") from None
    # each number alone is checked at parse time (cli.checks); here what needs two flags
    if ratio is not None:
        from pipeline.tokens.chat import check_ratio

        try:
            check_ratio(ratio)
        except ValueError as err:
            raise InputError(f"--ratio {args.ratio!r}: {err}") from None
    if args.min_seconds >= args.max_seconds:
        raise InputError(f"--min-seconds {args.min_seconds:g} must be below --max-seconds {args.max_seconds:g}")
    try:
        checks = AudioChecks(min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                             min_sample_rate=args.min_sample_rate or None, channels=args.channels)
        pool = PoolConfig(size=args.encoder_actors, num_gpus=args.gpus_per_actor, num_cpus=args.cpus_per_actor,
                          batch_size=args.encoder_rows)
        return PrepareConfig(sources=list(args.source), out=str(args.out), tasks=tasks,
                             models=str(args.models) if args.models else None, encoder=pool,
                             read_tasks=args.read_tasks, block_size=args.block_size, ratio=ratio, checks=checks,
                             torch_threads=args.torch_threads or None, address=args.address,
                             progress=not args.no_progress, restart=args.restart)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(str(err)) from None


def run(args) -> dict:
    from actors.models import resolve_models_dir
    from jobs.prepare.job import enumerate_inputs, run_prepare

    resolve_models_dir(args.models)  # llm/ (tokenizer) and encoder/ complete and of their kind, before the sources
    config = config_from_args(args)
    if args.address:  # (a dead address fails now, not after Ray's long retries)
        from actors.ray_runtime import check_address

        check_address(args.address)
    try:
        enumerate_inputs(config)  # every source readable and holding inputs, before Ray starts
    except (ValueError, FileNotFoundError) as err:
        raise InputError(str(err)) from None
    runs_file = location(config.out) / "runs.jsonl"
    runs_before = len(runs_file.read_text().splitlines()) if runs_file.exists() else 0
    manifest = run_prepare(config)
    c = manifest["counts"]
    last = manifest["runs"][-1] if len(manifest["runs"]) > runs_before else None
    this_run = f"this run: {last['inputs']} input(s), {last.get('audio_s_per_s') or 0:.2f} audio s per wall s" \
        if last else "already complete, nothing to do"
    print(f"vita-audio prepare: {c['samples']} samples, {c['errors']} error rows from {c['inputs']} inputs; "
          f"{c['hours']:.2f} h, {c['tokens']} tokens; {this_run}; report: {location(args.out) / 'report.md'}",
          file=sys.stderr)
    return c
