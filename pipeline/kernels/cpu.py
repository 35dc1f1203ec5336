"""Compute paths for small models on CPU, registered as the "cpu" kernel set (`pipeline.kernels`) that
`load_llm` picks on a CPU device; each gives the same outputs (within float rounding) as the plain path it
stands in for:

- `sdpa_gqa_attention` (attention implementation "vita_sdpa_gqa", used where the config says "sdpa"): grouped
  query heads read their shared key/value heads without the copies transformers' `repeat_kv` makes;
- `packed_lm_head` / `linear_prepacked`: lm_head rows prepacked once for oneDNN, for steps of several rows
  (the plain fp32 matmul handles a few rows poorly);
- `run_mtp_modules_gathered`: a step mixing MCTP modules as batched matmuls over per-row gathered weights,
  for modules small enough that the gather copies less than per-module forwards cost.

Derived copies (stacked, prepacked weights) are kept per model and rebuilt when its weights change.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, eager_attention_forward

from pipeline.kernels import DecodeKernels, register_kernels

__all__ = ["CPU_DECODE_ATTENTION", "sdpa_gqa_attention", "packed_lm_head", "linear_prepacked", "lm_head_prepacked",
           "run_mtp_modules_gathered", "mtp_modules_gathered", "mtp_module_size", "MTP_GATHER_MAX_ELEMENTS"]

CPU_DECODE_ATTENTION = "vita_sdpa_gqa"
# MCTP steps mixing modules gather each row's module weights when rows x module size stays below this (small
# models); larger modules run per module on their rows instead (a gather would copy more than it saves).
MTP_GATHER_MAX_ELEMENTS = 1 << 21
PACKED_LM_HEAD_MAX_ELEMENTS = 1 << 26  # largest lm_head (elements, over every id range) that gets a packed copy
_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(lo, hi): packed rows, ...}
_STACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> stacked MCTP weights
_SIZES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> parameters of one MCTP module


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' "sdpa" attention, except on CPU with a mask or one query: grouped query heads read
    their shared key/value heads through SDPA's `enable_gqa` instead of the copies `repeat_kv` makes.

    transformers uses `enable_gqa` only without a mask, because CUDA's fast kernels refuse a masked GQA call;
    the CPU kernel takes it and gives identical outputs without the copies (which grow with the cached length
    times the rows). Everywhere else this is transformers' function unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None
    if plain or (attention_mask is None and query.shape[2] > 1):  # causal without a mask: transformers' path
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CPU_DECODE_ATTENTION, sdpa_gqa_attention)


def packed_lm_head(model, lo: int, hi: int) -> torch.Tensor | None:
    """lm_head weight rows lo..hi-1 prepacked for oneDNN (CPU, float32, up to PACKED_LM_HEAD_MAX_ELEMENTS
    in all; CPU only), else None. Kept per id range: a model serves a few (whole vocabulary, text ids, codebook)."""
    weight = model.lm_head.weight
    stamp = weight_stamp(weight)
    cache = _PACKED.get(model)
    if cache is None or cache["stamp"] != stamp:
        cache = _PACKED[model] = {"stamp": stamp, "elements": 0}
    if (lo, hi) in cache:
        return cache[(lo, hi)]
    elements = (hi - lo) * weight.shape[1]
    usable = (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
              and cache["elements"] + elements <= PACKED_LM_HEAD_MAX_ELEMENTS
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    packed = None
    if usable:  # 8: the row count it is tuned for
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach()[lo:hi].contiguous(), 8)
        cache["elements"] += elements
    cache[(lo, hi)] = packed
    return packed


def linear_prepacked(hidden: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden [rows, H] @ rows of a `packed_lm_head` copy (+ bias) -> [rows, hi - lo]."""
    return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), packed, bias, "none", [], "")


def mtp_module_size(model) -> int:
    """Parameters of one MCTP module (its decoder layer, projection and norms)."""
    if model not in _SIZES:
        layer = model.model.layers[model.mtp_layer_index(0)] if model.num_mtp_modules else None
        _SIZES[model] = 0 if layer is None else (
            sum(p.numel() for p in layer.parameters()) + model.mtp_projs[0].weight.numel() + 2 * model.config.hidden_size)
    return _SIZES[model]


