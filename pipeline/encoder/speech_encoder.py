"""GLM-4-Voice speech encoder (its "speech tokenizer"): 16 kHz speech -> 12.5 Hz audio codes (spec §4).

Data path, for one 30 s window of a clip:

    waveform (L,) --WhisperFeatureExtractor--> log-mel (128, T_f) at 100 Hz
      -> causal conv1 (k3) + GELU -> causal conv2 (k3, stride 2) + GELU  -> (T_f/2, D) at 50 Hz
      -> + embed_positions -> `quantize_position` Whisper encoder layers (pre-LN), block-causal mask
         (a frame sees its own 200-frame block and everything before it, never padding)
      -> average pooling by 4 after layer `pooling_position`               -> (T_f/8, D) at 12.5 Hz
      -> nearest codebook vector (squared L2) after layer `quantize_position` -> ids (T_f/8,)

The model (config and modules, up to the quantizer) is `pipeline.encoder.whisper_vq`; the
features are transformers' `WhisperFeatureExtractor` configured from the checkpoint folder. `SpeechEncoder` adds what the
original `extract_speech_token` does around the model (30 s windows, padding to a multiple of one
token, keeping the valid tokens) and batches clips of different lengths in one forward with
results identical to tokenizing them one by one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import save_file
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import sinusoids

from pipeline.audio import AudioError, load_audio
from pipeline.encoder.whisper_vq import (
    WhisperVQConfig,
    WhisperVQEncoder,
)

__all__ = [
    "SpeechEncoder",
    "load_encoder",
    "write_tiny_encoder",
    "write_random_encoder",
    "tiny_encoder_config",
]

# generic PreTrainedConfig fields that transformers 5 adds to to_dict() but the released config.json lacks
_NOT_IN_RELEASED_CONFIG = {
    "dtype", "_name_or_path", "chunk_size_feed_forward", "id2label", "label2id", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "suppress_tokens", "tie_word_embeddings",
}
TRAINING_ONLY_KEYS = ("ema_count", "ema_weight")  # EMA codebook statistics: in the release, unused here
KEY_PREFIXES = ("model.encoder.", "encoder.", "model.")  # tolerated in front of every key


# ---------------------------------------------------------------------------------------------
# the speech encoder: waveform(s) -> audio codes


class SpeechEncoder:
    """WhisperFeatureExtractor + WhisperVQEncoder: audio (path, bytes or array) -> list of audio ids.

    One clip is cut into `chunk_length` (30 s) windows; each clip's windows go through the feature
    extractor together, padded to the clip's longest window and to a multiple of one token (1280
    samples), exactly as the original `extract_speech_token` does per file. Windows of many clips
    then share one forward (in groups of `max_batch_windows`), which gives the same ids as
    tokenizing each clip alone.
    """

    def __init__(
        self,
        model: WhisperVQEncoder,
        feature_extractor: WhisperFeatureExtractor,
        *,
        channel: int | None = 0,
        max_seconds: float | None = 600.0,
        max_batch_windows: int = 128,
    ):
        if feature_extractor.feature_size != model.config.num_mel_bins:
            raise ValueError(
                f"feature extractor has {feature_extractor.feature_size} mel bins, "
                f"the encoder expects {model.config.num_mel_bins}"
            )
        if max_batch_windows < 1:
            raise ValueError(f"max_batch_windows must be >= 1, got {max_batch_windows}")
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.channel = channel
        self.max_seconds = max_seconds
        self.max_batch_windows = max_batch_windows
        self.sample_rate: int = int(feature_extractor.sampling_rate)
        self.samples_per_token: int = model.token_stride * feature_extractor.hop_length  # 1280
        self.tokens_per_second: float = self.sample_rate / self.samples_per_token  # 12.5
        self.window_samples: int = int(feature_extractor.n_samples)  # 30 s

    @property
    def codebook_size(self) -> int:
        return self.model.config.quantize_vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.codebook.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.codebook.weight.dtype

    def load(self, audio, sample_rate: int | None = None) -> np.ndarray:
        """Any accepted audio source -> float32 mono at `sample_rate` (16 kHz)."""
        return load_audio(audio, sample_rate, target_sample_rate=self.sample_rate, channel=self.channel,
                          max_seconds=self.max_seconds)

    def encode(self, audio, sample_rate: int | None = None) -> list[int]:
        """One clip (path, encoded bytes, or array with its sample_rate) -> its audio ids (12.5 per second)."""
        return self.encode_batch([audio], [sample_rate])[0]

    def encode_batch(self, audios: list, sample_rates: list[int | None] | None = None) -> list[list[int]]:
        """Several clips of any lengths -> one id list per clip, equal to calling `encode` on each."""
        if not isinstance(audios, (list, tuple)):
            raise ValueError(f"audios must be a list of clips, got {type(audios).__name__}")
        if sample_rates is None:
            sample_rates = [None] * len(audios)
        if len(sample_rates) != len(audios):
            raise ValueError(f"sample_rates has {len(sample_rates)} entries for {len(audios)} audios")
        waveforms = []
        for i, (audio, rate) in enumerate(zip(audios, sample_rates)):
            try:
                waveforms.append(self.load(audio, rate))
            except AudioError as err:
                raise (err.prefixed(f"audios[{i}]") if len(audios) > 1 else err) from None
        return self.encode_waveforms(waveforms)

    def features(self, waveform: np.ndarray) -> dict[str, torch.Tensor]:
        """One 16 kHz clip -> its windows' model inputs: input_features (W, n_mels, T_f), attention_mask (W, T_f)."""
        windows = [waveform[start : start + self.window_samples]
                   for start in range(0, len(waveform), self.window_samples)]
        batch = self.feature_extractor(
            windows, sampling_rate=self.sample_rate, return_attention_mask=True, return_tensors="pt",
            padding="longest", pad_to_multiple_of=self.samples_per_token,
            device=str(self.device) if self.device.type == "cuda" else "cpu",
        )
        return {"input_features": batch["input_features"], "attention_mask": batch["attention_mask"]}

    @torch.inference_mode()
    def encode_waveforms(self, waveforms: list[np.ndarray]) -> list[list[int]]:
        """16 kHz mono float32 clips -> id lists; all windows of all clips batched by length."""
        windows = []  # (clip index, window index, features (n_mels, T_f), mask (T_f,))
        for clip, waveform in enumerate(waveforms):
            if waveform.ndim != 1 or waveform.size == 0:
                raise AudioError(f"waveform {clip} must be a non-empty 1-D array, got shape {waveform.shape}")
            inputs = self.features(waveform)
            for w in range(inputs["input_features"].shape[0]):
                windows.append((clip, w, inputs["input_features"][w], inputs["attention_mask"][w]))
        ids_per_window = {}
        windows.sort(key=lambda item: -item[2].shape[-1])  # longest first: little padding per forward
        for start in range(0, len(windows), self.max_batch_windows):
            group = windows[start : start + self.max_batch_windows]
            out = self.model(**self._collate(group))
            ids = out.token_ids.cpu()
            keep = out.token_mask.cpu()
            for row, (clip, w, _, _) in enumerate(group):
                ids_per_window[clip, w] = ids[row][keep[row]].tolist()
        tokens: list[list[int]] = [[] for _ in waveforms]
        for clip, w in sorted(ids_per_window):
            tokens[clip].extend(ids_per_window[clip, w])
        return tokens

    def _collate(self, group: list) -> dict[str, torch.Tensor]:
        """Pad windows to the longest along time with zero features (see WhisperVQEncoder.forward)."""
        T = max(item[2].shape[-1] for item in group)
        n_mels = group[0][2].shape[0]
        features = torch.zeros(len(group), n_mels, T)
        mask = torch.zeros(len(group), T, dtype=torch.long)
        for row, (_, _, feats, frame_mask) in enumerate(group):
            features[row, :, : feats.shape[-1]] = feats
            mask[row, : frame_mask.shape[-1]] = frame_mask
        return {
            "input_features": features.to(self.device, self.dtype),
            "attention_mask": mask.to(self.device),
        }


