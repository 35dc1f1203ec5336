"""The VITA-Audio language model: a Qwen2 backbone plus N MCTP modules (spec §1).

One MCTP module k turns (hidden state of position t, embedding of token t+k+1) into a prediction of
token t+k+2, so one backbone forward plus a cascade of cheap module forwards yields several tokens.
The state-dict layout is the released one, so checkpoints load by key name with no mapping:

    model.embed_tokens, model.layers.{0..NB-1}   backbone (NB = num_hidden_layers - N)
    model.layers.{NB+k}                          the decoder layer of MCTP module k (own KV-cache slot NB+k)
    mtp_embed_norms.{k}, mtp_hidden_norms.{k}    RMSNorms on the token embedding and the incoming hidden state
    mtp_projs.{k}                                Linear(2H -> H), input = [embedding, hidden] (embedding first)
    model.norm, lm_head                          shared by the backbone and every module

The forward here is the teacher-forced (training) pass; incremental decoding lives in `pipeline.engine`,
which drives `run_backbone` / `run_mtp_modules` (a batch mixing modules) with its own caches and masks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from pipeline.checkpoints import CheckpointError, tensor_shapes  # noqa: F401  (CheckpointError: public here too)
from pipeline.kernels import PLAIN, kernels_for

IGNORE_INDEX = -100


@strict
class Qwen2MTPConfig(Qwen2Config):
    """Qwen2Config plus the MCTP fields. `num_hidden_layers` counts backbone AND MCTP layers (7B: 28 + 10)."""

    model_type = "qwen2_mtp"

    num_nextn_predict_layers: int = 1  # N, the number of MCTP modules (the last N entries of model.layers)
    mtp_loss_weight: float = 1.0  # total loss = CE_main + mtp_loss_weight / N * sum_k CE_k
    speech_token_offset: int = 151685  # id of <|audio_0|>; informational, the tokenizer is the source of truth
    # Packed MTP loss: False (default) scores only pairs inside one sample; True also scores the original's
    # boundary pair of each module (last row of a sample vs the next sample's first kept label), see forward.
    mtp_loss_across_samples: bool = False

    @property
    def num_backbone_layers(self) -> int:
        return self.num_hidden_layers - self.num_nextn_predict_layers


@dataclass
class Qwen2MTPOutput(ModelOutput):
    """Teacher-forced outputs. Row t of `logits` predicts x[t+1]; row t of `mtp_logits[k]` predicts x[t+k+2].

    MCTP tensors keep the full length L so rows line up with the input; per packed sample the last k+1
    rows of module k have no input token and carry no meaning (they are never attended to nor scored).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, L, V]
    mtp_logits: tuple[torch.Tensor, ...] | None = None  # N x [B, L, V]
    hidden_states: torch.Tensor | None = None  # [B, L, H] backbone output after the final norm
    mtp_hidden_states: tuple[torch.Tensor, ...] | None = None  # N x [B, L, H] module outputs after the final norm
    mtp_layer_inputs: tuple[torch.Tensor, ...] | None = None  # N x [B, L, H] outputs of mtp_projs[k]
    backbone_loss: torch.Tensor | None = None
    mtp_losses: tuple[torch.Tensor, ...] | None = None


