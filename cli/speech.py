"""`vita-audio tts|asr|chat`: run the staged Ray pipeline (encoder, LLM+MCTP, decoder actors) once.

    vita-audio tts "Hello there." -o hello.wav [--json]
    vita-audio asr a.wav b.flac
    vita-audio chat question.wav -o answer.wav --mode boost
    vita-audio tts "Hi" -o hi.wav --num-gpus 3 --json     # 3 logical GPUs: one per stage, even without CUDA

Starts a local Ray (or joins `--address`), places the three stages (one GPU each when the cluster has
three, else shares what there is, else CPU), streams the answer, writes the wav. With `--json` the last
stdout line is one object: stage placement (node, assigned GPU ids, device), time to first audio, total
time and per-stage forward counts. Bad input (missing/corrupt audio, empty text) exits 2 with one line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from actors.errors import InputError
from cli import checks
from actors.ray_runtime import check_address, start_ray
from actors.models import check_mode_for_model, resolve_models_dir

AUDIO_SUFFIXES = (".wav", ".flac")  # what write_audio writes
MIN_AUDIO_SECONDS = 0.1             # shorter input has no speech to transcribe (a 1-sample wav "transcribed")
# the request policy's fields (actors.requests) by their flags: a refusal names the flag
FLAG_NAMES = {"mode": "--mode", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
              "top_k": "--top-k", "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed",
              "layout": "--constraint"}


def add_arguments(p, name: str) -> None:
    if name == "tts":
        p.add_argument("text", help="text to speak")
        p.add_argument("-o", "--output", type=Path, required=True, help="output wav/flac")
        p.add_argument("--voice", help="voice prompt audio file")
    elif name == "asr":
        p.add_argument("audio", nargs="+", help="audio files to transcribe")
    else:
        p.add_argument("audio", metavar="QUESTION",
                       help="the spoken question (an audio file), or a text question (anything that is neither an "
                            "existing file nor ends in .wav/.flac/.mp3/.ogg)")
        p.add_argument("-o", "--output", type=Path, required=True, help="output wav/flac for the spoken answer")
        p.add_argument("--voice", help="voice prompt audio file")
        p.add_argument("--system", help="system turn (default: the built-in persona)")
    p.set_defaults(task=name)
    p.add_argument("--models", type=Path, default=None,
                   help="folder with llm/, encoder/, decoder/ (default: $VITA_AUDIO_MODELS, else the tiny set)")
    p.add_argument("--llm", type=Path, default=None,
                   help="LLM folder to use instead of the models folder's llm/ (e.g. a trained RUN_DIR/stage4), "
                        "with the encoder/ and decoder/ of --models (default: the tiny set's)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--num-gpus", type=checks.local_gpus, default=None, help="GPUs a local Ray declares (logical ones work without CUDA)")
    p.add_argument("--num-cpus", type=checks.local_cpus, default=None, help="CPUs a local Ray declares (>= 1)")
    p.add_argument("--gpus-per-stage", type=checks.gpus, default=None,
                   help="GPUs per stage actor (default: 1 if the cluster has 3, else a share, else 0 = CPU)")
    p.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    p.add_argument("--mode", default=None, help="vanilla|balance|boost|turbo|exact or a list like 1,10,4,10")
    p.add_argument("--max-new-tokens", type=checks.positive_int, default=256)
    p.add_argument("--constraint", default="auto", choices=["auto", "task", "interleaved", "text", "none"],
                   help="output layout forced on the LLM ('task': interleaved for tts/chat, text for asr, which the "
                        "random tiny weights need; 'none': the model's own layout, right for trained checkpoints; "
                        "'auto' (default): 'task' on a tiny set (vita-audio tiny), else 'none')")
    add_sampling_arguments(p)
    p.add_argument("--timeout", type=checks.positive_float, default=600.0, help="seconds for the whole request")
    p.add_argument("--max-audio-seconds", type=checks.positive_float, default=600.0,
                   help="longest input audio accepted (default 600 s; raise it for longer files)")
    p.add_argument("--json", action="store_true")


def add_sampling_arguments(p, seed_help: str | None = None) -> None:
    """The sampling flags; their values are checked by the one request policy (actors.requests), with the
    messages every front end gives."""
    p.add_argument("--temperature", type=float, default=None,
                   help="sample with this temperature in (0, 2] (default, or 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="with --temperature: the k most likely ids (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="with --temperature: nucleus mass in (0, 1] (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="HF repetition penalty > 0 (1: off)")
    p.add_argument("--seed", type=int, default=None, help=seed_help or "with --temperature: the sampling seed")


def run(args) -> dict:
    """Check every argument and input first (exit 2, before Ray), then start Ray and the stages, then run."""
    from actors.config import PipelineConfig

    _check_flags(args)
    if args.placement == "STRICT_SPREAD" and not args.address:
        raise InputError("--placement STRICT_SPREAD needs 3 nodes (one per stage) and a local Ray has one: "
                       "join a cluster with --address, or use PACK / SPREAD")
    models = resolve_models_dir(args.models, args.llm)
    check_mode_for_model(_parse_mode(args.mode), args.mode, models / "llm")
    from actors.requests import model_caps

    options, inputs, bad, admitted = _check_inputs(args, model_caps(models / "llm"))
    if args.task == "asr" and not inputs:
        if len(bad) == 1:
            raise InputError(f"{bad[0][0]}: {bad[0][1]}")
        _print_failures(args, bad)
        raise InputError(f"none of the {len(bad)} audio file(s) could be read")
    config = PipelineConfig.from_models_dir(models, placement_strategy=args.placement, request_timeout_s=args.timeout)

    import ray

    startup = {}
    t0 = time.perf_counter()
    _progress(args, "starting Ray" if not args.address else f"joining Ray at {args.address}")
    started = start_ray(args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    startup["ray_s"] = round(time.perf_counter() - t0, 3)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if args.placement == "STRICT_SPREAD" and len(nodes) < 3:
            raise InputError(f"--placement STRICT_SPREAD needs 3 nodes (one per stage); this cluster has {len(nodes)}")
        config = config.with_resources(num_gpus=_gpus_per_stage(args, ray.cluster_resources().get("GPU", 0)))
        from actors.staged_pipeline import StagedPipeline
        from actors.results import collect

        _progress(args, f"Ray ready in {startup['ray_s']:.1f} s; loading the encoder, LLM and decoder stages")
        t1 = time.perf_counter()
        pipe = StagedPipeline.start(config)
        startup["stages_s"] = round(time.perf_counter() - t1, 3)
        _progress(args, f"stages loaded in {startup['stages_s']:.1f} s")
        try:
            results = []
            for i, item in enumerate(inputs, 1):
                results.append(collect(_call(pipe, args.task, admitted.get(item, item), options)))
                if args.task == "asr" and len(inputs) + len(bad) > 1:
                    _progress(args, f"{i + len(bad)}/{len(inputs) + len(bad)} files")
            placement = {stage: p.to_dict() for stage, p in pipe.placement().items()}
        finally:
            pipe.shutdown()
    finally:
        if started:
            ray.shutdown()
    startup["total_s"] = round(time.perf_counter() - t0, 3)
    return _report(args, inputs, results, bad, placement, startup)


def _progress(args, message: str) -> None:
    print(f"vita-audio {args.task}: {message}", file=sys.stderr, flush=True)


def _check_flags(args) -> None:
    """Flag checks that need no file and more than one flag (each number alone is checked at parse time by
    cli.checks): sampling flags that would be ignored, GPUs asked for vs declared, the output path."""
    request_options(args)  # mode, max tokens, sampling, layout: refused before any file is read
    if not args.address and args.num_gpus is not None and args.gpus_per_stage is not None \
            and 3 * args.gpus_per_stage > args.num_gpus:  # (the numbers themselves: cli.checks, at parse time)
        raise InputError(_too_many_gpus(args.gpus_per_stage, args.num_gpus))
    _parse_mode(args.mode)
    if args.task != "asr":
        _check_output(args.output)
    if args.address:
        check_address(args.address)  # a dead address fails now, not after Ray's long retries


def _parse_mode(mode):
    from actors.requests import parse_mode

    return parse_mode(mode, FLAG_NAMES["mode"])


def request_options(args, caps=None) -> dict:
    """`run_request` options of the flags by the one request policy (InputError naming the flag)."""
    from actors.requests import Caps
    from actors.requests import request_options as build

    return build(mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                 layout=args.constraint, caps=caps or Caps(), names=FLAG_NAMES).run_args()


def _check_output(path: Path) -> None:
    """-o must end in .wav/.flac and be creatable: probed now, not after minutes of generation."""
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise InputError(f"-o {path}: the output must end in {' or '.join(AUDIO_SUFFIXES)}")
    if path.is_dir():
        raise InputError(f"-o {path}: is a folder; give a file name")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as err:
        raise InputError(f"-o {path}: cannot write there ({err.strerror or err})") from None
    if not existed:
        path.unlink(missing_ok=True)


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _check_inputs(args, caps):
    """Options for the pipeline, the inputs to run and (asr) the files that failed their checks: [(path, why)].
    Options and texts by the one request policy (actors.requests), against the model's caps."""
    from actors.orchestration import looks_like_path
    from actors.requests import check_text

    options = request_options(args, caps)
    if args.task == "tts":
        check_text(args.text, "TEXT", caps, args.max_new_tokens)
    if getattr(args, "system", None) is not None:
        options["system"] = check_text(args.system, "--system", caps, args.max_new_tokens, system=True)
    if args.task == "chat" and not looks_like_path(args.audio):
        check_text(args.audio, "QUESTION", caps, args.max_new_tokens)
    bad, admitted = [], {}  # admitted: path -> its AudioPayload, decoded once here and never again in the stages
    if args.task == "asr":
        inputs = []
        for path in args.audio:
            try:
                admitted[path] = _admit(path, args.max_audio_seconds)
                inputs.append(path)
            except (ValueError, OSError) as err:
                bad.append((path, _without_path(_first_line(err), str(path))))
    else:
        inputs = [args.text] if args.task == "tts" else [args.audio]
        if args.task == "chat" and looks_like_path(args.audio):
            admitted[args.audio] = _admit(args.audio, args.max_audio_seconds)
    if getattr(args, "voice", None):
        options["voice"] = _admit(args.voice, args.max_audio_seconds)
    return options, inputs, bad, admitted


