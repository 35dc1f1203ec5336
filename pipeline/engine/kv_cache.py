"""KV caches and hidden-state buffers for the LLM engine (`pipeline.engine`).

All running requests share one `KVPool` and each holds one slot of it for its lifetime. The pool has one
entry per backbone layer, a [1, slots, kv_heads, capacity, head_dim] K and V tensor, and one entry for all
MCTP modules together, [N, slots, ...] (module k of request s at [k, s]), so a batch whose rows run
different modules (requests at different points of their schedules) still reads its keys in one go.

A forward sees the pool through a `BatchKV`: it writes each row's new positions in place (one indexed copy
per layer) and hands attention the rows' K/V as one right-padded [G, kv_heads, T_kv, head_dim] tensor: a
plain view when the rows use one module and consecutive slots (requests in step with each other), else one
gather. So the cost of a step barely grows with the number of requests.

Which positions of a slot are valid is the engine's bookkeeping (backbone and module lengths), so rolling
back rejected drafts is free: later writes overwrite them. `group_attention_mask` hides everything past a
row's length (bottom-right aligned causal inside each row). Transformers' attention layers only call
`cache.update(key, value, layer_idx)`, so `BatchKV` plugs into `model.run_backbone` / `model.run_mtp_modules`.
"""
from __future__ import annotations

import torch


