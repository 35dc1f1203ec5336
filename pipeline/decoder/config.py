"""Read the released glm-4-voice-decoder `config.yaml` without executing it.

The file is hyperpyyaml: tags such as `!new:cosyvoice.flow.flow.MaskedDiffWithXvec` or
`!apply:torch.manual_seed [1986]` would import and call Python when loaded with hyperpyyaml.
We load it with PyYAML's SafeLoader extended by constructors that turn the known hyperpyyaml
tags into inert `Tagged` records; any other tag (e.g. `!!python/object/apply:os.system`) is an
error. Only whitelisted `!new:` classes and seed-setting `!apply:` calls are accepted, and none
of them is ever imported or called. The values are then copied into typed dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class DecoderError(ValueError):
    """Bad decoder input: a malformed or unsafe checkpoint folder, or bad audio codes."""


@dataclass(frozen=True)
class Tagged:
    """An inert hyperpyyaml node: `!new:target` (kind "new") with its keyword arguments, etc."""

    kind: str  # "new" | "name" | "apply" | "ref" | "copy" | "tuple"
    target: str
    value: Any = None


# Classes / callables the released layout names. They are matched by name only, never imported.
ALLOWED_NEW = {
    "cosyvoice.llm.llm.TransformerLM",
    "cosyvoice.transformer.encoder.ConformerEncoder",
    "cosyvoice.transformer.encoder.TransformerEncoder",
    "cosyvoice.transformer.encoder.BlockConformerEncoder",
    "cosyvoice.flow.flow.MaskedDiffWithXvec",
    "cosyvoice.flow.length_regulator.InterpolateRegulator",
    "cosyvoice.flow.flow_matching.ConditionalCFM",
    "cosyvoice.flow.decoder.ConditionalDecoder",
    "cosyvoice.hifigan.generator.HiFTGenerator",
    "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
    "omegaconf.DictConfig",
}
ALLOWED_APPLY = {"random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all"}
ALLOWED_NAME: set[str] = set()  # the released file uses no `!name:`; any target there is refused


class _SafeHyperLoader(yaml.SafeLoader):
    """SafeLoader + inert constructors for hyperpyyaml tags (everything else stays an error)."""


def _construct_value(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


def _multi(kind: str):
    def construct(loader, suffix, node):
        return Tagged(kind, suffix, _construct_value(loader, node))

    return construct


def _single(kind: str):
    def construct(loader, node):
        value = _construct_value(loader, node)
        return Tagged(kind, str(value) if kind in ("ref", "copy") else "", value)

    return construct


for _kind in ("new", "name", "apply", "applyref"):
    _SafeHyperLoader.add_multi_constructor(f"!{_kind}:", _multi(_kind))
for _kind in ("ref", "copy", "tuple"):
    _SafeHyperLoader.add_constructor(f"!{_kind}", _single(_kind))


def _unknown_tag(loader, suffix, node):
    raise DecoderError(f"config.yaml: unsupported YAML tag {node.tag!r} (line {node.start_mark.line + 1}); refused")


_SafeHyperLoader.add_multi_constructor("!", _unknown_tag)
_SafeHyperLoader.add_multi_constructor("tag:", _unknown_tag)


def load_yaml(path: str | Path) -> dict:
    """Parse a hyperpyyaml file into plain data + `Tagged` records, checking every tag target."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise DecoderError(f"cannot read decoder config {str(path)!r}: {err}") from err
    try:
        data = yaml.load(text, Loader=_SafeHyperLoader)  # noqa: S506 - our SafeLoader subclass
    except DecoderError:
        raise
    except yaml.YAMLError as err:
        raise DecoderError(f"config.yaml {str(path)!r} is not valid (safe) YAML: {err}") from err
    if not isinstance(data, dict):
        raise DecoderError(f"config.yaml {str(path)!r}: top level must be a mapping, got {type(data).__name__}")
    _check_targets(data, path)
    return data


def _check_targets(value: Any, path: Path) -> None:
    if isinstance(value, Tagged):
        allowed = {"new": ALLOWED_NEW, "apply": ALLOWED_APPLY, "name": ALLOWED_NAME, "applyref": set()}.get(value.kind)
        if allowed is not None and value.target not in allowed:
            raise DecoderError(f"config.yaml {str(path)!r}: refusing `!{value.kind}:{value.target}` (not a known decoder component)")
        _check_targets(value.value, path)
    elif isinstance(value, dict):
        for v in value.values():
            _check_targets(v, path)
    elif isinstance(value, list):
        for v in value:
            _check_targets(v, path)


