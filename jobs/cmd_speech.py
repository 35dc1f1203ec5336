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

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p, name: str) -> None:
    if name == "tts":
        p.add_argument("text", help="text to speak")
        p.add_argument("-o", "--output", type=Path, required=True, help="output wav/flac")
        p.add_argument("--voice", help="voice prompt audio file")
    elif name == "asr":
        p.add_argument("audio", nargs="+", help="audio files to transcribe")
    else:
        p.add_argument("audio", help="the spoken question (audio file)")
        p.add_argument("-o", "--output", type=Path, required=True, help="output wav/flac for the spoken answer")
        p.add_argument("--voice", help="voice prompt audio file")
        p.add_argument("--system", help="system turn (default: the built-in persona)")
    p.set_defaults(task=name)
    p.add_argument("--models", type=Path, default=None,
                   help="folder with llm/, encoder/, decoder/ (default: $VITA_AUDIO_MODELS, else the tiny set)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs a local Ray declares (logical ones work without CUDA)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs a local Ray declares")
    p.add_argument("--gpus-per-stage", type=float, default=None,
                   help="GPUs per stage actor (default: 1 if the cluster has 3, else a share, else 0 = CPU)")
    p.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    p.add_argument("--mode", default=None, help="vanilla|balance|boost|turbo|exact or a list like 1,10,4,10")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--constraint", default="auto", choices=["auto", "task", "interleaved", "text", "none"],
                   help="output layout forced on the LLM ('task': interleaved for tts/chat, text for asr, which the "
                        "random tiny weights need; 'none': the model's own layout, right for trained checkpoints; "
                        "'auto' (default): 'task' on a tiny set (vita-audio tiny), else 'none')")
    p.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default: greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole request")
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    from actors.config import PipelineConfig

    options, inputs = _check_inputs(args)  # before Ray starts: bad input fails fast with exit code 2
    models = args.models or os.environ.get("VITA_AUDIO_MODELS")
    if models is None:
        from pipeline.tiny import default_models_dir

        models = default_models_dir()
    if args.constraint == "auto":  # random tiny weights need the layout forced; trained ones follow their own
        from pipeline.tiny import is_tiny_set

        options["constraint"] = "task" if is_tiny_set(models) else None
    config = PipelineConfig.from_models_dir(models, placement_strategy=args.placement, request_timeout_s=args.timeout)

    import ray

    started = _start_ray(args)
    try:
        config = config.with_resources(num_gpus=_gpus_per_stage(args, ray.cluster_resources().get("GPU", 0)))
        from actors.pipeline import Pipeline, collect

        t0 = time.perf_counter()
        pipe = Pipeline.start(config)
        startup = time.perf_counter() - t0
        try:
            results = [collect(_call(pipe, args.task, item, options)) for item in inputs]
            placement = {stage: p.to_dict() for stage, p in pipe.placement().items()}
        finally:
            pipe.shutdown()
    finally:
        if started:
            ray.shutdown()
    return _report(args, results, placement, startup)


def _check_inputs(args):
    from pipeline.audio import load_audio
    from pipeline.generate import SamplingParams

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingParams() if args.temperature is None else SamplingParams(
        greedy=False, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.temperature is None and args.repetition_penalty != 1.0:
        sampling = SamplingParams(repetition_penalty=args.repetition_penalty)
    mode = args.mode
    if mode and "," in mode:
        try:
            mode = [int(x) for x in mode.split(",")]
        except ValueError:
            raise ValueError(f"--mode {args.mode!r}: a list must be integers like 1,10,4,10") from None
    options = dict(mode=mode, max_new_tokens=args.max_new_tokens, sampling=sampling,
                   constraint=None if args.constraint in ("none", "auto") else args.constraint)
    if args.task == "tts":
        if not args.text.strip():
            raise ValueError("TEXT is empty: give the text to speak")
        inputs = [args.text]
    elif args.task == "asr":
        inputs = list(args.audio)
    else:
        inputs = [args.audio]
        if args.system is not None:
            options["system"] = args.system
    for path in ([] if args.task == "tts" else inputs) + ([args.voice] if getattr(args, "voice", None) else []):
        load_audio(path)  # AudioError (a ValueError) or FileNotFoundError names the file and the problem
    if getattr(args, "voice", None):
        options["voice"] = args.voice
    return options, inputs


def _start_ray(args) -> bool:
    import ray

    if ray.is_initialized():
        return False
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_gpus=args.num_gpus, num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}})
    return True


def _gpus_per_stage(args, cluster_gpus: float) -> float:
    if args.gpus_per_stage is not None:
        if args.gpus_per_stage < 0:
            raise ValueError(f"--gpus-per-stage must be >= 0, got {args.gpus_per_stage}")
        return args.gpus_per_stage
    if cluster_gpus >= 3:
        return 1.0
    return round(cluster_gpus / 3, 3) if cluster_gpus else 0.0


def _call(pipe, task: str, item, options: dict):
    if task == "tts":
        return pipe.tts(item, **options)
    if task == "asr":
        return pipe.asr(item, **{k: v for k, v in options.items() if k not in ("voice", "system")})
    return pipe.chat(item, **options)


def _report(args, results, placement: dict, startup: float) -> dict:
    from pipeline.audio import write_audio

    outputs = []
    for item, result in zip(args.audio if args.task == "asr" else [None], results):
        if not result.ok:
            if result.error.stage == "input":
                raise ValueError(result.error.message)
            _fail(f"{result.error.stage} stage: {result.error.message}")
        entry = {"text": result.text, "reason": result.done.reason, **_timings(result.done)}
        if item is not None:
            entry["audio"] = str(item)
        if args.task != "asr":
            if not len(result.pcm):
                _fail("the pipeline produced no audio (try a larger --max-new-tokens)")
            write_audio(args.output, result.pcm, result.sample_rate)
            entry.update(output=str(args.output), seconds_of_audio=len(result.pcm) / result.sample_rate,
                         sample_rate=result.sample_rate)
        outputs.append(entry)
        print(result.text if args.task == "asr" else f"{result.text!r} -> {args.output}")
    report = {
        "task": args.task,
        "placement": {stage: {k: p[k] for k in ("node_id", "ip", "gpu_ids", "device", "dtype")} for stage, p in placement.items()},
        "startup_s": startup,
        **({"results": outputs} if args.task == "asr" else outputs[0]),
    }
    if not args.json:
        line = ", ".join(f"{s}: node {p['node_id'][:8]} gpu {p['gpu_ids'] or '-'} {p['device']}" for s, p in report["placement"].items())
        print(f"stages: {line}", file=sys.stderr)
    return report


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
