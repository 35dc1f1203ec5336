"""`vita-audio bench gpu`: the one-command GPU run. On one CUDA GPU, in at most ~8 minutes, with random weights of
the released 7B shapes built directly on the device (no hub, no disk):

- tokens/s per MCTP mode (vanilla, balance, boost, turbo) at batch 1 and each mode's speed-up over vanilla;
- ms per backbone step (1 token) and per MCTP step against the roofline: the bytes a step must read (its weights,
  the whole lm_head, the KV cache at the step's context) over the GPU's memory bandwidth (looked up from the
  device's name, `--bandwidth-gbs` to override);
- the batched engine at 1, 8 and 32 streams (Boost, the release's default schedule): aggregate tokens/s, ms/step;
- the speech encoder's and the audio decoder's real-time factors at their real sizes (WhisperVQ 343.6 M,
  flow + HiFT 131.6 M), whole and, for the decoder, streamed;
- time to first audio through the stages' data path with all three on the one GPU: encoder -> engine (first
  audio chunk) -> decoder stream (first PCM). In one process: the stage actors load weights from folders, and
  this run builds them on the device, so Ray is not on this path.

An out-of-memory error or a missing kernel ends that section with an `error` row; the run goes on. Writes
gpu.json, gpu.md and gpu.png (benchmarks/report.py). Without CUDA it refuses in one line (exit 2);
`--device cpu --size bench` runs the same code on CPU (the test does, with `--quick`).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from actors.errors import InputError
from benchmarks.report import int_list, markdown_table, write_report
from pipeline.engine.observe import StepObserver
from pipeline.tokens.chat import MODES as SCHEDULES

MODES = list(SCHEDULES)  # the named schedules (pipeline.tokens.chat.MODES), listed once; exact is not timed here
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# memory bandwidth in GB/s by device name (first match wins: the specific names before the family's)
BANDWIDTH_GBS = [
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("H800", 3350),
    ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100-PCIE-80GB", 1935), ("A100", 1555),
    ("A800", 2039), ("L40S", 864), ("L40", 864), ("A10G", 600), ("A10", 600), ("L4", 300), ("RTX 6000 Ada", 960),
    ("RTX A6000", 768), ("4090", 1008), ("3090", 936), ("V100", 900), ("T4", 320),
]


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--device", default="cuda", help="cuda (default; refused without CUDA) or cpu for the dry path")
    p.add_argument("--size", default="7B", choices=["7B", "bench", "tiny"], help="model shapes (pipeline.sizes)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bfloat16 on CUDA (the GPU path's), float32 on CPU (bf16 matmuls on a CPU without "
                        "bf16 units are ~100x slower; tests/test_dtype_path.py covers bf16 on CPU)")
    p.add_argument("--quick", action="store_true", help="few tokens, one round, no warm-up (a smoke run)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per request (default 256, --quick 16)")
    p.add_argument("--runs", type=int, default=None, help="timed rounds per row (default 3, --quick 1)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    p.add_argument("--streams", default="1,8,32", help="batched engine: concurrent streams per row")
    p.add_argument("--audio-seconds", type=float, default=None, help="encoder/decoder clip (default 10, --quick 2)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the roofline (default: "
                   "from the device name)")
    p.add_argument("--time-budget-s", type=float, default=420.0, help="sections not started by then are skipped")


def bandwidth_gbs(device_name: str) -> float | None:
    name = device_name.lower()
    return next((float(bw) for key, bw in BANDWIDTH_GBS if key.lower() in name), None)


def check_args(args) -> None:
    """Every flag checked (and CUDA's presence) before anything is built."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise InputError(f"--device must be cuda[:N] or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("bench gpu needs a CUDA GPU and this machine has none; "
                         "`--device cpu --size bench` runs the same code path on CPU")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise InputError(f"--modes must be a comma list of {','.join(MODES)}, got {args.modes!r}")
    args.mode_list = modes
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.stream_list = int_list(args.streams, "--streams")
    args.max_new_tokens = args.max_new_tokens or (16 if args.quick else 256)
    args.runs = args.runs or (1 if args.quick else 3)
    args.audio_seconds = args.audio_seconds or (2.0 if args.quick else 10.0)
    for flag in ("max_new_tokens", "runs"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.audio_seconds > 0 or not args.time_budget_s > 0:
        raise InputError("--audio-seconds and --time-budget-s must be > 0")


class _StepTimer(StepObserver):
    """Times every model call of the engine, synchronising the device around it."""

    def __init__(self, device: torch.device):
        self.device, self.log = device, []

    def on_forward(self, kind, rows, q_len, run):
        _sync(self.device)
        start = time.perf_counter()
        out = run()
        _sync(self.device)
        self.log.append((kind, rows, q_len, time.perf_counter() - start))
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.start = time.perf_counter()
        self.rows: dict[str, list[dict]] = {}
        self.errors: list[dict] = []

    def section(self, name: str, fn) -> None:
        """Run one section; an OOM, a missing kernel or any other failure becomes an error row."""
        if time.perf_counter() - self.start > self.args.time_budget_s:
            self.errors.append({"section": name, "status": "skipped", "error": "time budget spent"})
            return
        t0 = time.perf_counter()
        try:
            fn()
            status, error = "ok", ""
        except torch.cuda.OutOfMemoryError as err:
            status, error = "out of memory", str(err).splitlines()[0][:300]
        except (RuntimeError, NotImplementedError, ValueError, AssertionError) as err:
            kind = "missing kernel" if "not implemented" in str(err).lower() else "error"
            status, error = kind, f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if status != "ok":
            self.errors.append({"section": name, "status": status, "error": error})
        print(f"[bench gpu] {name}: {status} in {time.perf_counter() - t0:.1f} s {error}", flush=True)

    # --- the models, built on the device ---------------------------------------------------------------
    def _on_device(self, build):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                return build()
        finally:
            torch.set_default_dtype(previous)

    def build_llm(self) -> None:
        from pipeline.capacity import kv_bytes_per_token, llm_counts, size_configs
        from pipeline.llm import Qwen2MTPForCausalLM

        config = size_configs(self.args.size).llm
        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.model = self._on_device(lambda: Qwen2MTPForCausalLM(config)).eval()
        _sync(self.device)
        self.counts = llm_counts(config)
        self.kv = kv_bytes_per_token(config, self.dtype)
        self.rows["build"] = [{"model": "llm", "params": self.counts["total"], "seconds": time.perf_counter() - t0,
                               "weight_GiB": self.counts["total"] * self._bytes / 2**30, **self._memory()}]

    @property
    def _bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _memory(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {"allocated_GiB": torch.cuda.memory_allocated(self.device) / 2**30,
                "peak_GiB": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def _engine(self, batch: int, observer=None):
        from pipeline.engine.decode_engine import DecodeEngine

        return DecodeEngine(self.model, device=self.device, dtype=self.dtype, max_batch_size=batch, observer=observer)

    def _request(self, mode: str, i: int = 0, warm_up: bool = False):
        from pipeline.engine.requests import GenerationRequest

        n = min(8, self.args.max_new_tokens) if warm_up else self.args.max_new_tokens
        return GenerationRequest(prompt_ids=[100 + (i + j) % 1000 for j in range(32)], mode=mode,
                                 max_new_tokens=n, stop_ids=[])

    def _run(self, engine, requests) -> tuple[float, int]:
        for request in requests:
            engine.add_request(request)
        steps = 0
        _sync(self.device)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        _sync(self.device)
        return time.perf_counter() - t0, steps

    # --- sections ----------------------------------------------------------------------------------------
    def modes(self) -> None:
        """Batch 1 per mode: tokens/s (no observer) and every forward's cost (timed engine), round robin."""
        plain, timed = self._engine(1), self._engine(1, observer=(timer := _StepTimer(self.device)))
        walls = {m: [] for m in self.args.mode_list}
        if not self.args.quick:  # --quick: no warm-up, tokens/s from the timed run alone
            for mode in self.args.mode_list:  # warm-up (kernels, allocator)
                self._run(plain, [self._request(mode, warm_up=True)])
            for _ in range(self.args.runs):
                for mode in self.args.mode_list:
                    walls[mode].append(self._run(plain, [self._request(mode)])[0])
        costs = {}
        for mode in self.args.mode_list:
            timer.log.clear()
            wall = self._run(timed, [self._request(mode)])[0]
            walls[mode] = walls[mode] or [wall]
            costs[mode] = list(timer.log)
        rows, N = [], self.args.max_new_tokens
        for mode in self.args.mode_list:
            wall = statistics.median(walls[mode])
            log = costs[mode]
            rows.append({"mode": mode, "tokens_per_s": N / wall, "wall_s": wall,
                         "backbone_forwards": sum(k == "backbone" for k, *_ in log),
                         "mtp_forwards": sum(k.startswith("mtp") for k, *_ in log)})
        vanilla = next((r["tokens_per_s"] for r in rows if r["mode"] == "vanilla"), None)
        for r in rows:
            r["x_vanilla"] = r["tokens_per_s"] / vanilla if vanilla else None
        self.rows["modes"] = rows
        self.step_log = [entry for log in costs.values() for entry in log]

    def roofline(self) -> None:
        """Measured ms per backbone 1-token step and per MCTP module step vs bytes read / bandwidth."""
        if not hasattr(self, "step_log"):
            raise RuntimeError("no step timings (the modes section did not run)")
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        bw = self.args.bandwidth_gbs or bandwidth_gbs(name)
        c, b = self.counts, self._bytes
        per_layer = (c["backbone"] - c["embed"] - c["lm_head"]) / c["backbone_layers"]  # + the final norm, tiny
        context = 32 + self.args.max_new_tokens // 2  # mean cached length of the runs
        kinds = {
            # a backbone step reads every backbone layer, the lm_head and the backbone KV; the lm_head is timed apart
            "backbone step (1 token)": ("backbone", lambda k, q: k == "backbone" and q == 1,
                                        c["backbone_layers"] * per_layer * b + self.kv["backbone"] * context),
            "MCTP module step": ("mtp", lambda k, q: k.startswith("mtp") and "," not in k,
                                 c["per_mtp_module"] * b + self.kv["per_layer"] * context),
            "lm_head (whole vocabulary)": ("lm_head", lambda k, q: k == "lm_head", c["lm_head"] * b),
        }
        rows = []
        for label, (_, match, nbytes) in kinds.items():
            times = [t for k, rows_, q, t in self.step_log if match(k, q) and rows_ == 1]
            if not times:
                continue
            ms = statistics.median(times) * 1e3
            roof = nbytes / (bw * 1e9) * 1e3 if bw else None
            rows.append({"step": label, "ms": ms, "bytes_read_MB": nbytes / 1e6, "roofline_ms": roof,
                         "of_roofline": roof / ms if roof else None, "samples": len(times)})
        total = {r["step"]: r["ms"] for r in rows}
        if "backbone step (1 token)" in total and "MCTP module step" in total:
            lm = total.get("lm_head (whole vocabulary)", 0.0)
            self.mtp_ratio = (total["MCTP module step"] + lm) / (total["backbone step (1 token)"] + lm)
        self.device_info = {"name": name, "bandwidth_GBs": bw}
        self.rows["roofline"] = rows

    def batched(self) -> None:
        rows = []
        for streams in self.args.stream_list:
            engine = None
            try:
                engine = self._engine(streams)
                if not self.args.quick:
                    self._run(engine, [self._request("boost", i, warm_up=True) for i in range(streams)])  # warm-up
                wall, steps = self._run(engine, [self._request("boost", i) for i in range(streams)])
                pool = sum(k.numel() * k.element_size() * 2 for k in engine.kv.keys if k is not None)
                rows.append({"streams": streams, "tokens_per_s": streams * self.args.max_new_tokens / wall,
                             "ms_per_step": wall / steps * 1e3, "steps": steps, "kv_pool_MiB": pool / 2**20,
                             "status": "ok", **self._memory()})
            except torch.cuda.OutOfMemoryError as err:
                rows.append({"streams": streams, "status": "out of memory: " + str(err).splitlines()[0][:120]})
            finally:
                del engine
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        one = next((r["tokens_per_s"] for r in rows if r["streams"] == 1 and "tokens_per_s" in r), None)
        for r in rows:
            r["x_1_stream"] = r["tokens_per_s"] / one if one and "tokens_per_s" in r else None
        self.rows["batched"] = rows

    def encoder(self) -> None:
        from transformers import WhisperFeatureExtractor

        from pipeline.capacity import release_encoder_config
        from pipeline.encoder.speech_encoder import SpeechEncoder, tiny_encoder_config
        from pipeline.encoder.whisper_vq import WhisperVQEncoder
        from pipeline.sizes import encoder_shape

        config = release_encoder_config() if self.args.size == "7B" else tiny_encoder_config(**encoder_shape(self.args.size))
        torch.manual_seed(0)
        model = self._on_device(lambda: WhisperVQEncoder(config)).eval()
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160,
                                            chunk_length=30, n_fft=400)
        self.speech_encoder = SpeechEncoder(model, extractor)
        seconds = self.args.audio_seconds
        rng = np.random.default_rng(0)
        clips = [(0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32) for _ in range(8)]
        rows = []
        for label, batch in (("1 clip", clips[:1]), ("8 clips batched", clips)):
            with torch.inference_mode():
                if not self.args.quick:
                    self.speech_encoder.encode_waveforms(batch)  # warm-up
                times = []
                for _ in range(self.args.runs):
                    _sync(self.device)
                    t0 = time.perf_counter()
                    self.speech_encoder.encode_waveforms(batch)
                    _sync(self.device)
                    times.append(time.perf_counter() - t0)
            wall = statistics.median(times)
            rows.append({"stage": "encoder", "case": label, "audio_s": seconds * len(batch), "wall_s": wall,
                         "rtf": wall / (seconds * len(batch)), "params": sum(p.numel() for p in model.parameters())})
        self.rows.setdefault("rtf", []).extend(rows)

    def decoder(self) -> None:
        from pipeline.capacity import release_decoder_config
        from pipeline.decoder.flow import FlowModel
        from pipeline.decoder.hift import HiFTGenerator
        from pipeline.decoder.speech_decoder import SpeechDecoder
        from pipeline.decoder.tiny import decoder_config

        config = release_decoder_config() if self.args.size == "7B" else decoder_config(self.args.size)
        torch.manual_seed(0)
        flow = self._on_device(lambda: FlowModel(config.flow))
        hift = self._on_device(lambda: HiFTGenerator(config.hift))
        self.speech_decoder = SpeechDecoder(config, flow, hift, device=self.device, dtype=self.dtype)
        seconds = self.args.audio_seconds
        codes = [int(c) for c in np.random.default_rng(0).integers(0, config.flow.vocab_size, int(seconds * 12.5))]
        params = sum(p.numel() for p in flow.parameters()) + sum(p.numel() for p in hift.parameters())

        def whole():
            return self.speech_decoder.decode(codes)

        def streamed():
            stream, first = self.speech_decoder.stream(kind="incremental", n_steps=10, seed=42), None
            chunks = [codes[i: i + 25] for i in range(0, len(codes), 25)]
            t0 = time.perf_counter()
            for i, chunk in enumerate(chunks):
                stream.push(chunk, i == len(chunks) - 1)
                if first is None:
                    _sync(self.device)
                    first = time.perf_counter() - t0
            return first

        rows = []
        for label, fn in (("whole", whole), ("streamed, 25-code chunks", streamed)):
            if not self.args.quick:
                fn()  # warm-up
            times, firsts = [], []
            for _ in range(self.args.runs):
                _sync(self.device)
                t0 = time.perf_counter()
                first = fn()
                _sync(self.device)
                times.append(time.perf_counter() - t0)
                if isinstance(first, float):
                    firsts.append(first)
            wall = statistics.median(times)
            rows.append({"stage": "decoder", "case": label, "audio_s": seconds, "wall_s": wall, "rtf": wall / seconds,
                         "first_chunk_ms": statistics.median(firsts) * 1e3 if firsts else None, "params": params})
        self.rows.setdefault("rtf", []).extend(rows)

    def ttfa(self) -> None:
        """Audio in -> encoder ids -> engine until its first audio chunk -> decoder stream -> first PCM."""
        from pipeline.engine.requests import AudioChunkEvent, GenerationRequest
        from pipeline.tokens.layout import default_layout

        for needed in ("model", "speech_encoder", "speech_decoder"):
            if not hasattr(self, needed):
                raise RuntimeError(f"time to first audio needs the {needed.replace('speech_', '')} section")
        layout = default_layout(self.model)
        engine = self._engine(1)
        wave = (0.1 * np.random.default_rng(1).standard_normal(16000 * 3)).astype(np.float32)
        rows = []
        warm_up = 0 if self.args.quick else 1
        for run in range(self.args.runs + warm_up):  # the first is a warm-up (not with --quick)
            _sync(self.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                codes = self.speech_encoder.encode_waveforms([wave])[0]
            _sync(self.device)
            t_enc = time.perf_counter()
            prompt = ([layout.im_start] + list(range(200, 210)) + [layout.boa]
                      + [layout.audio_offset + c for c in codes] + [layout.eoa, layout.im_end, layout.im_start]
                      + list(range(210, 213)))
            request = GenerationRequest(prompt_ids=prompt, mode="boost", max_new_tokens=self.args.max_new_tokens + 64,
                                        stop_ids=[], constraint="interleaved")
            first_chunk = None
            with torch.inference_mode():
                events = engine.stream(request)
                for event in events:
                    if isinstance(event, AudioChunkEvent):
                        first_chunk = event.codes
                        break
                events.close()
            engine.abort(request.request_id)
            while engine.has_unfinished():
                engine.step()
            _sync(self.device)
            t_llm = time.perf_counter()
            if first_chunk is None:
                raise RuntimeError("the engine produced no audio chunk")
            with torch.inference_mode():
                stream = self.speech_decoder.stream(kind="incremental", n_steps=10, seed=42)
                pcm = stream.push(first_chunk, True)
            _sync(self.device)
            t_pcm = time.perf_counter()
            if run >= warm_up:
                rows.append({"encoder_ms": (t_enc - t0) * 1e3, "llm_first_chunk_ms": (t_llm - t_enc) * 1e3,
                             "decoder_first_pcm_ms": (t_pcm - t_llm) * 1e3, "ttfa_ms": (t_pcm - t0) * 1e3,
                             "first_chunk_codes": len(first_chunk), "first_pcm_samples": int(len(pcm)),
                             "prompt_tokens": len(prompt)})
        keys = [k for k in rows[0]]
        self.rows["ttfa"] = [{k: statistics.median(r[k] for r in rows) for k in keys} | {"runs": len(rows)}]


def run(args: argparse.Namespace) -> dict:
    check_args(args)
    bench = _Bench(args)
    if bench.device.type == "cpu":
        torch.set_num_threads(1)  # a CPU dry run shares its cores; one thread stalls least
    bench.section("build llm", bench.build_llm)
    if hasattr(bench, "model"):
        bench.section("modes", bench.modes)
        bench.section("roofline", bench.roofline)
        bench.section("batched", bench.batched)
    bench.section("encoder", bench.encoder)
    bench.section("decoder", bench.decoder)
    bench.section("ttfa", bench.ttfa)
    device = getattr(bench, "device_info", None) or {
        "name": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
        "bandwidth_GBs": args.bandwidth_gbs}
    results = {"device": device, "size": args.size, "dtype": args.dtype, "quick": args.quick,
               "max_new_tokens": args.max_new_tokens, "runs": args.runs, "audio_seconds": args.audio_seconds,
               "wall_s": time.perf_counter() - bench.start, "sections": bench.rows, "errors": bench.errors,
               "mtp_step_share": getattr(bench, "mtp_ratio", None)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plotted = _plot(bench.rows, out / "gpu.png")
    write_report("gpu", results, _markdown(results, plotted), out)
    print(f"[bench gpu] wrote {out / 'gpu.json'}, gpu.md" + (", gpu.png" if plotted else ""), flush=True)
    return results


def _markdown(results: dict, plotted: bool) -> str:
    dev = results["device"]
    bw = f"{dev['bandwidth_GBs']:g} GB/s" if dev.get("bandwidth_GBs") else "unknown bandwidth (no roofline)"
    parts = [f"Device: **{dev['name']}** ({bw}); sizes `{results['size']}`, {results['dtype']}, random weights built "
             f"on the device; {results['max_new_tokens']} new tokens per request, median of {results['runs']} "
             f"round(s); {results['wall_s']:.0f} s in all.\n"]
    titles = {"build": "Build", "modes": "Tokens/s per MCTP mode (batch 1, greedy, no EOS)",
              "roofline": "Step cost vs roofline (bytes read / bandwidth)",
              "batched": "Batched engine (Boost)", "rtf": "Encoder and decoder real-time factor (wall / audio)",
              "ttfa": "Time to first audio (encoder -> engine -> decoder stream, one process, one device)"}
    for key, title in titles.items():
        if key in results["sections"]:
            parts.append(f"## {title}\n\n" + markdown_table(results["sections"][key]))
    if results.get("mtp_step_share"):
        parts.append(f"An MCTP step (module + lm_head) costs {results['mtp_step_share']:.1%} of a backbone step "
                     "(+ lm_head); the paper quotes 11 %.\n")
    parts.append("## Errors and skipped sections\n\n" + (markdown_table(results["errors"]) if results["errors"]
                                                          else "none\n"))
    if plotted:
        parts.append("\n![gpu](gpu.png)\n")
    return "\n".join(parts)


def _plot(rows: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    modes = rows.get("modes", [])
    a.bar([r["mode"] for r in modes], [r["tokens_per_s"] for r in modes], color="tab:blue")
    a.set_title("tokens/s per mode (batch 1)")
    batched = [r for r in rows.get("batched", []) if "tokens_per_s" in r]
    b.plot([r["streams"] for r in batched], [r["tokens_per_s"] for r in batched], "o-", color="tab:orange")
    b.set_xscale("log", base=2)
    b.set_title("aggregate tokens/s vs streams (Boost)")
    b.set_xlabel("concurrent streams")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
