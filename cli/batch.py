"""`vita-audio batch asr|tts`: transcribe or synthesise a whole archive on Ray Data, exactly once, resumable;
`vita-audio batch cancel`: stop one from another shell.

    vita-audio batch asr --input corpus/ --out runs/asr          # folder, .jsonl / .csv manifest, or .tar shard
    vita-audio batch tts --input texts.jsonl --out runs/tts      # FLAC files under runs/tts/audio/
    vita-audio batch asr --input big.jsonl --out runs/asr --llm-pool 2 --llm-batch-size 32 --json
    vita-audio batch cancel --out runs/asr                       # the job on runs/asr stops after its current block

Writes DIR/results/part-*.parquet (one row per input), DIR/summary.json and DIR/report.md. Rerunning on the
same --out resumes: only inputs without a row are processed; a finished run rerun does nothing. A cancelled job
(`jobs.batch.job.request_cancel`, the Batch API's cancel) keeps the blocks it finished and exits 3
(`EXIT_CANCELLED`); rerunning its command resumes it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from actors.errors import InputError
from jobs.storage import location
from cli import checks
from cli.speech import FLAG_NAMES, add_sampling_arguments

EXIT_CANCELLED = 3  # the job stopped on `vita-audio batch cancel`: its finished blocks kept, a rerun resumes


def add_arguments(p, name: str) -> None:
    tasks = p.add_subparsers(dest="task", required=True, metavar="{asr,tts,cancel}")
    for task, text in (("asr", "transcribe the inputs"), ("tts", "speak the inputs' texts")):
        add_job_arguments(tasks.add_parser(task, help=text, description=f"vita-audio batch {task}: {text}"))
    cancel = tasks.add_parser("cancel", help="stop the job writing --out after its current block (rerun its command "
                                             "to resume)")
    cancel.add_argument("--out", required=True, help="the job's results folder or object-store prefix")
    cancel.add_argument("--json", action="store_true")


def add_job_arguments(p) -> None:
    p.add_argument("--input", required=True, help="asr: folder, .jsonl/.csv manifest (id, path, text), .tar shards or "
                                                  "a Parquet dataset (audio bytes in a column); tts: .jsonl/.csv "
                                                  "(id, text) or .txt (one text a line); local or s3://, gs://, ...")
    p.add_argument("--out", required=True, help="results folder or object-store prefix, e.g. s3://bucket/runs/asr (rerun on it to resume)")
    p.add_argument("--models", type=Path, default=None,
                   help="folder with llm/, encoder/, decoder/ (default: $VITA_AUDIO_MODELS, else the tiny set)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--mode", default=None, help="vanilla|balance|boost|turbo|exact or a list like 1,10,4,10")
    p.add_argument("--max-new-tokens", type=checks.positive_int, default=256)
    p.add_argument("--constraint", default="auto", choices=["auto", "task", "none"],
                   help="force the task's output layout ('auto': the LLM stage forces it on a tiny set only, whose "
                        "random weights need it)")
    add_sampling_arguments(p, "with --temperature: per-request seeds derive from it and the id (default 0)")
    for stage in ("encoder", "llm", "decoder"):
        p.add_argument(f"--{stage}-pool", type=checks.positive_int, default=1, help=f"{stage} actors")
        p.add_argument(f"--{stage}-gpus", type=checks.gpus, default=0.0, help=f"GPUs per {stage} actor")
        p.add_argument(f"--{stage}-cpus", type=checks.cpus, default=0.5, help=f"logical CPUs per {stage} actor")
        p.add_argument(f"--{stage}-rows", type=checks.positive_int, default=16 if stage == "llm" else 8,
                       help=f"rows per call of a {stage} actor")
    p.add_argument("--llm-batch-size", type=checks.positive_int, default=16, help="requests sharing one LLM engine step")
    p.add_argument("--block-size", type=checks.positive_int, default=64, help="inputs per result file (the unit of resumption)")
    p.add_argument("--window", type=checks.positive_float, default=30.0, help="asr: seconds per window of a long recording")
    p.add_argument("--overlap", type=checks.non_negative_float, default=2.0, help="asr: seconds shared by neighbouring windows")
    p.add_argument("--max-audio-seconds", type=checks.positive_float, default=4 * 3600.0, help="longer inputs are error rows")
    p.add_argument("--torch-threads", type=checks.non_negative_int, default=1, help="torch threads per actor (0: torch's default)")
    p.add_argument("--restart", action="store_true", help="clear this job's files in --out and start over (else a "
                                                           "rerun with other settings is refused)")
    p.add_argument("--retry-errors", action="store_true", help="a rerun also redoes the error rows of bad inputs (rows a "
                                                                "stage failed on are always redone)")
    p.add_argument("--max-error-share", type=checks.real(0.0, 1.0), default=0.5,
                   help="more error rows than this share of the inputs ends the job with exit 1 (report written)")
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    p.add_argument("--json", action="store_true")


def config_from_args(args):
    """The typed BatchConfig of the flags (flag errors are InputErrors naming the flag)."""
    from jobs.batch.job import BatchConfig
    from jobs.pools import PoolConfig
    from jobs.batch.segments import WindowConfig
    from jobs.batch.callables import DecodeOptions

    from actors.models import check_mode_for_model, resolve_models_dir

    # each number alone is checked at parse time (cli.checks); here what needs two flags or the model's files
    if args.overlap >= args.window / 2:
        raise InputError(f"--overlap {args.overlap:g}: overlap_s must be below half of window_s (--window "
                         f"{args.window:g})")
    models = resolve_models_dir(args.models)  # every part complete and of its kind, before Ray starts
    from actors.requests import Caps, request_options

    # the one request policy, with the flags' names (the job derives each request's seed from --seed)
    options = request_options(mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, layout=args.constraint, caps=Caps(), names=FLAG_NAMES)
    mode = options.mode
    check_mode_for_model(mode, args.mode, models / "llm")
    try:
        pools = {stage: PoolConfig(size=getattr(args, f"{stage}_pool"), num_gpus=getattr(args, f"{stage}_gpus"),
                                   num_cpus=getattr(args, f"{stage}_cpus"), batch_size=getattr(args, f"{stage}_rows"))
                 for stage in ("encoder", "llm", "decoder")}
        windows = WindowConfig(window_s=args.window, overlap_s=args.overlap)
        decode = DecodeOptions(mode=mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
                               repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty,
                               seed=args.seed or 0, constraint=options.layout)
        return BatchConfig(task=args.task, input=args.input, out=str(args.out),
                           models=str(args.models) if args.models else None, **pools,
                           llm_max_batch_size=args.llm_batch_size, decode=decode, windows=windows,
                           block_size=args.block_size, max_audio_seconds=args.max_audio_seconds,
                           torch_threads=args.torch_threads or None, address=args.address,
                           progress=not args.no_progress, restart=args.restart, retry_errors=args.retry_errors,
                           max_error_share=args.max_error_share, resume_cancelled=True)
    except ValueError as err:
        raise InputError(str(err)) from None


def run(args) -> dict:
    if args.task == "cancel":
        return cancel(args.out)
    from jobs.batch.job import TooManyErrors, run_batch

    config = config_from_args(args)
    if args.address:
        from actors.ray_runtime import check_address

        check_address(args.address)
    try:
        summary = run_batch(config)
    except TooManyErrors as err:  # the job ran to its end and wrote its report; exit 1
        print(f"vita-audio batch {args.task}: {err}", file=sys.stderr)
        return {**err.summary, "exit_code": 1}
    done = summary["this_run"]["inputs"]
    if summary["state"] == "cancelled":
        print(f"vita-audio batch {args.task}: cancelled: stopped at a block boundary with {summary['rows']}/"
              f"{summary['inputs']} rows written (this run processed {done} input(s)); rerun the same command to "
              f"resume; report: {location(args.out) / 'report.md'}", file=sys.stderr)
        return {**summary, "exit_code": EXIT_CANCELLED}
    print(f"vita-audio batch {args.task}: {summary['rows']}/{summary['inputs']} rows ({summary['errors']} errors); "
          f"this run processed {done} input(s); report: {location(args.out) / 'report.md'}", file=sys.stderr)
    return summary


def cancel(out: str) -> dict:
    """Ask the job writing OUT to stop at its next block boundary (`request_cancel`: OUT/cancel, which the job
    checks after each block it writes). OUT must hold a batch run (its lock or its plan), else an InputError."""
    from jobs.batch.job import request_cancel
    from jobs.batch.results import CANCEL
    from jobs.run_folder import LOCK, PLAN, out_location

    folder = out_location(out, "--out")
    if not folder.is_dir() or not ((folder / LOCK).exists() or (folder / PLAN).exists()):
        raise InputError(f"--out {out}: no batch run there (neither {LOCK} nor {PLAN}); give the --out of the job "
                         "to cancel")
    request_cancel(folder)
    print(f"vita-audio batch cancel: asked the job writing {folder} to stop after its current block (finished blocks "
          "are kept; rerun its command to resume)", file=sys.stderr)
    return {"out": str(folder), "cancel": str(folder / CANCEL)}
