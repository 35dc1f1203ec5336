"""`vita-audio bench encoder`: speech encoder throughput, all clips in one batched call vs one by one.

Audio seconds encoded per CPU second (process time, all threads) and per wall second, on the
tiny encoder and on a bench-sized random encoder (d_model 256, 4 heads, FFN 1024, 4 layers, codebook
16384), both written in the released format and read back with `load_encoder`. Clips come from the
mini-speech corpus, decoded and resampled before timing so only features + model are measured. The
batched ids are checked against the one-by-one ids in the same run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import markdown_table, write_report
from pipeline.sizes import ENCODER_SIZES, encoder_shape

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = Path(os.environ.get("VITA_AUDIO_SHARED", REPO.parent / "shared")) / "corpora" / "mini-speech"
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")
SIZES = ENCODER_SIZES  # pipeline.sizes: tiny (write_tiny_encoder), bench


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="folder searched for .flac/.wav/.ogg clips")
    parser.add_argument("--clips", type=int, default=24, help="number of clips (sorted by path)")
    parser.add_argument("--sizes", default="tiny,bench", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per mode (best is reported)")
    parser.add_argument("--batch-windows", type=int, default=128, help="30 s windows per forward when batched")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    from pipeline.encoder.speech_encoder import load_encoder, tiny_encoder_config, write_random_encoder

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise ValueError(f"--sizes must be a comma list of {sorted(SIZES)}, got {args.sizes!r}")
    if args.clips < 1 or args.repeats < 1 or args.batch_windows < 1:
        raise ValueError("--clips, --repeats and --batch-windows must be >= 1")
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        raise ValueError(f"--corpus {str(corpus)!r} is not a folder")
    files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)[: args.clips]
    if not files:
        raise ValueError(f"--corpus {str(corpus)!r} holds no {'/'.join(AUDIO_SUFFIXES)} files")

    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as tmp:
        for size in sizes:
            config = tiny_encoder_config(**encoder_shape(size))
            encoder = load_encoder(write_random_encoder(Path(tmp) / size, config, seed=args.seed),
                                     max_batch_windows=args.batch_windows)
            waveforms = [encoder.load(f) for f in files]
            audio_seconds = sum(len(w) for w in waveforms) / encoder.sample_rate
            modes = {
                "one_by_one": lambda: [encoder.encode_waveforms([w])[0] for w in waveforms],
                "batched": lambda: encoder.encode_waveforms(waveforms),
            }
            timings = _best_interleaved(modes, args.repeats)
            one_by_one, batched = timings["one_by_one"], timings["batched"]
            identical = batched["result"] == one_by_one["result"]
            n_params = sum(p.numel() for p in encoder.model.parameters())
            for mode, timing in (("one_by_one", one_by_one), ("batched", batched)):
                rows.append({
                    "encoder": size, "params_M": n_params / 1e6, "mode": mode, "clips": len(waveforms),
                    "audio_s": audio_seconds, "cpu_s": timing["cpu"], "wall_s": timing["wall"],
                    "audio_s_per_cpu_s": audio_seconds / timing["cpu"],
                    "audio_s_per_wall_s": audio_seconds / timing["wall"],
                })
            details[size] = {
                "config": {k: getattr(config, k) for k in ("d_model", "encoder_attention_heads", "encoder_ffn_dim",
                                                           "quantize_position", "quantize_vocab_size")},
                "params": n_params,
                "tokens": sum(len(t) for t in batched["result"]),
                "batched_equals_one_by_one": identical,
                "speedup_cpu": one_by_one["cpu"] / batched["cpu"],
                "speedup_wall": one_by_one["wall"] / batched["wall"],
            }

    results = {
        "corpus": str(corpus), "files": [str(f) for f in files], "repeats": args.repeats,
        "batch_windows": args.batch_windows, "rows": rows, "sizes": details,
    }
    ratio_rows = [{"encoder": s, "batched_vs_one_by_one_cpu": d["speedup_cpu"],
                   "batched_vs_one_by_one_wall": d["speedup_wall"], "ids_identical": d["batched_equals_one_by_one"]}
                  for s, d in details.items()]
    markdown = (
        f"{len(files)} clips from `{corpus}`, {rows[0]['audio_s']:.1f} s of audio, best of {args.repeats}; "
        f"torch threads {torch.get_num_threads()}. CPU time is process time over all threads.\n\n"
        + markdown_table(rows) + "\nBatched (one forward per group of windows) vs one clip per forward:\n\n"
        + markdown_table(ratio_rows)
    )
    json_path, md_path = write_report("encoder", results, markdown, args.out)
    results["report"] = {"json": str(json_path), "markdown": str(md_path)}
    print(markdown)
    return results


def _best_interleaved(modes: dict, repeats: int) -> dict:
    """One untimed warm-up run per mode, then `repeats` rounds alternating the modes (so load from
    other processes hits both alike); per mode the fastest CPU and wall time and its result."""
    best = {name: {"cpu": float("inf"), "wall": float("inf"), "result": fn()} for name, fn in modes.items()}
    for _ in range(repeats):
        for name, fn in modes.items():
            cpu, wall = time.process_time(), time.perf_counter()
            result = fn()
            best[name]["cpu"] = min(best[name]["cpu"], time.process_time() - cpu)
            best[name]["wall"] = min(best[name]["wall"], time.perf_counter() - wall)
            best[name]["result"] = result
    return best