# ---------------------------------------------------------------------------------------------
# loading the released folder


def load_encoder(path, device="cpu", dtype=None, **tokenizer_kwargs) -> SpeechEncoder:
    """glm-4-voice-tokenizer folder (config.json, weights, preprocessor_config.json) -> SpeechEncoder.

    Weights: model.safetensors or pytorch_model.bin, single or sharded with an index (pipeline.checkpoints).

    Keys may carry a `model.encoder.`/`encoder.`/`model.` prefix; the EMA buffers and any layers
    after the quantizer (or a final layer_norm / decoder, in a full WhisperVQ checkpoint) are
    ignored, as the original `load_quantize_encoder` does. Everything else must match exactly.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"encoder path {str(path)!r} is not a folder")
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"encoder folder {folder} has no {name}")
    from pipeline.checkpoints import load_state_dict, weight_files

    weight_files(folder)  # no weights: fail before building the model

    config_dict = json.loads((folder / "config.json").read_text())
    if config_dict.get("model_type") != "whisper":
        raise ValueError(f"{folder / 'config.json'}: model_type must be 'whisper', got {config_dict.get('model_type')!r}")
    try:
        config = WhisperVQConfig.from_dict(config_dict)
    except StrictDataclassError as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from None
    config._attn_implementation = "sdpa"
    feature_extractor = WhisperFeatureExtractor.from_json_file(str(folder / "preprocessor_config.json"))

    model = WhisperVQEncoder(config)
    state = load_state_dict(folder)
    model.load_state_dict(_map_state_dict(state, model), strict=True)
    dtype = _resolve_dtype(dtype)
    model.to(device=torch.device(device), dtype=dtype)
    return SpeechEncoder(model, feature_extractor, **tokenizer_kwargs)


def _map_state_dict(state: dict[str, torch.Tensor], model: WhisperVQEncoder) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> our parameter names; asserts the key set and every shape."""
    expected = model.state_dict()
    prefix = next((p for p in KEY_PREFIXES if any(k.startswith(p + "conv1.") for k in state)), "")
    mapped, ignored = {}, []
    for key, tensor in state.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if name in expected:
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(f"checkpoint {key}: shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[name].shape)}")
            mapped[name] = tensor
        elif _ignorable(name, model.config.quantize_position) or (prefix and not key.startswith(prefix)):
            ignored.append(key)
        else:
            raise ValueError(f"unexpected key in encoder checkpoint: {key!r}")
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ValueError(f"encoder checkpoint lacks {len(missing)} key(s), e.g. {missing[:4]}")
    return mapped


