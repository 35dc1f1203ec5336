"""The point of training, measured: a small model trained with `jobs.train` on mini-speech, then served.

    python -m benchmarks.train_acceptance --out benchmarks        # -> benchmarks/train-acceptance.{md,json}

0. The init set: `vita-audio tiny --llm-size small` (`--llm-size`): the tiny tokenizer, encoder and decoder beside a
   random LLM whose shape has the 7B's proportions (a 12-layer backbone against 1-layer MCTP modules, intermediate
   5.4x hidden), so the drafting arithmetic of `exact` is the real model's, not the 2-layer tiny LLM's, in which a
   module forward costs as much as a backbone forward.
1. mini-speech's LibriSpeech utterances -> ASR shards through the corpus-preparation job (tiny encoder + tokenizer).
2. The four stages of the tiny recipe with longer schedules (key=value overrides, the same `jobs.train.run` as the
   CLI): stage 1 memorises the transcripts, stages 2-3 train the MCTP modules on the frozen backbone, stage 4
   fine-tunes everything (MCTP learning rate x10).
3. (i) Every training utterance transcribed through the staged Ray pipeline (`actors.StagedPipeline`, as `vita-audio asr`
   serves it: no forced layout) from the stage-3 and the final stage-4 folder; CER with jiwer. Target <= 0.3
   (memorisation: this checks the data path from corpus to served model, not generalisation).
   (ii) On the training prompts, `exact` vs `vanilla` decoding of the stage-3 (and stage-4) model: identical ids,
   tokens per backbone forward (target >= 3) and wall time (target: exact faster), with every forward timed
   (`benchmarks.decode.ForwardTimer`) to say why the wall-time ratio is what it is.
   (iii) The final folder served unchanged: `vita-audio asr` and `vita-audio tts` (the CLI, its own Ray) and the
   Serve endpoint (serve.app.build_app on 127.0.0.1, the openai SDK's transcriptions and speech calls).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from actors.ray_runtime import close_local_ray

REPO = Path(__file__).resolve().parents[2]
TIMED_ROUNDS = 3  # exact vs vanilla: timed pairs after the warm-up pair; the ratio is of the medians
DEFAULT_OVERRIDES = ["max_length=256", "grad_accum=1", "warmup_ratio=0.02", "min_lr_ratio=0.3",
                     "stage1.max_steps=600", "stage1.lr=3e-3", "stage1.save_every=200",
                     "stage2.max_steps=200", "stage2.lr=3e-3", "stage2.save_every=100",
                     "stage3.max_steps=300", "stage3.lr=3e-3", "stage3.save_every=100",
                     "stage4.max_steps=100", "stage4.lr=3e-4", "stage4.save_every=50"]


def add_arguments(parser: argparse.ArgumentParser, name: str = "train-acceptance") -> None:
    """The flags after `--out` (which `vita-audio bench` gives every benchmark)."""
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/train-acceptance-work)")
    parser.add_argument("--llm-size", default="small", help="LLM size of pipeline.sizes to train (the init set is "
                        "`vita-audio tiny --llm-size NAME`)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=40, help="training utterances to evaluate")
    parser.add_argument("--served", type=int, default=10, help="utterances transcribed through the Serve endpoint")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides (after the defaults)")


def run(args: argparse.Namespace) -> dict:
    import ray

    from benchmarks.train import MINI, prepare_mini_speech
    from jobs.train import run as train_run
    out = Path(args.out)
    work = args.work or out / "train-acceptance-work"
    work.mkdir(parents=True, exist_ok=True)
    init = init_set(work / f"init-{args.llm_size}", args.llm_size)
    started = not ray.is_initialized()
    if started:
        close_local_ray()  # loopback only, Ray's token auth on
        ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 2**20, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        shards = prepare_mini_speech(init, work / "prepared")
        # the preparation's own runs (its manifest): a rerun of the acceptance reads the finished shards back
        prep_s = sum(r["wall_s"] for r in json.loads((work / "prepared" / "manifest.json").read_text())["runs"])
        overrides = DEFAULT_OVERRIDES + list(args.overrides)
        run_dir = work / "run"
        manifest = train_run.run("tiny", str(shards), str(init / "llm"), str(run_dir), stages="1-4",
                                 workers=args.workers, overrides=overrides)
        # each stage's wall from the run manifest, so a rerun that resumes a finished run reports the training's
        stage_s = {n: s["finished"] - s["started"] for n, s in manifest["stages"].items()}
        load = {"eval_start": os.getloadavg()[0]}
        samples = _samples(shards)[: args.prompts]
        models = {n: served_models(work / f"models-stage{n}", run_dir / f"stage{n}", init) for n in (3, 4)}
        asr = {n: transcribe(models[n], samples) for n in (3, 4)}
    finally:
        if started:
            ray.shutdown()
    load["decode_start"] = os.getloadavg()[0]
    decode = {n: exact_vs_vanilla(run_dir / f"stage{n}", samples) for n in (3, 4)}
    load["decode_end"] = os.getloadavg()[0]
    shape = shape_of(run_dir / "stage4")
    flops = forward_flops(shape)
    final = {n: manifest["stages"][str(n)]["metrics"] for n in (1, 2, 3, 4)}
    results = {"llm_size": args.llm_size, "shape": shape, "prepare_s": prep_s,
               "train_s": sum(stage_s.values()), "stage_s": stage_s, "overrides": overrides, "workers": args.workers,
               "final_metrics": final, "asr": asr, "decode": decode, "flops": flops, "corpus": str(MINI)}
    out.mkdir(parents=True, exist_ok=True)
    report = out / "train-acceptance.json"
    report.write_text(json.dumps(results, indent=1, default=float))  # kept if the serve checks fail
    results["served"] = serve_checks(models[4], samples[: args.served])
    results["load_average"] = {**load, "end": os.getloadavg()[0]}
    report.write_text(json.dumps(results, indent=1, default=float))
    (out / "train-acceptance.md").write_text(_markdown(results))
    return results


def init_set(folder: Path, llm_size: str) -> Path:
    """The random set training starts from (`vita-audio tiny --llm-size`), written once: rerunning the acceptance on
    the same work folder resumes the training run, which records this init."""
    from pipeline.tiny import TINY_MARKER, write_tiny_set

    marker = folder / TINY_MARKER
    if not (marker.is_file() and json.loads(marker.read_text()).get("llm_size") == llm_size):
        write_tiny_set(folder, seed=0, llm=llm_size)
    return folder


def shape_of(llm_dir: Path) -> dict:
    """The trained LLM's shape, from its config.json."""
    cfg = json.loads((llm_dir / "config.json").read_text())
    modules = cfg.get("num_nextn_predict_layers", 0)
    return {"hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"], "modules": modules,
            "backbone_layers": cfg["num_hidden_layers"] - modules, "vocab": cfg["vocab_size"],
            "heads": cfg["num_attention_heads"], "kv_heads": cfg["num_key_value_heads"]}