def segment_causal_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: causal inside each packed sample, nothing across samples or onto padding.

    A new sample starts wherever the position id restarts at 0 (per-sample position ids, spec §6.3).
    """
    B, L = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    segment = starts.long().cumsum(-1)  # (B, L)
    idx = torch.arange(L, device=position_ids.device)
    allowed = (segment[:, :, None] == segment[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class Qwen2MTPForCausalLM(Qwen2PreTrainedModel):
    """Qwen2 backbone + N MCTP modules with the released key names (see module docstring)."""

    config_class = Qwen2MTPConfig
    config: Qwen2MTPConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only used if tie_word_embeddings

    def __init__(self, config: Qwen2MTPConfig):
        super().__init__(config)
        n = config.num_nextn_predict_layers
        if not 0 <= n < config.num_hidden_layers:
            raise ValueError(
                f"num_nextn_predict_layers={n} must be in [0, num_hidden_layers={config.num_hidden_layers})"
            )
        self.model = Qwen2Model(config)  # holds backbone AND MCTP layers, as in the released checkpoints
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        H = config.hidden_size
        self.mtp_projs = nn.ModuleList([nn.Linear(2 * H, H, bias=False) for _ in range(n)])
        self.mtp_embed_norms = nn.ModuleList([Qwen2RMSNorm(H, eps=config.rms_norm_eps) for _ in range(n)])
        self.mtp_hidden_norms = nn.ModuleList([Qwen2RMSNorm(H, eps=config.rms_norm_eps) for _ in range(n)])
        self.decode_kernels = PLAIN  # faster decode pieces, chosen at load (`set_decode_kernels`), never by the model itself
        self.post_init()

    def set_decode_kernels(self, name: str = "auto") -> "Qwen2MTPForCausalLM":
        """Run decode steps with the registered kernel set `name` (`pipeline.kernels`; "auto": the one of the
        device the weights are on). Its attention implementation replaces "sdpa" in this model's config."""
        self.decode_kernels = kernels_for(name, next(self.parameters()).device.type)
        if self.decode_kernels.attention is not None and self.config._attn_implementation == "sdpa":
            self.config._attn_implementation = self.decode_kernels.attention
        return self

    # --- structure -------------------------------------------------------------------------------------
    @property
    def num_mtp_modules(self) -> int:
        return self.config.num_nextn_predict_layers

    @property
    def num_backbone_layers(self) -> int:
        return self.config.num_hidden_layers - self.config.num_nextn_predict_layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def mtp_layer_index(self, k: int) -> int:
        """Index of MCTP module k's decoder layer in `model.layers` (= its KV-cache slot)."""
        if not 0 <= k < self.num_mtp_modules:
            raise ValueError(f"MCTP module index k={k} out of range [0, {self.num_mtp_modules})")
        return self.num_backbone_layers + k

    # --- building blocks used by the training forward and by pipeline.engine ----------------------------
    def run_backbone(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Backbone layers on [B, T, H] embeddings -> [B, T, H] hidden states after the final norm.

        `attention_mask` is an additive [B, 1, T, T_kv] mask (None = plain causal, no cache); `cache` is any
        object with transformers' `update(key, value, layer_idx, ...)` method, indexed by layer.
        """
        hidden = inputs_embeds
        position_embeddings = self.model.rotary_emb(hidden, position_ids)
        for layer in self.model.layers[: self.num_backbone_layers]:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return self.model.norm(hidden)

    def mtp_layer_input(self, k: int, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """u_k = mtp_projs[k]([embed_norm(e), hidden_norm(h)]) -> [B, T, H] (embedding half first)."""
        z = torch.cat([self.mtp_embed_norms[k](next_embeds), self.mtp_hidden_norms[k](hidden)], dim=-1)  # (B, T, 2H)
        return self.mtp_projs[k](z)

    def run_mtp_module(
        self,
        k: int,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        return_layer_input: bool = False,
    ):
        """MCTP module k: (h^k_t, embed(x_{t+k+1})) at rotary position pos(t)+k+1 -> h^{k+1}_t after the final norm.

        `position_ids` are those of the embedded tokens. Shapes: [B, T, H] in, [B, T, H] out.
        """
        layer = self.model.layers[self.mtp_layer_index(k)]
        u = self.mtp_layer_input(k, hidden, next_embeds)
        position_embeddings = self.model.rotary_emb(u, position_ids)
        y = layer(
            u,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
        y = self.model.norm(y)
        return (y, u) if return_layer_input else y

    def run_mtp_modules(
        self,
        modules: list[int],
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache,
    ) -> torch.Tensor:
        """`run_mtp_module` for a batch whose row i runs module modules[i]: [G, Q, H] in, [G, Q, H] out.

        Continuously batched requests sit at different points of their schedules, so one step needs several
        modules at once. Rather than one forward per module, the per-module parts (norms, projections, MLP)
        run on each module's rows and everything shared (rotary, attention, final norm) runs once for the
        whole batch. `cache.update(key, value, layer_idx)` receives the keys of every row together; it must
        know each row's module (`pipeline.kv_cache.BatchKV` with `modules`). Same math as the decoder layer.
        """
        G, Q, _ = hidden.shape
        N, NB = self.num_mtp_modules, self.num_backbone_layers
        if len(modules) != G or not all(0 <= k < N for k in modules):
            raise ValueError(f"modules must hold one MCTP module index in [0, {N}) per row ({G} rows), got {modules}")
        if self.decode_kernels.mtp_modules is not None:
            out = self.decode_kernels.mtp_modules(self, modules, hidden, next_embeds, position_ids, attention_mask, cache)
            if out is not None:
                return out
        rows: dict[int, list[int]] = {}
        for i, k in enumerate(modules):
            rows.setdefault(k, []).append(i)
        index = {k: torch.tensor(r, device=hidden.device) for k, r in rows.items()} if len(rows) > 1 else None

        def per_module(fn, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
            """fn(k, rows of x, ...) for each module k, reassembled in row order."""
            if index is None:
                return fn(modules[0], x, *more)
            out = None
            for k, idx in index.items():
                y = fn(k, x[idx], *(m[idx] for m in more))
                if out is None:
                    out = y.new_empty(G, *y.shape[1:])
                out[idx] = y
            return out

        layers = {k: self.model.layers[NB + k] for k in set(modules)}  # MCTP module k's decoder layer
        u = per_module(lambda k, h, e: self.mtp_layer_input(k, h, e), hidden, next_embeds)  # (G, Q, H)
        cos, sin = self.model.rotary_emb(u, position_ids)
        attn = layers[modules[0]].self_attn  # config holder for the attention function
        if attn.sliding_window is not None:
            raise ValueError("run_mtp_modules does not support sliding-window attention layers")
        D = attn.head_dim

        def qkv(k: int, x: torch.Tensor) -> torch.Tensor:
            a = layers[k].self_attn
            x = layers[k].input_layernorm(x)
            return torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], dim=-1)

        q, k_, v = per_module(qkv, u).split(
            [attn.config.num_attention_heads * D, attn.config.num_key_value_heads * D,
             attn.config.num_key_value_heads * D], dim=-1)
        query = q.view(G, Q, -1, D).transpose(1, 2)  # (G, heads, Q, D)
        key = k_.view(G, Q, -1, D).transpose(1, 2)  # (G, kv_heads, Q, D)
        value = v.view(G, Q, -1, D).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key, value = cache.update(key, value, NB + modules[0])
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = interface(attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling)
        out = out.reshape(G, Q, -1).contiguous()  # (G, Q, heads * D)

        def rest(k: int, o: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            layer = layers[k]
            x = residual + layer.self_attn.o_proj(o)
            return x + layer.mlp(layer.post_attention_layernorm(x))

        return self.model.norm(per_module(rest, out, u))

    def decode_logits(self, hidden: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """lm_head over the rows of a decode step, for ids lo..hi-1 only: [rows, H] -> float32 [rows, hi - lo].

        A step whose rows may only choose among some ids (an audio slot: the codebook's ids; a text slot: the
        text ids) needs no scores for the rest; on a real checkpoint the codebook is a tenth of the vocabulary.
        A kernel set chosen at load (`set_decode_kernels`; on CPU: weight rows prepacked for oneDNN) may take the call.
        """
        V = self.lm_head.weight.shape[0]
        hi = V if hi is None else hi
        if not 0 <= lo < hi <= V:
            raise ValueError(f"id range [{lo}, {hi}) is not inside the vocabulary [0, {V})")
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if self.decode_kernels.lm_head is not None:
            out = self.decode_kernels.lm_head(self, hidden, lo, hi)
            if out is not None:
                return out
        if (lo, hi) == (0, V):
            return self.lm_head(hidden).float()
        return F.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi]).float()

    # --- teacher-forced / training forward --------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_mtp_logits: bool | None = None,
        **unused,
    ) -> Qwen2MTPOutput:
        """Backbone and every MCTP module over whole sequences (spec §1.5, §1.6).

        input_ids / position_ids / labels: [B, L]. Packed samples are marked by position ids restarting at 0;
        attention never crosses a sample. Loss = CE_main + mtp_loss_weight / N * sum_k CE_k; when `lm_head` is
        frozen (training stages 2-3) the MCTP inputs are detached and CE_main is dropped, as in the original.
        CE terms are sum / num_items_in_batch when given (HF Trainer semantics), else a mean over scored rows.

        Why `config.mtp_loss_across_samples` exists: the original computes CE_k over a packed row filtered to
        the tokens with position id > k and shifts by one inside that filtered row, so the last row of a sample
        is also scored against the first kept label (position k+1) of the next sample, a prediction the module
        cannot make (it never sees that sample). That pair is noise and makes the packed loss differ from the
        samples trained alone, so the default scores within-sample pairs only; True reproduces the original
        exactly (../shared/parity/llm_train, where such pairs occur for modules 3..9 of a 10-module model).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        vocab = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids out of range [0, {vocab}): min {int(input_ids.min())}, max {int(input_ids.max())}")
        B, L = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(L, device=device).expand(B, L)
        if return_mtp_logits is None:
            return_mtp_logits = labels is None

        embeds = self.model.embed_tokens(input_ids)  # (B, L, H)
        mask = segment_causal_mask(position_ids, attention_mask, embeds.dtype)
        hidden = self.run_backbone(embeds, position_ids, mask)
        logits = self.lm_head(hidden)  # (B, L, V)

        # Row t of module k may use token t+k+1 only if it belongs to the same sample.
        starts = position_ids == 0
        starts[:, 0] = True
        segment = starts.long().cumsum(-1)
        valid_tokens = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

        frozen_head = not self.lm_head.weight.requires_grad
        mtp_hidden_in, mtp_embeds = (hidden.detach(), embeds.detach()) if frozen_head else (hidden, embeds)

        loss_terms, mtp_losses, mtp_logits, mtp_hidden, mtp_inputs = [], [], [], [], []
        backbone_loss = None
        if labels is not None:
            target = _shift_targets(labels, segment, valid_tokens, shift=1)
            backbone_loss = _cross_entropy(logits, target, num_items_in_batch)
            if not frozen_head:
                loss_terms.append(backbone_loss)

        h = mtp_hidden_in
        for k in range(self.num_mtp_modules):
            shift = k + 1
            next_embeds = _shift_left(mtp_embeds, shift)  # row t holds embed(x_{t+k+1})
            h, u = self.run_mtp_module(k, h, next_embeds, position_ids + shift, mask, return_layer_input=True)
            k_logits = self.lm_head(h)
            if labels is not None:
                target = _shift_targets(labels, segment, valid_tokens, shift=k + 2)
                if self.config.mtp_loss_across_samples:
                    target = _add_boundary_targets(target, labels, position_ids, valid_tokens, k)
                ce = _cross_entropy(k_logits, target, num_items_in_batch)
                mtp_losses.append(ce)
                loss_terms.append(ce * (self.config.mtp_loss_weight / self.num_mtp_modules))
            if return_mtp_logits:
                mtp_logits.append(k_logits)
                mtp_hidden.append(h)
                mtp_inputs.append(u)

        loss = None
        if labels is not None:
            loss = torch.stack(loss_terms).sum() if loss_terms else logits.sum() * 0.0
        return Qwen2MTPOutput(
            loss=loss,
            logits=logits,
            mtp_logits=tuple(mtp_logits) if return_mtp_logits else None,
            hidden_states=hidden,
            mtp_hidden_states=tuple(mtp_hidden) if return_mtp_logits else None,
            mtp_layer_inputs=tuple(mtp_inputs) if return_mtp_logits else None,
            backbone_loss=backbone_loss,
            mtp_losses=tuple(mtp_losses) if labels is not None else None,
        )


def _shift_left(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Row t <- row t+shift along dim 1, zero-filled at the end: [B, L, ...] -> [B, L, ...]."""
    out = torch.zeros_like(x)
    if shift < x.shape[1]:
        out[:, : x.shape[1] - shift] = x[:, shift:]
    return out


def _shift_targets(labels: torch.Tensor, segment: torch.Tensor, valid: torch.Tensor, shift: int) -> torch.Tensor:
    """Target of row t = labels[t+shift] if that token is in the same packed sample, else IGNORE_INDEX."""
    L = labels.shape[1]
    target = torch.full_like(labels, IGNORE_INDEX)
    if shift < L:
        same = (segment[:, shift:] == segment[:, :-shift]) & valid[:, shift:] & valid[:, :-shift]
        target[:, : L - shift] = torch.where(same, labels[:, shift:], IGNORE_INDEX)
    return target


def _add_boundary_targets(
    target: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor, k: int
) -> torch.Tensor:
    """The original's cross-sample pairs of module k: its filtered row keeps tokens s with position id > k; for
    consecutive kept tokens s_a < s_b that are not adjacent (a sample boundary), module row s_a-k-1 (whose
    input token is s_a) is scored against labels[s_b]."""
    target = target.clone()
    for b in range(labels.shape[0]):
        kept = torch.nonzero((position_ids[b] > k) & valid[b]).flatten()
        if kept.numel() < 2:
            continue
        s_a, s_b = kept[:-1], kept[1:]
        jump = s_b != s_a + 1
        target[b, s_a[jump] - k - 1] = labels[b, s_b[jump]]
    return target


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_target = target.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        if (flat_target != IGNORE_INDEX).any():
            return F.cross_entropy(flat_logits, flat_target, ignore_index=IGNORE_INDEX)
        return flat_logits.sum() * 0.0
    total = F.cross_entropy(flat_logits, flat_target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / num_items_in_batch


AutoConfig.register("qwen2_mtp", Qwen2MTPConfig)
AutoModelForCausalLM.register(Qwen2MTPConfig, Qwen2MTPForCausalLM)


def load_llm(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, kernels: str = "auto"
) -> Qwen2MTPForCausalLM:
    """Load a released VITA-Audio LLM folder (config.json + safetensors or pytorch_model.bin, sharded or not) strictly.

    Also accepts a plain Qwen2.5 folder (model_type "qwen2": no MCTP modules, the stage-1 starting point).
    Every checkpoint tensor must match a parameter by name and shape; anything missing is an error rather
    than silently random. dtype defaults to the checkpoint's (bfloat16 for the releases; use float32 on CPU).
    `kernels` picks a registered kernel set (`pipeline.kernels`; "auto": the device's own, "plain": none).
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in LLM folder {path!r}")
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "qwen2":
        config = Qwen2MTPConfig(**{**config.to_dict(), "num_nextn_predict_layers": 0, "model_type": "qwen2_mtp"})
    elif not isinstance(config, Qwen2MTPConfig):
        raise CheckpointError(f"{path!r} holds model_type {config.model_type!r}, expected 'qwen2_mtp' or 'qwen2'")
    check_checkpoint(path, config)
    model, info = Qwen2MTPForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto", output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):  # belt and braces: check_checkpoint saw the files
        raise CheckpointError(f"LLM checkpoint {path!r}: {info}")
    return model.to(device).eval().set_decode_kernels(kernels)


def checkpoint_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in an LLM folder (safetensors or pytorch_model.bin, single or sharded)."""
    return tensor_shapes(path)


def check_checkpoint(path: str | os.PathLike, config: Qwen2MTPConfig) -> None:
    """Raise CheckpointError naming every missing, unexpected or wrongly shaped tensor."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Qwen2MTPForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    found = checkpoint_tensor_shapes(path)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{label} ({len(items)}): " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
    if problems:
        raise CheckpointError(f"LLM checkpoint {os.fspath(path)!r} does not match its config.json: " + "; ".join(problems))