def _ignorable(name: str, quantize_position: int) -> bool:
    if name in TRAINING_ONLY_KEYS or name.startswith("layer_norm."):
        return True
    parts = name.split(".")
    return parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= quantize_position


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    return resolved


# ---------------------------------------------------------------------------------------------
# random checkpoints in the released format


def tiny_encoder_config(**overrides) -> WhisperVQConfig:
    """The released glm-4-voice-tokenizer structure at small widths (real codebook size 16384)."""
    fields = dict(
        d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, encoder_layers=4,
        decoder_attention_heads=2, decoder_ffn_dim=64, decoder_layers=2,
        num_mel_bins=128, max_source_positions=1500, vocab_size=51866,
        pooling_kernel_size=4, pooling_type="avg", pooling_position=2,
        quantize_vocab_size=16384, quantize_position=2, quantize_encoder_only=True,
        quantize_causal_block_size=200, encoder_causal_convolution=True,
        quantize_ema_decay=0.99, quantize_commit_coefficient=0.25, quantize_loss_scale=10.0,
        quantize_restart_interval=100, skip_language_detection=True,
        begin_suppress_tokens=[220, 50257], bos_token_id=50257, eos_token_id=50257,
        decoder_start_token_id=50258, pad_token_id=50256,
    )
    fields.update(overrides)
    if "quantize_position" in overrides and "pooling_position" not in overrides:
        fields["pooling_position"] = fields["quantize_position"]
    config = WhisperVQConfig(**fields)
    config.architectures = ["WhisperVQEncoder"]
    return config