def served_models(models: Path, llm: Path, tiny: Path) -> Path:
    """A models folder as `--models` takes it: the trained LLM folder beside the init set's encoder and decoder."""
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    (models / "llm").symlink_to(llm.resolve())
    for part in ("encoder", "decoder"):
        (models / part).symlink_to((tiny / part).resolve())
    return models


def _samples(shards: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(shards, columns=["id", "input_ids", "labels", "text", "paths"]).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def transcribe(models: Path, samples: list[dict]) -> dict:
    """Each utterance through the staged Ray pipeline (encoder -> trained LLM -> text), greedy, vanilla mode."""
    import jiwer

    from actors.config import PipelineConfig
    from actors.staged_pipeline import StagedPipeline
    from actors.results import collect

    config = PipelineConfig.from_models_dir(models).with_resources(num_gpus=0)
    pipe = StagedPipeline.start(config)
    try:
        hyps, t0 = [], time.perf_counter()
        for s in samples:
            hyps.append(collect(pipe.asr(s["paths"][0], mode="vanilla", max_new_tokens=64)).text.strip())
        wall = time.perf_counter() - t0
    finally:
        pipe.shutdown()
    refs = [s["text"] for s in samples]
    norm = [h.upper() for h in hyps]
    return {"utterances": len(samples), "cer": jiwer.cer(refs, norm), "wer": jiwer.wer(refs, norm),
            "exact_matches": sum(r == h for r, h in zip(refs, norm)), "wall_s": wall,
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]}