class KVPool:
    """K/V of every running request: per entry a [modules, slots, kv_heads, capacity, head_dim] tensor pair.

    `widths[i]` is the module count of entry i (1 for a backbone layer, N for the MCTP entry). Slots and
    capacity grow by doubling when a write needs them (entries are allocated at their first write, when heads
    and head_dim are known). New memory is zeroed: masked-out positions must hold finite values, since an
    additive mask on NaN garbage would still give NaN. A request paused by its server keeps its slot, so the
    pool may hold more slots than the engine's batch size.
    """

    def __init__(self, widths: list[int], min_capacity: int = 64):
        self.widths = list(widths)
        self.min_capacity = max(int(min_capacity), 1)
        self.keys: list[torch.Tensor | None] = [None] * len(widths)
        self.values: list[torch.Tensor | None] = [None] * len(widths)
        self.num_slots = 0  # slots handed out so far (the tensors catch up at their next write)
        self.free: list[int] = []

    def acquire(self) -> int:
        """A free slot for a new request (the lowest, so running requests stay on consecutive slots)."""
        if self.free:
            self.free.sort()
            return self.free.pop(0)
        self.num_slots += 1
        return self.num_slots - 1

    def release(self, slot: int) -> None:
        """Give a finished request's slot back; its stale K/V stays until overwritten (it is masked out)."""
        self.free.append(slot)

    def entry(self, index: int, like: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry `index`'s K and V, grown to hold every slot handed out and `length` positions."""
        keys = self.keys[index]
        if keys is None or keys.shape[1] < self.num_slots or keys.shape[3] < length:
            self.keys[index], self.values[index] = self._grow(index, like, length)
        return self.keys[index], self.values[index]

    def _grow(self, index: int, like: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[index], self.values[index]
        _, heads, _, dim = like.shape
        slots, capacity = max(self.num_slots, 1), max(self.min_capacity, length)
        if old_k is not None:
            slots = max(slots, 2 * old_k.shape[1]) if slots > old_k.shape[1] else old_k.shape[1]
            capacity = max(capacity, 2 * old_k.shape[3]) if length > old_k.shape[3] else old_k.shape[3]
        keys = like.new_zeros(self.widths[index], slots, heads, capacity, dim)
        values = like.new_zeros(self.widths[index], slots, heads, capacity, dim)
        if old_k is not None:
            s, t = old_k.shape[1], old_k.shape[3]
            keys[:, :s, :, :t] = old_k
            values[:, :s, :, :t] = old_v
        return keys, values


class BatchKV:
    """The pool as seen by one forward over G rows: row i is (module, slot, cached length, new positions).

    `update` stores row i's first q_lens[i] new positions at past_lens[i].. of its (module, slot) and
    returns the rows' K/V right-padded to max(past + q) positions. `entry` fixes the pool entry (the MCTP
    entry); by default it is the `layer_idx` transformers passes (backbone layer i = entry i).

    Several rows are written with one `index_copy_` into the entry seen as [modules * slots * heads *
    capacity, head_dim] rows; the flat row of each (row, head, position) is computed once per entry shape, so
    the layers of a forward share it. A row with fewer than Q new positions writes its padding too, past its
    new length: those positions are masked out on reading and overwritten when the row gets there, and
    writing them keeps the write a plain copy of the [G, heads, Q, D] states (capacity covers max(past) + Q).
    """

    def __init__(self, pool: KVPool, slots: list[int], past_lens: list[int], q_lens: list[int], device,
                 modules: list[int] | None = None, entry: int | None = None):
        G, Q = len(slots), max(q_lens)
        self.pool, self.entry, self.device = pool, entry, device
        self.modules = modules if modules is not None else [0] * G
        self.slots, self.past, self.q = slots, past_lens, q_lens
        self.total = max(p + q for p, q in zip(past_lens, q_lens))
        self.capacity = max(past_lens) + Q if G > 1 else self.total  # padding positions are written too
        first = (self.modules[0], slots[0])
        self.view = first if len(set(self.modules)) == 1 and slots == list(range(slots[0], slots[0] + G)) else None
        self._flat: tuple | None = None  # (entry shape, flat write rows) of the last entry written
        if G > 1 and self.view is None:
            self.read_index = tuple(torch.tensor([self.modules, slots], device=device))

    def _write_rows(self, keys: torch.Tensor) -> torch.Tensor:
        """Flat row index of every (row, head, position) of the forward in `keys` viewed as [-1, head_dim]."""
        if self._flat is not None and self._flat[0] == keys.shape:
            return self._flat[1]
        _, S, H, C, _ = keys.shape
        Q = max(self.q)
        base = [(m * S + s) * H * C + p for m, s, p in zip(self.modules, self.slots, self.past)]
        offsets = torch.arange(0, H * C, C, device=self.device)[:, None] + torch.arange(Q, device=self.device)
        flat = (torch.tensor(base, device=self.device)[:, None, None] + offsets).flatten()  # (G, H, Q) order
        self._flat = (keys.shape, flat)
        return flat

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.pool.entry(layer_idx if self.entry is None else self.entry, key_states, self.capacity)
        G, T = len(self.slots), self.total
        if G == 1:
            m, s, p, q = self.modules[0], self.slots[0], self.past[0], self.q[0]
            keys[m, s, :, p : p + q] = key_states[0, :, :q]
            values[m, s, :, p : p + q] = value_states[0, :, :q]
            return keys[m, s : s + 1, :, :T], values[m, s : s + 1, :, :T]
        flat, D = self._write_rows(keys), keys.shape[-1]  # [G, heads, Q, D] rows in (row, head, position) order
        keys.view(-1, D).index_copy_(0, flat, key_states.reshape(-1, D))
        values.view(-1, D).index_copy_(0, flat, value_states.reshape(-1, D))
        if self.view is not None:
            m, s = self.view
            return keys[m, s : s + G, :, :T], values[m, s : s + G, :, :T]
        m, s = self.read_index
        return keys[m, s, :, :T], values[m, s, :, :T]


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
    past, last = torch.tensor([past_lens, q_lens], device=device)[:, :, None, None]  # (G, 1, 1) each
    j = torch.arange(Q, device=device)[:, None]  # (Q, 1)
    p = torch.arange(total, device=device)  # (T_kv,)
    allowed = p <= past + torch.minimum(j, last - 1)  # (G, Q, T_kv)
    return torch.where(allowed[:, None], torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


class HiddenBuffer:
    """Rows [start, end) of a stream of final-normed hidden states ([rows, H]).

    Buffer 0 holds backbone outputs (consumed by MCTP module 0), buffer k+1 the outputs of module k
    (consumed by module k+1). Rows below the consumer's progress are dropped (`trim`), rows of rejected
    drafts are cut (`truncate`), so memory stays at the rows not yet consumed.

    The rows are kept as the chunks they were appended in (views of a step's output), not copied into one
    tensor: a consumer usually reads exactly the chunk its producer wrote in the previous step, which is then
    a view, and appending costs nothing per step.
    """

    def __init__(self):
        self.start = 0  # first held row
        self.chunks: list[tuple[int, torch.Tensor]] = []  # (first row, rows [n, H]), consecutive

    @property
    def end(self) -> int:
        if not self.chunks:
            return self.start
        first, rows = self.chunks[-1]
        return first + rows.shape[0]

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[0]:
            self.chunks.append((self.end, rows))

    def get(self, first: int, last: int) -> torch.Tensor:
        """Rows first..last-1 -> [last - first, H]."""
        if first < self.start or last > self.end or first >= last:
            raise RuntimeError(f"hidden rows [{first}, {last}) not held (buffer has [{self.start}, {self.end}))")
        pieces = []
        for c0, rows in self.chunks:
            c1 = c0 + rows.shape[0]
            if c1 <= first or c0 >= last:
                continue
            pieces.append(rows if c0 >= first and c1 <= last else rows[max(first - c0, 0) : min(last, c1) - c0])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def trim(self, first_needed: int) -> None:
        first_needed = min(first_needed, self.end)
        if first_needed <= self.start:
            return
        self.start = first_needed
        while self.chunks and self.chunks[0][0] + self.chunks[0][1].shape[0] <= first_needed:
            self.chunks.pop(0)  # chunks partly below `start` stay whole; `get` never reads below it

    def truncate(self, end: int) -> None:
        if end >= self.end:
            return
        if end <= self.start:  # every held row was rejected; the producer recomputes from `end`
            self.start, self.chunks = end, []
            return
        while self.chunks and self.chunks[-1][0] >= end:
            self.chunks.pop()
        c0, rows = self.chunks[-1]
        self.chunks[-1] = (c0, rows[: end - c0])