def resolve_refs(value: Any, root: dict, depth: int = 0) -> Any:
    """Replace `!ref <name>` by the referenced top-level value (plain lookups only, no arithmetic)."""
    if depth > 20:
        raise DecoderError("config.yaml: `!ref` nesting too deep")
    if isinstance(value, Tagged):
        if value.kind in ("ref", "copy"):
            name = value.target.strip()
            if not (name.startswith("<") and name.endswith(">")) or name[1:-1] not in root:
                raise DecoderError(f"config.yaml: unsupported reference {value.target!r}")
            return resolve_refs(root[name[1:-1]], root, depth + 1)
        if value.kind == "tuple":
            return tuple(resolve_refs(value.value, root, depth + 1))
        return Tagged(value.kind, value.target, resolve_refs(value.value, root, depth + 1))
    if isinstance(value, dict):
        return {k: resolve_refs(v, root, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, root, depth + 1) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Typed configs
# ----------------------------------------------------------------------------------------------


@dataclass
class FlowConfig:
    """`MaskedDiffWithXvec` with a `BlockConformerEncoder`, `InterpolateRegulator`, `ConditionalCFM`."""

    vocab_size: int = 16384
    input_size: int = 512
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    input_frame_rate: float = 12.5
    # encoder (BlockConformerEncoder, rel_pos_espnet, block_rel_selfattn, no conv module, not macaron)
    encoder_dim: int = 512
    encoder_heads: int = 8
    encoder_ffn: int = 2048
    encoder_blocks: int = 6
    block_size: int = 10  # tokens: a token sees its own block and everything before it
    # length regulator
    regulator_layers: int = 4  # len(sampling_ratios)
    # CFM + estimator (ConditionalDecoder, a 1-D U-Net)
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    estimator_in_channels: int = 320
    channels: tuple = (256, 256)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8


@dataclass
class HiFTConfig:
    """`HiFTGenerator` (NSF source + iSTFTNet) with a `ConvRNNF0Predictor`."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple = (8, 8)
    upsample_kernel_sizes: tuple = (16, 16)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple = (7, 11)
    source_resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass
class DecoderConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    sample_rate: int = 22050


def _node(value: Any, target: str, where: str) -> dict:
    if not isinstance(value, Tagged) or value.kind != "new" or value.target != target:
        got = f"!{value.kind}:{value.target}" if isinstance(value, Tagged) else type(value).__name__
        raise DecoderError(f"config.yaml: `{where}` must be `!new:{target}`, got {got}")
    if not isinstance(value.value, dict):
        raise DecoderError(f"config.yaml: `{where}` needs keyword arguments")
    return value.value


def _get(d: dict, key: str, kind, where: str, default=None):
    if key not in d:
        if default is not None:
            return default
        raise DecoderError(f"config.yaml: `{where}.{key}` is missing")
    try:
        v = d[key]
        if kind is tuple:
            return tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v)
        if kind is int and isinstance(v, float) and not v.is_integer():
            raise ValueError(v)
        return kind(v)
    except (TypeError, ValueError) as err:
        raise DecoderError(f"config.yaml: `{where}.{key}` = {d[key]!r} is not a valid {kind.__name__}") from err


def parse_decoder_config(data: dict) -> DecoderConfig:
    """Map the (tag-checked) YAML data onto `DecoderConfig`, checking the component classes."""
    data = {k: resolve_refs(v, data) for k, v in data.items()}
    if "flow" not in data or "hift" not in data:
        raise DecoderError("config.yaml: needs `flow` and `hift` sections")
    flow = _node(data["flow"], "cosyvoice.flow.flow.MaskedDiffWithXvec", "flow")
    enc = _node(flow.get("encoder"), "cosyvoice.transformer.encoder.BlockConformerEncoder", "flow.encoder")
    reg = _node(flow.get("length_regulator"), "cosyvoice.flow.length_regulator.InterpolateRegulator", "flow.length_regulator")
    cfm = _node(flow.get("decoder"), "cosyvoice.flow.flow_matching.ConditionalCFM", "flow.decoder")
    est = _node(cfm.get("estimator"), "cosyvoice.flow.decoder.ConditionalDecoder", "flow.decoder.estimator")
    cfm_params = _node(cfm.get("cfm_params"), "omegaconf.DictConfig", "flow.decoder.cfm_params").get("content", {})
    for key, want in (("pos_enc_layer_type", "rel_pos_espnet"), ("selfattention_layer_type", "block_rel_selfattn"),
                      ("input_layer", "linear")):
        if enc.get(key, want) != want:
            raise DecoderError(f"config.yaml: flow.encoder.{key} = {enc.get(key)!r} is not supported (want {want!r})")
    if enc.get("use_cnn_module", False) or enc.get("macaron_style", False):
        raise DecoderError("config.yaml: flow.encoder with use_cnn_module/macaron_style is not supported")
    if not enc.get("normalize_before", True):
        raise DecoderError("config.yaml: flow.encoder.normalize_before = False is not supported")
    if str(cfm_params.get("t_scheduler", "cosine")) != "cosine" or str(cfm_params.get("solver", "euler")) != "euler":
        raise DecoderError("config.yaml: only the euler solver with the cosine t_scheduler is supported")
    if est.get("act_fn", "gelu") != "gelu":
        raise DecoderError(f"config.yaml: flow.decoder.estimator.act_fn = {est.get('act_fn')!r} is not supported")
    flow_cfg = FlowConfig(
        vocab_size=_get(flow, "vocab_size", int, "flow"),
        input_size=_get(flow, "input_size", int, "flow"),
        output_size=_get(flow, "output_size", int, "flow"),
        spk_embed_dim=_get(flow, "spk_embed_dim", int, "flow"),
        input_frame_rate=_get(flow, "input_frame_rate", float, "flow"),
        encoder_dim=_get(enc, "output_size", int, "flow.encoder"),
        encoder_heads=_get(enc, "attention_heads", int, "flow.encoder"),
        encoder_ffn=_get(enc, "linear_units", int, "flow.encoder"),
        encoder_blocks=_get(enc, "num_blocks", int, "flow.encoder"),
        block_size=_get(enc, "block_size", int, "flow.encoder"),
        regulator_layers=len(_get(reg, "sampling_ratios", tuple, "flow.length_regulator")),
        inference_cfg_rate=_get(cfm_params, "inference_cfg_rate", float, "flow.decoder.cfm_params"),
        estimator_in_channels=_get(est, "in_channels", int, "flow.decoder.estimator"),
        channels=_get(est, "channels", tuple, "flow.decoder.estimator"),
        attention_head_dim=_get(est, "attention_head_dim", int, "flow.decoder.estimator"),
        n_blocks=_get(est, "n_blocks", int, "flow.decoder.estimator"),
        num_mid_blocks=_get(est, "num_mid_blocks", int, "flow.decoder.estimator"),
        num_heads=_get(est, "num_heads", int, "flow.decoder.estimator"),
    )
    if _get(enc, "input_size", int, "flow.encoder", flow_cfg.input_size) != flow_cfg.input_size:
        raise DecoderError("config.yaml: flow.encoder.input_size must equal flow.input_size")
    if _get(est, "out_channels", int, "flow.decoder.estimator") != flow_cfg.output_size:
        raise DecoderError("config.yaml: flow.decoder.estimator.out_channels must equal flow.output_size")
    if flow_cfg.estimator_in_channels != 4 * flow_cfg.output_size:
        raise DecoderError("config.yaml: estimator in_channels must be 4 x output_size (x, mu, spks, cond)")

    hift = _node(data["hift"], "cosyvoice.hifigan.generator.HiFTGenerator", "hift")
    f0 = _node(hift.get("f0_predictor"), "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor", "hift.f0_predictor")
    istft = hift.get("istft_params", {"n_fft": 16, "hop_len": 4})
    defaults = HiFTConfig()
    hift_cfg = HiFTConfig(
        in_channels=_get(hift, "in_channels", int, "hift", defaults.in_channels),
        base_channels=_get(hift, "base_channels", int, "hift", defaults.base_channels),
        nb_harmonics=_get(hift, "nb_harmonics", int, "hift", defaults.nb_harmonics),
        sampling_rate=_get(hift, "sampling_rate", int, "hift", defaults.sampling_rate),
        nsf_alpha=_get(hift, "nsf_alpha", float, "hift", defaults.nsf_alpha),
        nsf_sigma=_get(hift, "nsf_sigma", float, "hift", defaults.nsf_sigma),
        nsf_voiced_threshold=_get(hift, "nsf_voiced_threshold", float, "hift", defaults.nsf_voiced_threshold),
        upsample_rates=_get(hift, "upsample_rates", tuple, "hift", defaults.upsample_rates),
        upsample_kernel_sizes=_get(hift, "upsample_kernel_sizes", tuple, "hift", defaults.upsample_kernel_sizes),
        n_fft=_get(istft, "n_fft", int, "hift.istft_params"),
        hop_len=_get(istft, "hop_len", int, "hift.istft_params"),
        resblock_kernel_sizes=_get(hift, "resblock_kernel_sizes", tuple, "hift", defaults.resblock_kernel_sizes),
        resblock_dilation_sizes=_get(hift, "resblock_dilation_sizes", tuple, "hift", defaults.resblock_dilation_sizes),
        source_resblock_kernel_sizes=_get(hift, "source_resblock_kernel_sizes", tuple, "hift",
                                          defaults.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=_get(hift, "source_resblock_dilation_sizes", tuple, "hift",
                                            defaults.source_resblock_dilation_sizes),
        lrelu_slope=_get(hift, "lrelu_slope", float, "hift", defaults.lrelu_slope),
        audio_limit=_get(hift, "audio_limit", float, "hift", defaults.audio_limit),
        f0_cond_channels=_get(f0, "cond_channels", int, "hift.f0_predictor"),
    )
    if _get(f0, "num_class", int, "hift.f0_predictor", 1) != 1:
        raise DecoderError("config.yaml: hift.f0_predictor.num_class must be 1")
    sample_rate = _get(data, "sample_rate", int, "", hift_cfg.sampling_rate)
    return DecoderConfig(flow=flow_cfg, hift=hift_cfg, sample_rate=sample_rate)


def load_decoder_config(path: str | Path) -> DecoderConfig:
    """Safe-load `config.yaml` and return the typed decoder config."""
    return parse_decoder_config(load_yaml(path))
