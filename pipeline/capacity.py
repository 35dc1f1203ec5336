"""Capacity arithmetic from configs alone: parameters, weight bytes, KV cache bytes and working memory per
stage, and a placement of the three stages on a set of equal GPUs (`vita-audio plan`).

Nothing here reads a weight: the models are built on the meta device (shapes only), so the released 7B's
numbers come out in seconds on any machine. Working memory is measured the same way: a stage's forward
runs on meta tensors under `PeakMemory`, a dispatch mode that adds up the bytes of every tensor alive at
once (eager PyTorch's allocation, `scaled_dot_product_attention` counted as the GPU's fused kernels allocate:
its output only; the flow encoder's own relative-position attention keeps its scores).

The KV arithmetic is the engine's (`pipeline.engine.kv_cache.KVPool`): one [1, slots, kv_heads, capacity,
head_dim] K and V per backbone layer and one [N, ...] pair for the N MCTP modules (each module caches the
whole history), so per token and stream:

    2 (K, V) x kv_heads x head_dim x (backbone layers + MCTP modules) x bytes of the serving dtype

(tests/test_plan.py checks this against what the engine's pool allocates). Torch only, no Ray.
"""
from __future__ import annotations

import contextlib
import json
import re
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["DTYPES", "DEFAULT_CONTEXT", "MEMORY_UTILIZATION", "PeakMemory", "ModelConfigs", "StageMemory",
           "Placement", "PlanError", "parse_bytes", "format_bytes", "release_llm_config", "release_encoder_config",
           "release_decoder_config", "size_configs", "configs_from_models_dir", "llm_counts", "encoder_params",
           "decoder_params", "kv_bytes_per_token", "stage_memory", "plan", "engine_batch_size"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CONTEXT = 4096  # tokens per stream (prompt + output) the plan and the LLM stage size the KV cache for
MEMORY_UTILIZATION = 0.90  # share of a GPU's memory the plan hands out (the rest: CUDA context, allocator slack)
ENCODER_BATCH = 8  # 30 s windows per encoder forward (actors.config.EncoderStageConfig.max_batch_size)
DECODER_BATCH = 8  # streams' chunks per decoder forward (DecoderStageConfig.max_batch_size)
DECODER_CHUNK_TOKENS = 50  # audio codes per decoder chunk the working memory is measured at (4 s of audio)
ENCODER_FRACTION = 0.25  # GPU share of an encoder replica on a shared GPU
DECODER_FRACTION = 0.25  # GPU share of a decoder replica on a shared GPU
LLM_BATCH = 16  # requests per engine step (LLMStageConfig.max_batch_size): logits and prefill are sized for it
PREFILL_TOKENS = 2048  # longest prompt one engine step prefills at once, for the LLM's working memory
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


class PlanError(ValueError):
    """The GPUs given cannot hold a stage; the message names the stage and the shortfall."""


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
    """'80GB', '80GiB', '12 GB', '40960MB' -> bytes. GB counts 2**30 bytes, as GPU makers label cards."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"{flag} must be a size like 80GB or 40960MB, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{flag} must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------------------------
# configs


def release_llm_config():
    """The released VITA-Audio 7B with 10 MCTP modules (spec §1.1, `config_7B_mtp10.json`)."""
    return _llm_config(3584, 18944, 28, 10, 28, 4, vocab_size=168072)


def _llm_config(hidden, intermediate, backbone, modules, heads, kv_heads, vocab_size):
    """A Qwen2-MTP config; ids in the release's order (the 7B's own, else `pipeline.sizes.build_llm`'s layout:
    the codebook + 3 padding rows at the end of the vocabulary, the specials before them)."""
    from pipeline.llm import Qwen2MTPConfig
    from pipeline.sizes import CODEBOOK_SIZE, RELEASE_VOCAB_SIZE

    if vocab_size == RELEASE_VOCAB_SIZE:
        ids = dict(speech_token_offset=151685, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    else:
        offset = vocab_size - (CODEBOOK_SIZE + 3)
        ids = dict(speech_token_offset=offset, bos_token_id=offset - 42, eos_token_id=offset - 40,
                   pad_token_id=offset - 42)
    return Qwen2MTPConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=backbone + modules, num_nextn_predict_layers=modules, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, **ids)


def release_encoder_config():
    """glm-4-voice-tokenizer (spec §4.2): Whisper-large-v3 widths, 16 layers before the quantizer."""
    from pipeline.encoder.speech_encoder import tiny_encoder_config

    return tiny_encoder_config(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32,
                               decoder_attention_heads=20, decoder_ffn_dim=5120, decoder_layers=32,
                               quantize_position=16, pooling_position=16)


def release_decoder_config():
    """glm-4-voice-decoder (spec §5): the configs' defaults."""
    from pipeline.decoder.config import DecoderConfig

    return DecoderConfig()