def _stacked_mtp_weights(model) -> dict:
    """Every module's weights stacked on a leading module dim (built once per weight version)."""
    cached = _STACKED.get(model)
    stamp = weight_stamp(model.mtp_projs[0].weight)
    if cached is not None and cached["stamp"] == stamp:
        return cached
    layers = [model.model.layers[model.mtp_layer_index(k)] for k in range(model.num_mtp_modules)]

    def stack(get) -> torch.Tensor:
        return torch.stack([get(k, layer).detach() for k, layer in enumerate(layers)])

    _STACKED[model] = stacked = {
        "embed_norm": stack(lambda k, _: model.mtp_embed_norms[k].weight),  # (N, H)
        "hidden_norm": stack(lambda k, _: model.mtp_hidden_norms[k].weight),
        "proj": stack(lambda k, _: model.mtp_projs[k].weight.t()),  # (N, 2H, H)
        "input_norm": stack(lambda _, l: l.input_layernorm.weight),
        "qkv": stack(lambda _, l: torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
                                             l.self_attn.v_proj.weight]).t()),  # (N, H, (heads + 2 kv) * D)
        "qkv_bias": stack(lambda _, l: torch.cat([l.self_attn.q_proj.bias, l.self_attn.k_proj.bias,
                                                  l.self_attn.v_proj.bias])),
        "o": stack(lambda _, l: l.self_attn.o_proj.weight.t()),  # (N, heads * D, H)
        "post_norm": stack(lambda _, l: l.post_attention_layernorm.weight),
        "gate_up": stack(lambda _, l: torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]).t()),  # (N, H, 2I)
        "down": stack(lambda _, l: l.mlp.down_proj.weight.t()),  # (N, I, H)
        "stamp": stamp,
    }
    return stacked

def run_mtp_modules_gathered(model, modules, hidden, next_embeds, position_ids, attention_mask, cache):
    """`run_mtp_modules` for small modules: each row's weights are gathered and every projection is one
    batched matmul, so a step costs about the same whether its rows share a module or not."""
    G, Q, H = hidden.shape
    w = _stacked_mtp_weights(model)
    ks = torch.tensor(modules, device=hidden.device)
    eps = model.config.rms_norm_eps
    layer0 = model.model.layers[model.mtp_layer_index(modules[0])]
    attn = layer0.self_attn
    if attn.sliding_window is not None:
        raise ValueError("run_mtp_modules does not support sliding-window attention layers")

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # Qwen2RMSNorm with per-row weights
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight[ks][:, None, :] * x32.to(x.dtype)

    z = torch.cat([norm(next_embeds, w["embed_norm"]), norm(hidden, w["hidden_norm"])], dim=-1)  # (G, Q, 2H)
    u = torch.bmm(z, w["proj"][ks])  # (G, Q, H)
    cos, sin = model.model.rotary_emb(u, position_ids)
    D, heads, kv_heads = attn.head_dim, attn.config.num_attention_heads, attn.config.num_key_value_heads
    qkv = torch.baddbmm(w["qkv_bias"][ks][:, None, :], norm(u, w["input_norm"]), w["qkv"][ks])
    q, k_, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    query = q.view(G, Q, -1, D).transpose(1, 2)  # (G, heads, Q, D)
    key = k_.view(G, Q, -1, D).transpose(1, 2)  # (G, kv_heads, Q, D)
    value = v.view(G, Q, -1, D).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key, value = cache.update(key, value, model.mtp_layer_index(modules[0]))
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling)
    x = u + torch.bmm(out.reshape(G, Q, -1), w["o"][ks])  # (G, Q, H)
    gate, up = torch.bmm(norm(x, w["post_norm"]), w["gate_up"][ks]).chunk(2, dim=-1)  # (G, Q, I) each
    x = x + torch.bmm(layer0.mlp.act_fn(gate) * up, w["down"][ks])
    return model.model.norm(x)


def weight_stamp(weight: torch.Tensor) -> tuple:
    """Identity of a weight's current contents: a copy derived from it (stacked, prepacked) is rebuilt when
    the model was moved, cast or trained since."""
    return weight.device, weight.dtype, weight.data_ptr(), weight._version


def lm_head_prepacked(model, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
    """The "cpu" lm_head: several rows through the prepacked weight rows lo..hi-1; None where none is kept."""
    packed = packed_lm_head(model, lo, hi) if hidden.shape[0] > 1 else None
    if packed is None:
        return None
    bias = model.lm_head.bias
    return linear_prepacked(hidden, packed, None if bias is None else bias[lo:hi])


def mtp_modules_gathered(model, modules, hidden, next_embeds, position_ids, attention_mask, cache):
    """The "cpu" mixed-module MCTP step: gathered weights while rows x module size stays small, else None."""
    if len(set(modules)) < 2 or hidden.shape[0] * mtp_module_size(model) > MTP_GATHER_MAX_ELEMENTS:
        return None
    return run_mtp_modules_gathered(model, modules, hidden, next_embeds, position_ids, attention_mask, cache)


register_kernels("cpu", DecodeKernels(attention=CPU_DECODE_ATTENTION, lm_head=lm_head_prepacked,
                                      mtp_modules=mtp_modules_gathered))