def write_tiny_encoder(out_dir, seed: int = 0) -> Path:
    """Write a tiny random glm-4-voice-tokenizer folder (d_model 32, 2 layers, codebook 16384); deterministic."""
    return write_random_encoder(out_dir, tiny_encoder_config(), seed=seed)


def write_random_encoder(out_dir, config: WhisperVQConfig, seed: int = 0) -> Path:
    """Random weights for `config` in the released on-disk format; the codebook is fitted to speech-like input.

    Convolutions and projections get fan-in scaled Gaussians, LayerNorms are perturbed, positions
    are Whisper's sinusoids (embed_positions2 a copy of the first rows, as the class initialises
    it), and the codebook is drawn around the per-channel mean/std of the pre-VQ states of a
    synthetic speech-like signal, so that real speech uses many codes. `ema_weight` equals the
    codebook and `ema_count` is 1, as a freshly initialised EMA quantizer stores them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(int(seed))
    model = WhisperVQEncoder(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("embed_positions", "codebook")):
                continue
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
        model.embed_positions.weight.copy_(sinusoids(*model.embed_positions.weight.shape))
        model.embed_positions2.weight.copy_(model.embed_positions.weight[: model.embed_positions2.num_embeddings])

        feature_extractor = _feature_extractor(config)
        tokenizer = SpeechEncoder(model, feature_extractor)
        speech = _speech_like(8.0, tokenizer.sample_rate, np.random.default_rng(int(seed)))
        inputs = tokenizer.features(speech)
        hidden = model(**inputs).pre_vq_hidden.reshape(-1, config.d_model).double()
        # rounded so the written codebook does not depend on BLAS rounding of these statistics
        mean = torch.from_numpy(np.round(hidden.mean(0).numpy(), 3)).float()
        std = torch.from_numpy(np.round(hidden.std(0).numpy(), 3)).float().clamp_min(1e-3)
        codebook = mean + std * torch.randn(model.codebook.weight.shape, generator=generator)
        model.codebook.weight.copy_(codebook)

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.quantize_ema_decay is not None:
        state["ema_count"] = torch.ones(config.quantize_vocab_size)
        state["ema_weight"] = codebook.clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config_dict = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_RELEASED_CONFIG}
    config_dict.update(model_type="whisper", architectures=["WhisperVQEncoder"], torch_dtype="float32",
                       num_hidden_layers=config.encoder_layers)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    feature_extractor.to_json_file(str(out / "preprocessor_config.json"))
    return out


def _feature_extractor(config: WhisperVQConfig) -> WhisperFeatureExtractor:
    """The released preprocessor: 16 kHz, n_fft 400, hop 160, 30 s chunks, `num_mel_bins` bins."""
    fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160,
                                 chunk_length=30, n_fft=400, padding_value=0.0, return_attention_mask=False)
    fe.processor_class = "WhisperProcessor"
    return fe


def _speech_like(seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A deterministic speech-like test signal: voiced syllables (harmonics of a gliding f0 shaped by
    random formant weights), unvoiced noise bursts and short pauses."""
    pieces = []
    total = int(seconds * sample_rate)
    while sum(len(p) for p in pieces) < total:
        n = int(rng.uniform(0.08, 0.3) * sample_rate)
        t = np.arange(n) / sample_rate
        kind = rng.random()
        if kind < 0.6:  # voiced
            f0 = rng.uniform(90, 250) * (1 + rng.uniform(-0.2, 0.2) * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            formants = rng.uniform(300, 3500, size=3)
            signal = sum(np.exp(-((k * f0.mean() - formants) ** 2).min() / 2e5) / k * np.sin(k * phase)
                         for k in range(1, int(4000 / f0.max())))
        elif kind < 0.85:  # unvoiced: noise, slightly coloured
            signal = np.convolve(rng.standard_normal(n), rng.standard_normal(8), mode="same") * 0.1
        else:  # pause
            signal = 1e-3 * rng.standard_normal(n)
        pieces.append(np.hanning(n) * signal)
    speech = np.concatenate(pieces)[:total]
    return (0.5 * speech / np.abs(speech).max()).astype(np.float32)