@dataclass
class ModelConfigs:
    llm: object  # Qwen2MTPConfig
    encoder: object  # WhisperVQConfig
    decoder: object  # DecoderConfig
    source: str  # "size 7B" or the models folder


def size_configs(size: str) -> ModelConfigs:
    """The configs of a named size (pipeline.sizes: tiny, bench, 7B; 7B is the release)."""
    from pipeline.sizes import LLM_SIZES, encoder_shape, llm_size

    if size == "7B":
        return ModelConfigs(release_llm_config(), release_encoder_config(), release_decoder_config(), "size 7B")
    if size not in ("tiny", "bench"):
        raise ValueError(f"--size must be one of tiny, bench, 7B, got {size!r}")
    from pipeline.decoder.tiny import decoder_config
    from pipeline.encoder.speech_encoder import tiny_encoder_config

    s = llm_size(size) if size in LLM_SIZES else None
    llm = _llm_config(s.hidden_size, s.intermediate_size, s.backbone_layers, s.mtp_modules, s.num_attention_heads,
                      s.num_key_value_heads, vocab_size=69632)  # pipeline.sizes.build_llm's vocabulary
    return ModelConfigs(llm, tiny_encoder_config(**encoder_shape(size)), decoder_config(size), f"size {size}")


def configs_from_models_dir(root) -> ModelConfigs:
    """llm/config.json, encoder/config.json, decoder/config.yaml of a models folder (no weights read)."""
    from transformers import AutoConfig

    from pipeline.decoder.config import load_decoder_config
    from pipeline.encoder.whisper_vq import WhisperVQConfig
    from pipeline.llm import Qwen2MTPConfig

    root = Path(root)
    paths = {"llm": root / "llm" / "config.json", "encoder": root / "encoder" / "config.json",
             "decoder": root / "decoder" / "config.yaml"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--models {str(root)!r} lacks {', '.join(missing)}")
    llm = AutoConfig.from_pretrained(str(root / "llm"))
    if llm.model_type == "qwen2":
        llm = Qwen2MTPConfig(**{**llm.to_dict(), "num_nextn_predict_layers": 0, "model_type": "qwen2_mtp"})
    encoder = WhisperVQConfig.from_dict(json.loads(paths["encoder"].read_text()))
    return ModelConfigs(llm, encoder, load_decoder_config(paths["decoder"]), str(root))


# ------------------------------------------------------------------------------------------------------------
# parameter counts (meta device)


def _meta_llm(config):
    from pipeline.llm import Qwen2MTPForCausalLM

    with torch.device("meta"):
        return Qwen2MTPForCausalLM(config)


def _meta_encoder(config):
    from pipeline.encoder.whisper_vq import WhisperVQEncoder

    with torch.device("meta"):
        return WhisperVQEncoder(config).eval()


def _meta_decoder(config):
    from pipeline.decoder.flow import FlowModel
    from pipeline.decoder.hift import HiFTGenerator

    with torch.device("meta"):
        flow, hift = FlowModel(config.flow).eval(), HiFTGenerator(config.hift).eval()
    return flow, hift.to("meta")  # buffers made from numpy stay on CPU without the move


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def llm_counts(config) -> dict:
    """Parameters of the LLM: total, backbone (layers + embeddings + norm + lm_head), per MCTP module, modules."""
    model = _meta_llm(config)
    n = model.num_mtp_modules
    first = model.num_backbone_layers
    per_module = [_numel(model.model.layers[first + k]) + _numel(model.mtp_projs[k])
                  + _numel(model.mtp_embed_norms[k]) + _numel(model.mtp_hidden_norms[k]) for k in range(n)]
    total = _numel(model)
    return {"total": total, "mtp_modules": n, "per_mtp_module": per_module[0] if per_module else 0,
            "mtp_total": sum(per_module), "backbone": total - sum(per_module),
            "embed": model.model.embed_tokens.weight.numel(), "lm_head": model.lm_head.weight.numel(),
            "backbone_layers": first}


def encoder_params(config) -> int:
    return _numel(_meta_encoder(config))


def decoder_params(config) -> dict:
    flow, hift = _meta_decoder(config)
    return {"flow": _numel(flow), "hift": _numel(hift), "total": _numel(flow) + _numel(hift)}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(config, dtype: torch.dtype = torch.bfloat16) -> dict:
    """KV cache bytes one token of one stream takes: backbone layers, MCTP modules, total."""
    per_layer = 2 * config.num_key_value_heads * _head_dim(config) * torch.empty((), dtype=dtype).element_size()
    modules = config.num_nextn_predict_layers
    backbone = config.num_hidden_layers - modules
    return {"backbone": backbone * per_layer, "mtp": modules * per_layer, "total": (backbone + modules) * per_layer,
            "per_layer": per_layer}


# ------------------------------------------------------------------------------------------------------------
# working memory (meta device)


class PeakMemory:
    """Context manager: the most bytes of tensors alive at once while it is active (meta or real tensors).

    Counts every new tensor an op returns (views and in-place results share storage and are skipped) and
    forgets it when Python frees it, as eager PyTorch's caching allocator sees the forward."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        peak = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                peak._track(out, args)
                return out

        self.live = self.peak = 0
        self._mode = _Mode()

    def _track(self, out, args) -> None:
        from torch.utils._pytree import tree_flatten

        inputs = {id(a) for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in inputs or t._is_view():
                continue
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@contextlib.contextmanager
def fused_attention():
    """While tracing on meta: `F.scaled_dot_product_attention` as the GPU's fused kernels (flash / memory-efficient)
    allocate, its output only, instead of the math path's [heads, T, T] scores and their softmax."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def fused(query, key, value, *args, **kwargs):
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def encoder_work_bytes(config, dtype: torch.dtype, windows: int = 1) -> int:
    """Peak activation bytes of one encoder forward over `windows` 30 s windows (features and the block-causal
    mask included; attention fused, as on a GPU)."""
    model = _meta_encoder(config).to(dtype)
    frames = model.frame_stride * config.max_source_positions  # 30 s at 100 Hz: 3000 feature frames
    with torch.no_grad(), fused_attention(), PeakMemory() as peak:
        features = torch.empty(windows, config.num_mel_bins, frames, device="meta", dtype=dtype)
        mask = torch.ones(windows, frames, device="meta", dtype=torch.long)
        model(features, mask)
    return peak.peak


def decoder_work_bytes(config, dtype: torch.dtype, tokens: int = DECODER_CHUNK_TOKENS, batch: int = 1) -> int:
    """Peak activation bytes of decoding `batch` chunks of `tokens` codes in one call (flow, one ODE step, then
    HiFT). The ODE steps run one after the other and free their tensors, so one step's peak is every step's."""
    from pipeline.decoder.flow import frames_for_tokens

    flow, hift = _meta_decoder(config)
    flow, hift = flow.to(dtype), hift.to(dtype)
    frames = frames_for_tokens(tokens, config.flow.input_frame_rate)
    with torch.no_grad(), fused_attention(), PeakMemory() as flow_peak:
        ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
        noise = torch.empty(batch, config.flow.output_size, frames, device="meta", dtype=dtype)
        mel = flow(ids, noise, None, 1)
    samples = config.hift.samples_per_frame * frames
    # torch.istft checks its input's values (no meta kernel): the meta copy returns the waveform's shape instead
    hift._istft = lambda magnitude, phase: magnitude.new_empty(magnitude.shape[0], samples)  # noqa: E731
    with torch.no_grad(), PeakMemory() as hift_peak:
        source = torch.empty(batch, 1, config.hift.samples_per_frame * frames, device="meta", dtype=dtype)
        hift.synthesize(mel, source)
    return max(flow_peak.peak, hift_peak.peak)


def llm_work_bytes(config, dtype: torch.dtype, batch: int = LLM_BATCH, prefill: int = PREFILL_TOKENS) -> int:
    """Working memory of one engine step beside the weights and the KV pool (analytic, eager bound).

    The larger of a prefill of `prefill` tokens (hidden states, q/k/v, SwiGLU's three [T, intermediate]
    tensors; attention fused) and a decode step of `batch` rows (the same per row, plus float32 logits over
    the whole vocabulary and their softmax)."""
    b = torch.empty((), dtype=dtype).element_size()
    H, I = config.hidden_size, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * _head_dim(config)
    per_row = (4 * H + qkv + 3 * I) * b
    logits = 2 * 4 * config.vocab_size
    return max(prefill * per_row + logits, batch * (per_row + logits))


# ------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class StageMemory:
    stage: str
    params: int
    dtype: str
    weight_bytes: int
    work_bytes: int  # working memory of one forward at the stage's batch
    work_bytes_per_stream: int  # ... per concurrent stream (window, chunk, request)
    batch: int  # streams per forward the working memory is sized for
    kv_bytes_per_token: int = 0  # the LLM only
    kv_bytes_per_stream: int = 0  # at the plan's context
    detail: dict = field(default_factory=dict)

    def need(self, streams: int | None = None) -> int:
        """Bytes one replica needs: weights, working memory, and the KV of `streams` streams (LLM)."""
        return self.weight_bytes + self.work_bytes + (streams or 0) * self.kv_bytes_per_stream


def stage_memory(configs: ModelConfigs, dtype: torch.dtype = torch.bfloat16, context: int = DEFAULT_CONTEXT,
                 llm_batch: int = LLM_BATCH) -> dict[str, StageMemory]:
    size = torch.empty((), dtype=dtype).element_size()
    name = str(dtype).removeprefix("torch.")
    counts = llm_counts(configs.llm)
    kv = kv_bytes_per_token(configs.llm, dtype)
    llm_work = llm_work_bytes(configs.llm, dtype, llm_batch)
    llm = StageMemory("llm", counts["total"], name, counts["total"] * size, llm_work, llm_work // llm_batch,
                      llm_batch, kv["total"], kv["total"] * context,
                      detail={**counts, "kv_backbone_bytes_per_token": kv["backbone"],
                              "kv_mtp_bytes_per_token": kv["mtp"], "context": context})
    # measured at the stage's batch: some tensors are per forward, not per stream (the VQ's float32 codebook)
    enc_params = encoder_params(configs.encoder)
    enc_work = encoder_work_bytes(configs.encoder, dtype, ENCODER_BATCH)
    encoder = StageMemory("encoder", enc_params, name, enc_params * size, enc_work, enc_work // ENCODER_BATCH,
                          ENCODER_BATCH, detail={"per": "30 s window"})
    dec_params = decoder_params(configs.decoder)
    dec_work = decoder_work_bytes(configs.decoder, dtype, batch=DECODER_BATCH)
    decoder = StageMemory("decoder", dec_params["total"], name, dec_params["total"] * size, dec_work,
                          dec_work // DECODER_BATCH, DECODER_BATCH,
                          detail={**dec_params, "per": f"{DECODER_CHUNK_TOKENS}-code chunk"})
    return {"encoder": encoder, "llm": llm, "decoder": decoder}


@dataclass
class Placement:
    gpus: int
    gpu_bytes: int
    usable_bytes: int  # per GPU, at MEMORY_UTILIZATION
    context: int
    replicas: dict  # stage -> replicas
    num_gpus: dict  # stage -> GPU share of one replica
    streams_per_llm_replica: int
    llm_kv_bytes: int  # KV pool of one LLM replica at that many streams
    shared_gpus: int  # GPUs holding encoder + decoder replicas (0: they share the LLM's GPU)
    stages: dict  # stage -> StageMemory as a dict
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def total_streams(self) -> int:
        return self.streams_per_llm_replica * self.replicas["llm"]


def plan(configs: ModelConfigs, gpus: int, gpu_bytes: int, context: int = DEFAULT_CONTEXT,
         dtype: torch.dtype = torch.bfloat16, llm_batch: int = LLM_BATCH) -> Placement:
    """Replicas and GPU shares per stage for `gpus` GPUs of `gpu_bytes` each; PlanError if a stage cannot fit.

    One GPU: the LLM takes half of it, the encoder and the decoder a quarter each (Ray's fractional GPUs);
    the LLM's KV pool gets what the other two leave. Several GPUs: one GPU in eight (at least one) holds the
    encoder and decoder replicas side by side (a quarter each: one encoder, three decoders), every other GPU
    one LLM replica (no tensor parallelism: the 7B fits one 80 GB card with room for its KV cache)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    mem = stage_memory(configs, dtype, context, llm_batch)
    usable = int(gpu_bytes * MEMORY_UTILIZATION)
    enc, llm, dec = mem["encoder"], mem["llm"], mem["decoder"]
    notes = [f"{MEMORY_UTILIZATION:.0%} of each GPU's {format_bytes(gpu_bytes)} is planned "
             f"({format_bytes(usable)}); the rest is left to the CUDA context and the allocator"]
    # a stage that cannot fit a whole GPU on its own is refused first, LLM first (it is the big one)
    for stage in (llm, enc, dec):
        need = stage.need(1 if stage is llm else None)
        if need > usable:
            what = "weights, working memory and one stream's KV cache" if stage is llm else "weights and working memory"
            raise PlanError(
                f"the {stage.stage.upper() if stage is llm else stage.stage} stage does not fit one GPU: its {what} "
                f"need {format_bytes(need)} ({stage.params / 1e9:.2f} B parameters in {stage.dtype}: "
                f"{format_bytes(stage.weight_bytes)}), a {format_bytes(gpu_bytes)} GPU gives {format_bytes(usable)} "
                f"at {MEMORY_UTILIZATION:.0%}: short by {format_bytes(need - usable)}")
    if gpus == 1:
        shares = {"encoder": ENCODER_FRACTION, "decoder": DECODER_FRACTION,
                  "llm": 1.0 - ENCODER_FRACTION - DECODER_FRACTION}
        replicas = {"encoder": 1, "llm": 1, "decoder": 1}
        free = usable - enc.need() - dec.need() - llm.need()
        shared_gpus = 0
        if free < llm.kv_bytes_per_stream:
            raise PlanError(
                f"the LLM stage does not fit one GPU beside the encoder and the decoder: weights and working memory of "
                f"the three stages plus one stream's KV cache need "
                f"{format_bytes(enc.need() + dec.need() + llm.need(1))}, the GPU gives {format_bytes(usable)}: short by "
                f"{format_bytes(llm.kv_bytes_per_stream - free)} (use a second GPU)")
        notes.append("encoder and decoder share the LLM's GPU (Ray GPU shares 0.25 + 0.25 + 0.5; memory is "
                     "checked, not the shares)")
    else:
        shared_gpus = max(1, round(gpus / 8))
        per_shared = 1 + round((1 - ENCODER_FRACTION) / DECODER_FRACTION)  # 1 encoder + 3 decoders
        for stage, fraction in ((enc, ENCODER_FRACTION), (dec, DECODER_FRACTION)):
            if stage.need() > usable * fraction:
                notes.append(f"{stage.stage}: {format_bytes(stage.need())} is more than its {fraction:g} GPU share "
                             f"({format_bytes(usable * fraction)}); the shared GPU still holds its replicas")
        if enc.need() + (per_shared - 1) * dec.need() > usable:
            raise PlanError(f"the decoder stage does not fit: one encoder and {per_shared - 1} decoder replicas need "
                            f"{format_bytes(enc.need() + (per_shared - 1) * dec.need())} on one GPU, "
                            f"{format_bytes(usable)} available")
        shares = {"encoder": ENCODER_FRACTION, "decoder": DECODER_FRACTION, "llm": 1.0}
        replicas = {"encoder": shared_gpus, "llm": gpus - shared_gpus, "decoder": shared_gpus * (per_shared - 1)}
        free = usable - llm.need()
        notes.append(f"{shared_gpus} GPU(s) hold the encoder and decoder replicas (one encoder + "
                     f"{per_shared - 1} decoders each, GPU share {ENCODER_FRACTION:g} per replica); "
                     f"{gpus - shared_gpus} GPU(s) one LLM replica each")
    streams = int(free // llm.kv_bytes_per_stream)
    notes.append(f"streams per LLM replica: KV left after weights and working memory "
                 f"({format_bytes(free)}) / {format_bytes(llm.kv_bytes_per_stream)} per stream at {context} tokens")
    return Placement(gpus, gpu_bytes, usable, context, replicas, shares, streams, streams * llm.kv_bytes_per_stream,
                     shared_gpus, {k: asdict(v) for k, v in mem.items()}, notes)


def serve_config(placement: Placement, models: str | None = None) -> dict:
    """The Serve config (serve/config.yaml's shape; serve.app.Args under `args`) of a placement."""
    def scaling(stage: str, ongoing: int, queued: int) -> dict:
        n = placement.replicas[stage]
        return {"num_gpus": placement.num_gpus[stage], "min_replicas": 1, "max_replicas": n,
                "target_ongoing_requests": max(1, ongoing // 2), "upscale_delay_s": 10, "downscale_delay_s": 300,
                "max_ongoing_requests": ongoing, "max_queued_requests": queued}

    streams = max(placement.streams_per_llm_replica, 1)
    llm = scaling("llm", streams, 2 * streams)
    encoder = scaling("encoder", 4 * ENCODER_BATCH, 8 * ENCODER_BATCH)
    decoder = scaling("decoder", 8 * DECODER_BATCH, 16 * DECODER_BATCH)
    caps = sum(s["max_ongoing_requests"] + s["max_queued_requests"] for s in (llm,)) * placement.replicas["llm"]
    args = {"models": models, "max_text_chars": 4096, "max_tokens": min(2048, placement.context),
            "max_audio_seconds": 60, "max_concurrent_requests": max(256, caps), "max_waiting_requests": 64,
            "retry_after_s": 1, "encoder": encoder, "llm": llm, "decoder": decoder}
    return {"applications": [{"name": "vita", "route_prefix": "/", "import_path": "serve.app:build_app",
                              "args": args}]}


def engine_batch_size(model, requested: int, device, dtype: torch.dtype, context: int = DEFAULT_CONTEXT) -> int:
    """The LLM stage's batch size at start-up: `requested`, capped on a CUDA device by the streams whose KV cache
    (`kv_bytes_per_token` x `context`) fits the memory free after loading (at MEMORY_UTILIZATION, less the
    engine's working memory). RuntimeError naming the shortfall if not even one stream fits."""
    device = torch.device(device)
    if device.type != "cuda":
        return requested
    config = model.config
    free, total = torch.cuda.mem_get_info(device)
    budget = free - (1 - MEMORY_UTILIZATION) * total - llm_work_bytes(config, dtype, requested)
    per_stream = kv_bytes_per_token(config, dtype)["total"] * context
    fit = int(budget // per_stream)
    if fit < 1:
        raise RuntimeError(f"LLM stage: {format_bytes(free)} free on {device} after loading; one stream's KV cache "
                           f"at {context} tokens needs {format_bytes(per_stream)}: short by "
                           f"{format_bytes(per_stream - budget)}")
    return max(1, min(requested, fit))
