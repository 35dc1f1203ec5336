"""`vita-audio bench decoder`: speech decoder cost vs audio length, streaming schedules side by side.

For 10 s and 60 s of random codes (numpy default_rng(5), the 10 s input is the first 125 of the
60 s one, as in ../shared/research/original-speed.md) it times, in one process:
- offline: one whole decode (`SpeechDecoder.decode`),
- incremental: our bounded-window stream, fed with VITA-Audio's demo cadence (first push of 8
  codes, then pushes of 24, then `finish`),
- vita_prefix: VITA-Audio's web_demo_stream schedule (re-decode of all codes since the start,
  ODE steps 1, 3, 5, ... capped; history reset after a decode of more than 512 codes) fed with
  segments of 8 codes,
on the "tiny" decoder size and on the "bench" size (`pipeline.sizes`) of original-speed.md (flow encoder d 128 /
FFN 512 x 6, estimator channels 64 with 2 heads x 16, 4 blocks per level, 12 mid blocks; HiFT
base 128; vocab 16384; random weights built in memory). It reports real-time factors, the
60 s / 10 s cost ratios (linear = 6), the incremental stream's mel distance to a whole decode
with the same noise, and the original's numbers quoted from original-speed.md.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.report import markdown_table, write_report
from pipeline.decoder.speech_decoder import SpeechDecoder
from pipeline.decoder.stream import position_noise
from pipeline.decoder.tiny import decoder_config, random_modules

TOKENS_PER_S = 12.5

# ../shared/research/original-speed.md, "Decoder size bench" (original code, 2 threads, this machine kind)
ORIGINAL_BENCH = {
    10: {"offline_s": 2.62, "web_demo_stream_s": 6.70, "prefix_no_reset_s": 6.70, "first_chunk_s": 0.11},
    60: {"offline_s": 54.13, "web_demo_stream_s": 189.32, "prefix_no_reset_s": 462.88, "first_chunk_s": 0.08},
}


def add_arguments(parser, name: str) -> None:
    parser.add_argument("--sizes", default="tiny,bench", help="decoder sizes: tiny, bench (comma list)")
    parser.add_argument("--seconds", default="10,60", help="audio lengths in seconds (comma list)")
    parser.add_argument("--steps", type=int, default=10, help="ODE steps (incremental and offline)")
    parser.add_argument("--context", type=int, default=30, help="incremental stream: context_tokens")
    parser.add_argument("--first", type=int, default=8, help="codes in the first push (Boost: 8, Balance: 2)")
    parser.add_argument("--hop", type=int, default=24, help="codes per later push of the incremental stream")
    parser.add_argument("--full", action="store_true",
                        help="also time the bench-size offline decode and VITA prefix schedule beyond 10 s (slow: minutes)")
    parser.add_argument("--prefix-no-reset", action="store_true", help="also time the prefix schedule without the 512-code reset")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: keep the current setting). 1 by default: on a shared 2-core machine "
                             "two OpenMP threads stall on each other (10x swings run to run)")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_offline(decoder: SpeechDecoder, codes, steps: int) -> dict:
    pcm, seconds = _timed(lambda: decoder.decode(codes, n_steps=steps))
    return {"seconds": seconds, "samples": int(pcm.size)}


def run_incremental(decoder: SpeechDecoder, codes, steps: int, context: int, first: int, hop: int) -> dict:
    stream = decoder.stream("incremental", n_steps=steps, context_tokens=context, record_mel=True)
    pushes = [codes[:first]] + [codes[i: i + hop] for i in range(first, len(codes), hop)]
    t0 = time.perf_counter()
    first_audio, calls, samples = None, [], 0
    for chunk in pushes:
        pcm, seconds = _timed(lambda: stream.push(chunk))
        calls.append(round(seconds, 3))
        samples += pcm.size
        if first_audio is None and pcm.size:
            first_audio = time.perf_counter() - t0
    pcm, seconds = _timed(stream.finish)
    calls.append(round(seconds, 3))
    samples += pcm.size
    return {"seconds": time.perf_counter() - t0, "samples": int(samples), "first_chunk_s": first_audio,
            "pushes": len(calls), "max_push_s": max(calls), "calls_s": calls, "mel": stream.recorded_mel()}


def run_prefix(decoder: SpeechDecoder, codes, steps: int, reset_after: int | None) -> dict:
    stream = decoder.stream("vita_prefix", n_steps=steps, reset_after=reset_after)
    t0 = time.perf_counter()
    first_audio, samples = None, 0
    for i in range(0, len(codes), 8):
        pcm = stream.push(codes[i: i + 8], final=i + 8 >= len(codes))
        samples += pcm.size
        if first_audio is None and pcm.size:
            first_audio = time.perf_counter() - t0
    return {"seconds": time.perf_counter() - t0, "samples": int(samples), "first_chunk_s": first_audio,
            "decodes": len(stream.decodes), "codes_redecoded": int(sum(d["codes"] for d in stream.decodes))}


def mel_distance(decoder: SpeechDecoder, codes, mel: torch.Tensor, steps: int) -> dict:
    """Incremental mel vs a whole decode with the same position-keyed noise (the price of the window)."""
    n = decoder.n_frames(len(codes))
    with torch.inference_mode():
        whole = decoder.flow_mel(decoder.tensor(codes), position_noise(decoder, 0, n, 42), None, steps).float().cpu()
    diff = (mel - whole).double()
    snr = 10 * np.log10(float((whole.double() ** 2).sum()) / max(float((diff ** 2).sum()), 1e-30))
    return {"mel_l1": float(diff.abs().mean()), "mel_snr_db": snr, "whole_mel_abs_mean": float(whole.abs().mean())}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    seconds_list = sorted(int(s) for s in args.seconds.split(",") if s.strip())
    for s in sizes:
        if s not in ("tiny", "bench"):
            raise ValueError(f"--sizes: unknown size {s!r} (tiny, bench)")
    if not seconds_list or min(seconds_list) <= 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds!r}")
    all_codes = np.random.default_rng(5).integers(0, 16384, int(max(seconds_list) * TOKENS_PER_S)).tolist()
    rows, results = [], {"settings": vars(args).copy(), "sizes": {}}
    results["settings"].pop("_module", None)
    for size in sizes:
        config = decoder_config(size)
        flow, hift = random_modules(config, seed=5)
        decoder = SpeechDecoder(config, flow, hift)
        decoder.decode(all_codes[:16], n_steps=1)  # warm-up
        per_len = {}
        for secs in seconds_list:
            codes = all_codes[: int(secs * TOKENS_PER_S)]
            audio_s = 256 * decoder.n_frames(len(codes)) / decoder.sample_rate
            heavy = size == "bench" and secs > 10 and not args.full
            entry = {"codes": len(codes), "audio_s": audio_s}
            entry["incremental"] = run_incremental(decoder, codes, args.steps, args.context, args.first, args.hop)
            mel = entry["incremental"].pop("mel")
            entry["incremental"].update(mel_distance(decoder, codes, mel, args.steps))
            if not heavy:
                entry["offline"] = run_offline(decoder, codes, args.steps)
                entry["vita_prefix"] = run_prefix(decoder, codes, args.steps, reset_after=512)
                if args.prefix_no_reset and len(codes) > 512:
                    entry["vita_prefix_no_reset"] = run_prefix(decoder, codes, args.steps, reset_after=None)
            per_len[secs] = entry
            row = {"size": size, "audio": f"{secs}s", "codes": len(codes),
                   "incremental s": entry["incremental"]["seconds"], "incr RTF": entry["incremental"]["seconds"] / audio_s,
                   "incr first chunk s": entry["incremental"]["first_chunk_s"], "incr max push s": entry["incremental"]["max_push_s"],
                   "offline s": entry.get("offline", {}).get("seconds", "–"),
                   "vita_prefix s": entry.get("vita_prefix", {}).get("seconds", "–"),
                   "incr mel L1": entry["incremental"]["mel_l1"], "incr mel SNR dB": entry["incremental"]["mel_snr_db"]}
            if "offline" in entry:
                row["offline RTF"] = entry["offline"]["seconds"] / audio_s
                row["prefix / incr"] = entry["vita_prefix"]["seconds"] / entry["incremental"]["seconds"]
            if size == "bench" and secs in ORIGINAL_BENCH:
                orig = ORIGINAL_BENCH[secs]
                row["orig offline s"] = orig["offline_s"]
                row["orig web_demo_stream s"] = orig["web_demo_stream_s"]
            rows.append(row)
        ratios = {}
        if len(seconds_list) >= 2:
            lo, hi = per_len[seconds_list[0]], per_len[seconds_list[-1]]
            for mode in ("incremental", "offline", "vita_prefix"):
                if mode in lo and mode in hi:
                    ratios[f"{mode}_{seconds_list[-1]}s_over_{seconds_list[0]}s"] = hi[mode]["seconds"] / lo[mode]["seconds"]
            ratios["linear_would_be"] = hi["codes"] / lo["codes"]
        results["sizes"][size] = {"per_length": {str(k): v for k, v in per_len.items()}, "ratios": ratios}

    results["original_bench_size"] = ORIGINAL_BENCH
    md = [__doc__.split("\n\n")[0] + "\n",
          f"torch threads {torch.get_num_threads()}; ODE steps {args.steps}; incremental context {args.context} codes, "
          f"pushes {args.first} then {args.hop} codes; VITA prefix: segments of 8, steps 1, 3, ... capped at {args.steps}, "
          "reset after a decode of > 512 codes. Times in seconds of wall clock, measured side by side in this run.\n",
          markdown_table(rows)]
    for size, res in results["sizes"].items():
        if res["ratios"]:
            md.append(f"\n`{size}` cost ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()) + "\n")
    md.append("\nOriginal (VITA-Audio / GLM-4-Voice code, bench size, 2 threads, from original-speed.md; "
              "not re-timed here): offline 10 s 2.62 s, 60 s 54.13 s (ratio 20.66); web_demo_stream 10 s 6.70 s, "
              "60 s 189.32 s (ratio 28.28); prefix re-decode without reset 60 s 462.88 s (69.14 x its 10 s).\n")
    write_report("decoder", results, "\n".join(md), args.out)
    return {"rows": rows, "ratios": {k: v["ratios"] for k, v in results["sizes"].items()}}