def _without_path(message: str, path: str) -> str:
    """The reason alone (the report puts the path in front of it)."""
    for form in (f"{path}: ", f"{path} "):
        if message.startswith(form):
            return message[len(form):]
    return message.replace(f": {path}", "").replace(f" {path}", "")


def _admit(path, max_seconds: float):
    """The file admitted once by the one audio admission (`actors.payloads.admit_input`: header checks before
    decoding, rate, channels, length, NaN), refused as an InputError naming the file and the flag."""
    from actors.payloads import admit_input

    return admit_input(path, max_seconds=max_seconds, min_seconds=MIN_AUDIO_SECONDS,
                       names={"max_seconds": "--max-audio-seconds"}, field=str(path))


def _gpus_per_stage(args, cluster_gpus: float) -> float:
    """GPUs per stage actor: --gpus-per-stage if the cluster has them for all three stages, else a share."""
    if args.gpus_per_stage is not None:
        needed = 3 * args.gpus_per_stage
        if needed > cluster_gpus + 1e-9:
            raise InputError(_too_many_gpus(args.gpus_per_stage, cluster_gpus))
        return args.gpus_per_stage
    if cluster_gpus >= 3:
        return 1.0
    return round(cluster_gpus / 3, 3) if cluster_gpus else 0.0


