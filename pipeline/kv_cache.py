"""KV caches and hidden-state buffers for the decode engine (`pipeline.generate`).

Every request owns one `RequestCache`: one growable K/V store per layer of `model.layers` (backbone slots
0..NB-1, MCTP module k in slot NB+k, as in the original's single DynamicCache, spec §3.3). Unlike
DynamicCache it can be cut back (`truncate`) when drafted tokens are rejected, and it grows by doubling so a
decode step appends in place instead of re-concatenating the whole history.

A forward over several requests at once goes through a `GroupCache`: the requests' caches are gathered into
one right-padded [G, kv_heads, T_kv, head_dim] tensor per layer, and `group_attention_mask` builds the
matching additive mask (bottom-right aligned causal inside each request, nothing on padding).
Transformers' attention layers only ever call `cache.update(key, value, layer_idx)`, so both classes plug
into `model.run_backbone` / `model.run_mtp_module` unchanged.
"""
from __future__ import annotations

import torch


class LayerKV:
    """K/V of one layer for one request: [1, kv_heads, capacity, head_dim] buffers and a fill length."""

    def __init__(self, min_capacity: int):
        self.min_capacity = max(int(min_capacity), 1)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def _reserve(self, key: torch.Tensor, needed: int) -> None:
        if self.keys is not None and needed <= self.keys.shape[2]:
            return
        capacity = max(self.min_capacity, needed, 2 * (0 if self.keys is None else self.keys.shape[2]))
        _, heads, _, dim = key.shape
        keys = key.new_empty(1, heads, capacity, dim)
        values = key.new_empty(1, heads, capacity, dim)
        if self.keys is not None and self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value [1, kv_heads, q, head_dim] -> all keys/values so far [1, kv_heads, length, head_dim]."""
        q = key.shape[2]
        self._reserve(key, self.length + q)
        self.keys[:, :, self.length : self.length + q] = key
        self.values[:, :, self.length : self.length + q] = value
        self.length += q
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, int(length))


class RequestCache:
    """One request's KV cache over every layer slot of `model.layers` (transformers' `update` interface)."""

    def __init__(self, num_layers: int, min_capacity: int = 64):
        self.layers = [LayerKV(min_capacity) for _ in range(num_layers)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].append(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def truncate(self, layer_indices, length: int) -> None:
        """Drop every cached position >= length in the given slots (rollback of rejected drafts)."""
        for i in layer_indices:
            self.layers[i].truncate(length)


class GroupCache:
    """A batch of G requests' caches seen as one padded cache for a single forward.

    `update` appends each row's real new positions (the first q_lens[i] of the padded chunk) to that
    request's own cache, then returns the right-padded gather [G, kv_heads, max(c_i + q_i), head_dim].
    """

    def __init__(self, caches: list[RequestCache], q_lens: list[int]):
        self.caches = caches
        self.q_lens = q_lens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        views = []
        for i, cache in enumerate(self.caches):
            q = self.q_lens[i]
            views.append(cache.layers[layer_idx].append(key_states[i : i + 1, :, :q], value_states[i : i + 1, :, :q]))
        total = max(k.shape[2] for k, _ in views)
        G, heads, _, dim = key_states.shape
        keys = key_states.new_zeros(G, heads, total, dim)
        values = value_states.new_zeros(G, heads, total, dim)
        for i, (k, v) in enumerate(views):
            keys[i, :, : k.shape[2]] = k[0]
            values[i, :, : v.shape[2]] = v[0]
        return keys, values


def group_attention_mask(
    past_lens: list[int], q_lens: list[int], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor | None:
    """Additive [G, 1, Q, T_kv] mask for a right-padded chunk forward over cached requests.

    Row i has past_lens[i] cached keys and q_lens[i] real queries; query j sees key p iff
    p <= past_lens[i] + j (bottom-right aligned causal; kv_len - q_len = past_len). Padded queries
    (j >= q_lens[i]) copy the last real query's row so no row is fully masked (finite softmax).
    Returns None for one request with one query: it may see every key, no mask needed.
    """
    G, Q = len(q_lens), max(q_lens)
    if G == 1 and Q == 1:
        return None
    total = max(c + q for c, q in zip(past_lens, q_lens))
    past = torch.tensor(past_lens, device=device)[:, None, None]  # (G, 1, 1)
    last = torch.tensor(q_lens, device=device)[:, None, None] - 1
    j = torch.arange(Q, device=device)[None, :, None]  # (1, Q, 1)
    p = torch.arange(total, device=device)[None, None, :]  # (1, 1, T_kv)
    allowed = p <= past + torch.minimum(j, last)  # (G, Q, T_kv)
    mask = torch.zeros(G, 1, Q, total, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class HiddenBuffer:
    """Rows [start, end) of a stream of final-normed hidden states ([rows, H]).

    Buffer 0 holds backbone outputs (consumed by MCTP module 0), buffer k+1 the outputs of module k
    (consumed by module k+1). Rows below the consumer's progress are dropped (`trim`), rows of rejected
    drafts are cut (`truncate`), so memory stays at the rows not yet consumed.
    """

    def __init__(self):
        self.start = 0
        self.rows: torch.Tensor | None = None  # (end - start, H)

    @property
    def end(self) -> int:
        return self.start + (0 if self.rows is None else self.rows.shape[0])

    def append(self, rows: torch.Tensor) -> None:
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows], dim=0)

    def get(self, first: int, last: int) -> torch.Tensor:
        """Rows first..last-1 -> [last - first, H]."""
        if first < self.start or last > self.end:
            raise RuntimeError(f"hidden rows [{first}, {last}) not held (buffer has [{self.start}, {self.end}))")
        return self.rows[first - self.start : last - self.start]

    def trim(self, first_needed: int) -> None:
        drop = min(first_needed, self.end) - self.start
        if drop > 0:
            self.rows = self.rows[drop:]
            self.start += drop

    def truncate(self, end: int) -> None:
        if end >= self.end:
            return
        if end <= self.start:  # every held row was rejected; the producer recomputes from `end`
            self.start, self.rows = end, None
        else:
            self.rows = self.rows[: end - self.start]