def exact_vs_vanilla(llm_dir: Path, samples: list[dict]) -> dict:
    """Greedy decoding of every training prompt (the tokens before the first scored label) in both modes, each
    model call timed: the wall-time ratio follows from how many forwards of each kind a mode makes and their cost."""
    import statistics

    import torch
    from transformers import AutoTokenizer

    from benchmarks.decode import ForwardTimer
    from pipeline.engine.decode_engine import DecodeEngine
    from pipeline.engine.requests import EndEvent, GenerationRequest, TokenEvent
    from pipeline.llm import load_llm

    torch.set_num_threads(1)
    model = load_llm(llm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(llm_dir)
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    rounds = {"vanilla": [], "exact": []}
    for mode in ("vanilla", "exact") * (1 + TIMED_ROUNDS):  # alternating; the first pair warms up
        ids, forwards, timer, calls, t0 = [], 0, ForwardTimer(), {}, time.perf_counter()
        for s in samples:
            start = next(i for i, label in enumerate(s["labels"]) if label != -100)
            engine = DecodeEngine(model, observer=timer)
            engine.add_request(GenerationRequest(s["input_ids"][:start], mode=mode, max_new_tokens=64, stop_ids=stop))
            out, first = [], len(timer.log)
            with torch.inference_mode():
                while engine.has_unfinished():
                    for event in engine.step():
                        if isinstance(event, TokenEvent):
                            out.append(event.token_id)
                        elif isinstance(event, EndEvent):
                            forwards += event.usage["backbone_forwards"]
            ids.append(out)
            for kind, seconds in _forward_kinds(timer.log[first:]):
                calls.setdefault(kind, []).append(seconds)
        rounds[mode].append({"wall_s": time.perf_counter() - t0, "tokens": sum(map(len, ids)),
                             "backbone_forwards": forwards, "ids": ids, "model_s": timer.seconds,
                             "calls": {k: {"count": len(v), "median_ms": 1e3 * statistics.median(v), "total_s": sum(v)}
                                       for k, v in sorted(calls.items())}})
    timed = {m: r[1:] for m, r in rounds.items()}
    walls = {m: [r["wall_s"] for r in timed[m]] for m in timed}
    last = {m: timed[m][-1] for m in timed}  # forward counts and costs: the last timed round of each mode
    v = last["vanilla"]
    return {"identical": all(r["ids"] == v["ids"] for rs in timed.values() for r in rs), "prompts": len(samples),
            "tokens_per_forward": {m: last[m]["tokens"] / max(1, last[m]["backbone_forwards"]) for m in last},
            "wall_s": {m: statistics.median(w) for m, w in walls.items()}, "wall_rounds_s": walls,
            "speedup": statistics.median(walls["vanilla"]) / statistics.median(walls["exact"]),
            "tokens": v["tokens"], "model_s": {m: last[m]["model_s"] for m in last},
            "calls": {m: last[m]["calls"] for m in last}}


def _forward_kinds(log: list[tuple]) -> list[tuple[str, float]]:
    """One prompt's ForwardTimer log -> (kind, seconds) per model forward, each with its step's vocabulary
    projection (lm_head) added: the prompt's prefill, 1-token backbone steps, backbone steps over several tokens
    (exact: the new token and the drafts it verifies), MCTP module steps."""
    merged = []
    for entry in log:
        if entry[0] == "lm_head" and merged:
            merged[-1] = (*merged[-1][:3], merged[-1][3] + entry[3])
        else:
            merged.append(entry)
    kinds = []
    for i, (kind, _, q_len, seconds) in enumerate(merged):
        if kind.startswith("mtp"):
            kinds.append(("mtp module", seconds))
        elif kind == "backbone":
            kinds.append(("prefill" if i == 0 else "backbone (1 token)" if q_len == 1 else
                          "backbone (several tokens)", seconds))
    return kinds


def forward_flops(shape: dict) -> dict:
    """Multiply-adds per token of one backbone forward and one MCTP module forward, from the shape (`shape_of`)."""
    h, inter, vocab = shape["hidden"], shape["intermediate"], shape["vocab"]
    kv = shape["kv_heads"] * (h // shape["heads"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    backbone = shape["backbone_layers"] * layer + vocab * h
    module = layer + 2 * h * h + vocab * h  # its projection of [norm(hidden), norm(embedding)] to h, one layer
    return {"backbone": backbone, "module": module, "vocab": vocab, "module_per_backbone": module / backbone,
            "lm_head_share": vocab * h / backbone}


def serve_checks(models: Path, samples: list[dict]) -> dict:
    """The final folder, unchanged, through the CLI (`vita-audio asr` / `tts`, each with its own local Ray) and
    through the Serve endpoint (the openai SDK on 127.0.0.1): transcripts scored with jiwer, speech non-empty."""
    import subprocess

    import jiwer

    refs = [s["text"] for s in samples]
    cli = [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cli + ["asr", "--models", str(models), "--mode", "vanilla", "--json"]
                          + [s["paths"][0] for s in samples], capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in rows if "audio" in r]  # one line per file (the summary line has none)
    cli_hyps = [(r.get("text") or "").strip().upper() for r in rows]
    # the model learned ASR only (mini-speech's ASR shards): asked for speech it writes no audio codes unless the
    # task's layout is forced, which `--constraint task` does (and the Serve endpoint always does)
    wav = models.parent / "acceptance-tts.wav"
    wav.unlink(missing_ok=True)
    tts = subprocess.run(cli + ["tts", "--models", str(models), "--constraint", "task", "-o", str(wav),
                                refs[0].lower()], capture_output=True, text=True, env=env, timeout=900)
    result = {"cli_asr": {"exit_code": done.returncode, "files": len(rows),
                          "cer": jiwer.cer(refs, cli_hyps) if len(cli_hyps) == len(refs) else None,
                          "stderr": done.stderr[-500:] if done.returncode else ""},
              "cli_tts": {"exit_code": tts.returncode, "wav_bytes": wav.stat().st_size if wav.exists() else 0,
                          "stderr": tts.stderr[-500:] if tts.returncode else ""}}
    result["serve"] = _serve_endpoint(models, samples)
    return result


def _serve_endpoint(models: Path, samples: list[dict]) -> dict:
    import jiwer
    import openai
    import ray
    from ray import serve

    from actors.ray_runtime import free_port
    from serve.app import build_app

    port = free_port()
    close_local_ray()  # loopback only, Ray's token auth on
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models": str(models)}), name="acceptance", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        hyps, default_hyps = [], []  # mode vanilla (as the pipeline check), and the folder's own MCTP mode
        for s in samples:
            with open(s["paths"][0], "rb") as f:
                hyps.append(client.audio.transcriptions.create(model="vita-audio", file=f,
                                                               extra_body={"mode": "vanilla"}).text.strip().upper())
            with open(s["paths"][0], "rb") as f:
                default_hyps.append(client.audio.transcriptions.create(model="vita-audio", file=f).text.strip().upper())
        speech = client.audio.speech.create(model="vita-audio", voice="alloy", input=samples[0]["text"].lower(),
                                            response_format="wav")
        refs = [s["text"] for s in samples]
        return {"utterances": len(samples), "cer": jiwer.cer(refs, hyps), "speech_wav_bytes": len(speech.content),
                "cer_default_mode": jiwer.cer(refs, default_hyps),
                "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}
    finally:
        serve.shutdown()
        ray.shutdown()


def _effective(overrides: list[str]) -> list[str]:
    """key=value overrides with later ones replacing earlier ones of the same key, in first-seen order."""
    last = {}
    for item in overrides:
        last[item.partition("=")[0]] = item
    return list(last.values())


def _markdown(r: dict) -> str:
    asr, decode, served = r["asr"], r["decode"], r["served"]
    ok = lambda b: "**met**" if b else "**not met**"  # noqa: E731
    shape, load = r["shape"], r["load_average"]
    lines = [
        f"# Training acceptance: a {r['llm_size']} model trained on mini-speech, then served", "",
        f"Produced by `python -m benchmarks.train_acceptance --llm-size {r['llm_size']}` ({r['workers']} Ray Train "
        f"worker(s), DeepSpeed ZeRO-2, CPU/gloo), from the random set `vita-audio tiny --llm-size {r['llm_size']}`. "
        f"LLM shape: {shape['backbone_layers']} backbone layers + {shape['modules']} one-layer MCTP modules, hidden "
        f"{shape['hidden']}, intermediate {shape['intermediate']}, {shape['heads']} heads / {shape['kv_heads']} KV "
        f"head(s), {shape['vocab']:,} vocabulary rows (the tiny tokenizer: 16384 audio codes + a small text part). "
        f"Corpus: {_get(asr, 3)['utterances']} LibriSpeech-layout utterances of mini-speech, prepared by "
        f"`jobs.prepare` in {r['prepare_s']:.0f} s; stages 1-4 trained in {r['train_s']:.0f} s "
        f"({', '.join(f'{s:.0f}' for s in r['stage_s'].values())} s, Ray Train start-up included) with overrides "
        f"`{' '.join(_effective(r['overrides']))}`. Load average (1 min) on this {os.cpu_count()}-core machine, "
        f"shared with other engineers' jobs: {load['eval_start']:.1f} when the evaluation started, "
        f"{load['decode_start']:.1f} / {load['decode_end']:.1f} before / after the decode timing, "
        f"{load['end']:.1f} at the end.", "",
        "| check | target | measured | |", "|---|---|---|---|",
    ]
    for n in (3, 4):
        a, d = _get(asr, n), _get(decode, n)
        tpf = d["tokens_per_forward"]
        lines += [
            f"| stage {n}: CER of the training utterances through the staged Ray pipeline (vanilla, greedy) | <= 0.3 "
            f"| {a['cer']:.3f} (WER {a['wer']:.3f}, {a['exact_matches']}/{a['utterances']} exact) | {ok(a['cer'] <= 0.3)} |",
            f"| stage {n}: `exact` tokens per backbone forward on the training prompts | >= 3 | {tpf['exact']:.2f} "
            f"(vanilla {tpf['vanilla']:.2f}) | {ok(tpf['exact'] >= 3)} |",
            f"| stage {n}: `exact` output identical to `vanilla` | identical | "
            f"{'identical' if d['identical'] else 'different'} | {ok(d['identical'])} |",
            f"| stage {n}: `exact` faster than `vanilla` (wall, {d['prompts']} prompts, {d['tokens']} tokens; median "
            f"of {len(d['wall_rounds_s']['exact'])} alternating rounds) | > 1x | "
            f"{d['speedup']:.2f}x ({d['wall_s']['exact']:.2f} s vs {d['wall_s']['vanilla']:.2f} s) | {ok(d['speedup'] > 1)} |",
        ]
    cli, tts, ep = served["cli_asr"], served["cli_tts"], served["serve"]
    lines += [
        f"| final folder: `vita-audio asr --models --mode vanilla` ({cli['files']} files) | exit 0, CER <= 0.3 | exit {cli['exit_code']}, "
        f"CER {cli['cer'] if cli['cer'] is None else format(cli['cer'], '.3f')} | "
        f"{ok(cli['exit_code'] == 0 and cli['cer'] is not None and cli['cer'] <= 0.3)} |",
        f"| final folder: `vita-audio tts --models --constraint task` | exit 0, a wav | exit {tts['exit_code']}, {tts['wav_bytes']} bytes | "
        f"{ok(tts['exit_code'] == 0 and tts['wav_bytes'] > 44)} |",
        f"| final folder: Serve endpoint, openai SDK `audio.transcriptions`, mode vanilla ({ep['utterances']} utterances) "
        f"| CER <= 0.3 | {ep['cer']:.3f} (in the folder's own MCTP mode, unverified drafts: "
        f"{ep.get('cer_default_mode', float('nan')):.3f}) | {ok(ep['cer'] <= 0.3)} |",
        f"| final folder: Serve endpoint, openai SDK `audio.speech` (wav) | audio | {ep['speech_wav_bytes']} bytes | "
        f"{ok(ep['speech_wav_bytes'] > 44)} |",
        "", "The model learned ASR only (mini-speech's ASR shards), so the speech checks show that the trained folder "
        "serves speech requests and returns audio (through the task's forced layout), not what the audio says.",
        "", "## Why `exact` is or is not faster: every forward timed", "",
        "Median milliseconds of each forward kind (its share of the vocabulary projection included), and how many "
        "each mode made (stage-3 model, the last timed round of each mode):", "",
        "| mode | forward | count | median ms | total s |", "|---|---|---|---|---|",
    ]
    d3 = _get(decode, 3)
    for mode in ("vanilla", "exact"):
        for kind, c in d3["calls"][mode].items():
            lines.append(f"| {mode} | {kind} | {c['count']} | {c['median_ms']:.2f} | {c['total_s']:.2f} |")
    calls = d3["calls"]["exact"]
    backbone_ms = d3["calls"]["vanilla"]["backbone (1 token)"]["median_ms"]
    module_ms = calls.get("mtp module", {}).get("median_ms", float("nan"))
    t = d3["tokens_per_forward"]["exact"]
    per_token = {m: d3["model_s"][m] / d3["tokens"] * 1e3 for m in ("vanilla", "exact")}
    drafts = calls.get("mtp module", {}).get("count", 0) / d3["tokens"]
    flops = r["flops"]
    ratio = module_ms / backbone_ms
    lines += [
        "", f"A module forward takes {module_ms:.2f} ms, a one-token backbone forward {backbone_ms:.2f} ms "
        f"({ratio:.2f} of it). By arithmetic a module forward is {flops['module_per_backbone']:.2f} of a backbone "
        f"forward on this shape (multiply-adds per token: module {flops['module']:,}, backbone {flops['backbone']:,}; "
        f"the vocabulary projection of {flops['vocab']:,} rows, in both, is {flops['lm_head_share']:.0%} of the "
        f"backbone's){_fixed_costs(ratio, flops['module_per_backbone'], shape['backbone_layers'])}. `exact` made "
        f"{drafts:.2f} module forwards and {1 / t:.2f} verifying backbone forwards per token: {per_token['exact']:.2f} "
        f"ms of model time per token against vanilla's {per_token['vanilla']:.2f} ms.",
        "", _verdict(d3, ratio, drafts, t), "",
        f"Model time (sum of the forwards) vs wall, same round: vanilla {d3['model_s']['vanilla']:.2f} s of "
        f"{d3['wall_rounds_s']['vanilla'][-1]:.2f} s, exact {d3['model_s']['exact']:.2f} s of "
        f"{d3['wall_rounds_s']['exact'][-1]:.2f} s (the rest is the engine's own work per step). Wall of each timed "
        f"round: vanilla {_seconds(d3['wall_rounds_s']['vanilla'])}, exact {_seconds(d3['wall_rounds_s']['exact'])}.",
        "",
        "Final training metrics per stage (last optimizer step):", "",
    ]
    for n, m in r["final_metrics"].items():
        mtp = m.get("mtp_losses") or []
        lines.append(f"- stage {n}: step {m['step']}, loss {m['loss']:.3f}, backbone {m['backbone_loss']:.3f}"
                     + (f", MCTP mean {sum(mtp) / len(mtp):.3f} (first {mtp[0]:.3f}, last {mtp[-1]:.3f})" if mtp else ""))
    lines += ["", "First transcripts of the final folder (reference / hypothesis):", ""]
    lines += [f"- `{e['ref']}` / `{e['hyp']}`" for e in _get(asr, 4)["examples"]]
    lines += ["", "Through the Serve endpoint:", ""]
    lines += [f"- `{e['ref']}` / `{e['hyp']}`" for e in ep["examples"]]
    return "\n".join(lines) + "\n"


def _fixed_costs(measured: float, arithmetic: float, layers: int) -> str:
    """Why the measured module/backbone cost ratio differs from the multiply-add ratio."""
    if measured < arithmetic:
        return (f"; measured, a module is cheaper still, because at these widths a layer costs mostly its fixed "
                f"per-call work and the backbone has {layers} layers to the module's one")
    return ("; measured, a module costs more than its multiply-adds say: the vocabulary projection, one large "
            "matmul, dominates both forwards at this width")


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f} s" for v in values)


def _verdict(d: dict, module_ratio: float, drafts_per_token: float, tokens_per_forward: float) -> str:
    """Why `exact` is (or is not) faster than vanilla, from the measured costs: per token, exact pays
    drafts x module + 1/tokens-per-forward x a verifying backbone forward, against one backbone forward."""
    if d["speedup"] > 1:
        return (f"So `exact` is {d['speedup']:.2f}x vanilla: a module forward is {module_ratio:.2f} of a backbone "
                f"forward, and {tokens_per_forward:.2f} tokens per backbone forward leave {drafts_per_token:.2f} module "
                "forwards per token plus a fraction of a backbone forward, cheaper than vanilla's one backbone forward "
                "per token. The ids are identical because `exact` only keeps drafts the backbone confirms.")
    return (f"So `exact` is {d['speedup']:.2f}x vanilla: with a module forward at {module_ratio:.2f} of a backbone "
            f"forward, {drafts_per_token:.2f} module forwards per token plus the verifying backbone forwards cost "
            "more than vanilla's one backbone forward per token (see the table: this is the cost of the forwards "
            "on this shape and this CPU, not the acceptance). The ids are identical because `exact` only keeps "
            "drafts the backbone confirms.")


def _get(per_stage: dict, n: int):
    """A per-stage entry by stage number (int keys in memory, str keys after a JSON round trip)."""
    return per_stage[n] if n in per_stage else per_stage[str(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_acceptance")
    parser.add_argument("--out", default="benchmarks", help="folder for train-acceptance.{md,json}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    print(json.dumps({n: {"cer": results["asr"][n]["cer"], "identical": results["decode"][n]["identical"],
                          "speedup": results["decode"][n]["speedup"],
                          "tokens_per_forward": results["decode"][n]["tokens_per_forward"]} for n in (3, 4)},
                     default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