def _too_many_gpus(per_stage: float, have: float) -> str:
    return (f"--gpus-per-stage {per_stage:g}: the three stages need {3 * per_stage:g} GPUs, the cluster has "
            f"{have:g} (lower it, or declare logical GPUs to a local Ray with --num-gpus)")


def _call(pipe, task: str, item, options: dict):
    if task == "tts":
        return pipe.tts(item, **options)
    if task == "asr":
        return pipe.asr(item, **{k: v for k, v in options.items() if k not in ("voice", "system")})
    return pipe.chat(item, **options)


def _report(args, inputs, results, bad, placement: dict, startup: dict) -> dict:
    from pipeline.audio import write_audio

    report = {
        "task": args.task,
        "placement": {stage: {k: p[k] for k in ("node_id", "ip", "gpu_ids", "device", "dtype")} for stage, p in placement.items()},
        "startup_s": startup.get("ray_s", 0) + startup.get("stages_s", 0),
        "startup": startup,
    }
    if not args.json:
        line = ", ".join(f"{s}: node {p['node_id'][:8]} gpu {p['gpu_ids'] or '-'} {p['device']}" for s, p in report["placement"].items())
        print(f"stages: {line}", file=sys.stderr)
    if args.task == "asr":
        return _report_asr(args, inputs, results, bad, report)
    result = results[0]
    if not result.ok:
        if result.error.stage == "input":
            raise InputError(result.error.message)
        kept = ""
        if len(result.pcm):  # a timeout or a failing stage late in the answer: keep the audio already decoded
            write_audio(args.output, result.pcm, result.sample_rate)
            kept = f" (the {len(result.pcm) / result.sample_rate:.1f} s of audio decoded before it are in {args.output})"
        _fail(f"{result.error.stage} stage: {result.error.message}{kept}")
    if not len(result.pcm):
        _fail("the pipeline produced no audio (try a larger --max-new-tokens)")
    write_audio(args.output, result.pcm, result.sample_rate)
    print(f"{result.text!r} -> {args.output}")
    return {**report, "text": result.text, "reason": result.done.reason, **_timings(result.done),
            "output": str(args.output), "seconds_of_audio": len(result.pcm) / result.sample_rate,
            "sample_rate": result.sample_rate}


def _report_asr(args, inputs, results, bad, report: dict) -> dict:
    """One line per file, in the order given: `path<TAB>text` (escaped) or a JSON line with --json."""
    outcome = {path: {"audio": str(path), "ok": False, "error": why} for path, why in bad}
    for path, result in zip(inputs, results):
        if result.ok:
            outcome[path] = {"audio": str(path), "ok": True, "text": result.text, "reason": result.done.reason,
                             **_timings(result.done)}
        else:
            outcome[path] = {"audio": str(path), "ok": False, "error": f"{result.error.stage}: {result.error.message}"}
    entries = [outcome[path] for path in args.audio if path in outcome]
    for entry in entries:
        if args.json:
            print(json.dumps({k: entry.get(k) for k in ("audio", "ok", "text", "error")}))
        elif entry["ok"]:
            print(f"{_escape(entry['audio'])}\t{_escape(entry['text'])}")
        else:
            print(f"vita-audio asr: error: {entry['audio']}: {entry['error']}", file=sys.stderr)
    failed = sum(not e["ok"] for e in entries)
    if failed:
        print(f"vita-audio asr: {failed} of {len(entries)} file(s) failed", file=sys.stderr)
    return {**report, "results": entries, "failed": failed, "exit_code": 2 if failed else 0}


def _print_failures(args, bad) -> None:
    for path, why in bad:
        if args.json:
            print(json.dumps({"audio": str(path), "ok": False, "text": None, "error": why}))
        else:
            print(f"vita-audio asr: error: {path}: {why}", file=sys.stderr)


def _escape(text: str) -> str:
    """One line per file: backslash, tab, newline and other control characters written as escapes."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text.replace("\\", "\\\\"))


def _fail(message: str) -> None:
    """A pipeline failure (not the user's input): one line on stderr, exit code 1."""
    print(f"vita-audio: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _timings(done) -> dict:
    llm = done.usage.get("llm", {})
    decoder = done.usage.get("decoder", {})
    return {
        "time_to_first_audio_s": done.timings.get("time_to_first_audio"),
        "time_to_first_text_s": done.timings.get("time_to_first_text"),
        "total_s": done.timings.get("total"),
        "forwards": {
            "encoder": done.usage.get("encoder", {}).get("waveforms", 0),
            "llm_backbone": llm.get("backbone_forwards"),
            "llm_mtp": llm.get("mtp_forwards"),
            "decoder": decoder.get("forwards", 0),
        },
        "generated_tokens": len(done.token_ids),
        "audio_codes": len(done.audio_codes),
    }
