"""The LLM engine (`DecodeEngine`): LLM + MCTP decoding of batched requests with streaming events (spec §3.1-§3.3).

One engine step gives every active request exactly one forward: a backbone forward (prefill, a single new
token, or the multi-token catch-up over tokens the MCTP modules produced since the last backbone call) or
one MCTP module forward. Which one comes from the request's schedule (`mtp_inference_mode`, e.g. Boost
[1, 10, 4, 10] = "M mmmmmmmmmm MMMM mmmmmmmmmm ..."), exactly as the original model's `generate`:

- 'M': the backbone ingests every token it has not seen and predicts the next one.
- 'm': the next module of the burst (0 after an 'M', then 1, 2, ...) predicts from the backbone's last
  position; it first catches up every row it has not processed (its cache covers the whole history).
  A burst longer than the number of modules N falls back to a backbone step and restarts at module 0.
- MCTP tokens are emitted unverified (the original behaviour). With `mode="exact"` (or `verify=True`) the
  modules only draft: the backbone's next catch-up chunk checks the drafts, keeps the longest prefix equal to
  its own choices plus its own token at the first difference, and the caches are rolled back past it.
  `verify=True` drafts as many tokens as the schedule's next 'm' run; "exact" adapts the draft length to
  the acceptance (so a model whose drafts never agree runs at about Vanilla's cost).
  Greedy output is then identical to Vanilla with fewer backbone forwards; sampled output has exactly the
  backbone's distribution.

A step runs at most two right-padded forwards, whatever the batch (plus the pieces' forwards below): one for
every request whose next action is the backbone (prefill, one token or a catch-up), one for every request on
an MCTP module. Requests that joined at different times sit at different points of their schedules, so the
second forward mixes modules (`model.run_mtp_modules`: per-module weights on each module's rows, attention
shared). Masks are explicit bottom-right-aligned causal masks with per-row position ids, through transformers'
own sdpa / eager attention; K/V live in one pool (`pipeline.kv_cache`). Requests join (`add_request`) and leave
between steps.

Chunked prefill (`prefill_chunk_tokens`, as chunked prefill in vLLM): a prompt longer than the chunk is read in
pieces, one per step, each appended to the request's KV slot, while the other requests go on decoding; its
first token comes with its last piece. The MCTP modules' catch-up over such a prompt runs in pieces too (a
module has one layer against the backbone's L, so a module piece holds L times the rows). The pieces of a step
share one budget (what the chunk costs from position 0, less the short prompts read whole in that step; a row
deep into a long prompt costs more, as it attends to more positions; prefills first, then the oldest request)
and run as forwards of their own ("prefill", "prefill-mtp<k>"), so the one-token rows of the others are not
padded to a piece's length. Ids are those of an unchunked run: a piece is the same causal attention over the
same positions. A prompt that does not fit the model's positions beside its `max_new_tokens` is refused by
`add_request`.
"""
from __future__ import annotations

import math
import operator
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.engine.admission import joins_now
from pipeline.engine.kv_cache import BatchKV, KVPool, group_attention_mask
from pipeline.tokens.layout import default_layout
from pipeline.engine.observe import StepObserver
from pipeline.engine.schedules import EXACT
from pipeline.engine.requests import AudioChunkEvent, EndEvent, GenerationRequest, TokenEvent, check_prompt_ids
from pipeline.engine.sampling import CONSTRAINTS, OutputConstraint, SamplingParams, TokenSampler, choose_batch
from pipeline.engine.schedules import resolve_mode
from pipeline.engine.sequence import SequenceState
from pipeline.tokens.chat import BOOST_RATIO, MODES, check_ratio
from pipeline.tokens.vocab import TokenLayout

__all__ = ["DecodeEngine", "PREFILL_CHUNK_TOKENS", "default_prefill_chunk"]

# Prompt tokens read per step by default ("auto"), by device type: a chunk should cost about one decode step
# of a busy batch. On a GPU a decode step is bound by reading the weights, and ~256 tokens of compute take about
# as long on an H100 (bf16 FLOPs / memory bandwidth ~ 300 FLOP per byte; not measured here). On a CPU, where
# compute binds already, 64: benchmarks/prefill.md measures another client's time to first token with a
# maximum-length prompt in flight at about 1.5x its time without it (128: 1.8x, 256: 4x, unchunked: 26x).
PREFILL_CHUNK_TOKENS = {"cuda": 256, "cpu": 64}


def default_prefill_chunk(device) -> int:
    """The "auto" `prefill_chunk_tokens` of a device."""
    return PREFILL_CHUNK_TOKENS.get(torch.device(device).type, PREFILL_CHUNK_TOKENS["cpu"])

@dataclass
class _Forward:
    """One group forward of a step: its requests, per-row query lengths and first positions, outputs, and
    the hidden states to score (`last`); `modules` is None for the backbone group."""

    group: list
    q_lens: list[int]
    starts: list[int]  # backbone: cached length before the step; MCTP: first row each module catches up
    out: torch.Tensor  # (G, Q, H)
    last: torch.Tensor  # (rows to score, H)
    modules: list[int] | None = None
    first_row: int = 0  # of this group's rows in the step's logits
    final: list[bool] | None = None  # per request: chooses a token (False: a piece of a long prefill / catch-up)

    def __post_init__(self):
        if self.final is None:
            self.final = [True] * len(self.group)

    def outputs(self) -> list[torch.Tensor]:
        """Row i's real outputs [q_lens[i], H] (views; one op for the whole group)."""
        Q = self.out.shape[1]
        return [o if q == Q else o[:q] for o, q in zip(self.out.unbind(0), self.q_lens)]


def _attention_width(config) -> float:
    """Positions a row attends to that cost as much as the row's dense work in a layer (Q/K/V/O projections and
    the MLP; multiply-adds): about 290 for the tiny model, 1200 for "small", 32500 for the 7B."""
    H, heads = config.hidden_size, config.num_attention_heads
    dim = getattr(config, "head_dim", None) or H // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    dense = 2 * H * heads * dim + 2 * H * kv * dim + 3 * H * config.intermediate_size
    return dense / (2 * heads * dim)  # attention: Q.K and weights.V per attended position


class DecodeEngine:
    """Batched LLM + MCTP decoding with streaming events (see the module docstring).

    `device` / `dtype` move the model if given (bf16 on GPU for real checkpoints, float32 on CPU).
    `observer` (a `pipeline.observe.StepObserver`) is told about every forward, request and step: traces,
    profiles and benchmarks watch the engine through it. `prefill_chunk_tokens` reads a longer prompt in pieces
    between the others' steps (see the module docstring): "auto" (`PREFILL_CHUNK_TOKENS` of the device), a
    number of tokens, or 0 / None (off: a prompt in one forward).
    """

    def __init__(
        self,
        model,
        layout: TokenLayout | None = None,
        device=None,
        dtype=None,
        max_batch_size: int = 16,
        align_steps: int = 0,
        observer: StepObserver | None = None,
        prefill_chunk_tokens: int | str | None = "auto",
    ):
        chunk = prefill_chunk_tokens
        if chunk is not None and chunk != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
            raise ValueError(f"prefill_chunk_tokens must be an integer >= 0 (0 or None: off) or 'auto', got {chunk!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not isinstance(align_steps, int) or align_steps < 0:
            raise ValueError(f"align_steps must be an integer >= 0, got {align_steps!r}")
        self.align_steps = align_steps
        param = next(model.parameters())
        moved = device is not None and torch.device(device) != param.device
        if moved or (dtype is not None and dtype != param.dtype):
            model = model.to(device=device or param.device, dtype=dtype or param.dtype)
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.prefill_chunk_tokens = default_prefill_chunk(self.device) if chunk == "auto" else chunk or 0
        self._attention_width = _attention_width(model.config)
        self._step_budget = model.num_backbone_layers * self._rows_cost(0, self.prefill_chunk_tokens)
        self.layout = layout if layout is not None else default_layout(model)
        self.max_batch_size = max_batch_size
        self.observer = observer
        self.num_modules = model.num_mtp_modules
        self.mtp_names = [f"mtp{k}" for k in range(self.num_modules)]  # producer of each module's tokens
        self.num_backbone = model.num_backbone_layers
        self.num_layers = model.config.num_hidden_layers
        self.vocab_size = model.config.vocab_size
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self._arrivals = 0
        self.reset()

    def reset(self) -> None:
        """Drop every request and cache (after a failed step left the engine in an unknown state)."""
        self.waiting: list[SequenceState] = []
        self.active: list[SequenceState] = []
        self._paused: dict[str, SequenceState] = {}  # taken out of the batch with their caches (see pause)
        self._ended: list[EndEvent] = []
        # one pool entry per backbone layer, one for all MCTP modules (entry num_backbone)
        self.kv = KVPool([1] * self.num_backbone + [self.num_modules], min_capacity=128)

    # --- requests -----------------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> str:
        """Validate and queue a request; it joins the batch at the next step. Returns its id."""
        if not isinstance(request, GenerationRequest):
            raise ValueError(f"request must be a GenerationRequest, got {type(request).__name__}")
        request.prompt_ids = check_prompt_ids(request.prompt_ids, self.vocab_size)
        mnt = request.max_new_tokens
        if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {mnt!r}")
        n, positions = len(request.prompt_ids), self.max_positions
        if positions is not None and n + mnt > positions:
            raise ValueError(f"prompt of {n} tokens with max_new_tokens={mnt} does not fit the model's {positions} "
                             f"positions (max_position_embeddings): at most {max(positions - mnt, 0)} prompt tokens")
        if not isinstance(request.sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(request.sampling).__name__}")
        mode = resolve_mode(request.mode, self.model)
        verify = mode == EXACT or bool(request.verify)
        if request.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {request.constraint!r}")
        stop_ids = self.layout.eos_ids if request.stop_ids is None else request.stop_ids
        try:
            stop_ids = frozenset(operator.index(t) for t in stop_ids)
        except TypeError:
            raise ValueError(f"stop_ids must be a list of integers, got {request.stop_ids!r}") from None
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if any(s.id == request.request_id for s in (*self.waiting, *self.active)):
            raise ValueError(f"request_id {request.request_id!r} is already running")
        constraint = None
        if request.constraint is not None:
            ratio = request.constraint_ratio
            if ratio is None:
                mtp_modes = [MODES[n] for n in ("balance", "boost", "turbo")]
                ratio = mode if mode != EXACT and list(mode) in mtp_modes else list(BOOST_RATIO)
            ratio = check_ratio(ratio)
            constraint = OutputConstraint(request.constraint, self.layout, self.vocab_size, self.device, ratio)
        sampler = TokenSampler(request.sampling, self.device, constraint)
        seq = SequenceState(request, mode, verify, sampler, stop_ids, self.num_modules, self.device)
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request and free its caches; its EndEvent(reason="aborted") comes with the next step."""
        seq = self._paused.pop(request_id, None)
        if seq is None:
            seq = self._take(request_id, (self.waiting, self.active))
        if seq is not None:
            self._ended.append(EndEvent(seq.id, "aborted", seq.usage()))
            self._free(seq)
            if self.observer is not None:
                self.observer.on_abort(seq.id)

    def pause(self, request_id: str) -> bool:
        """Take a running request out of the batch, keeping its caches (e.g. its consumer is behind); the
        others go on. False if it is not running."""
        seq = self._take(request_id, (self.active, self.waiting))
        if seq is not None:
            self._paused[request_id] = seq
        return seq is not None

    def resume(self, request_id: str) -> bool:
        """Put a paused request back, at the front of the queue; False if it is not paused."""
        seq = self._paused.pop(request_id, None)
        if seq is not None:
            self.waiting.insert(0, seq)
        return seq is not None

    def running_ids(self) -> list[str]:
        """Requests in the batch or waiting for it (not paused), batch first."""
        return [seq.id for seq in self.active] + [seq.id for seq in self.waiting]

    def paused_ids(self) -> list[str]:
        """Paused requests, in the order they were paused."""
        return list(self._paused)

    def next_batch_size(self) -> int:
        """How many requests the next step runs."""
        return min(len(self.active) + len(self.waiting), self.max_batch_size)

    @staticmethod
    def _take(request_id: str, queues) -> "SequenceState | None":
        for queue in queues:
            for seq in queue:
                if seq.id == request_id:
                    queue.remove(seq)
                    return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.active or self._ended)

    # --- stepping -----------------------------------------------------------------------------------------
    def step(self) -> list:
        """One engine step: every active request runs one forward. Returns the events in order."""
        events: list = list(self._ended)
        self._ended.clear()
        if self.waiting and len(self.active) < self.max_batch_size:
            admitted = False
            for seq in list(self.waiting):
                if len(self.active) >= self.max_batch_size:
                    break
                if seq.slot is None and not joins_now(seq, self.active, self.waiting, self.align_steps, self.num_modules,
                                                      prefill_chunk=self.prefill_chunk_tokens):
                    seq.waited += 1
                    continue
                self.waiting.remove(seq)
                if seq.slot is None:  # new; a request paused by its server comes back with its slot
                    seq.slot = self.kv.acquire()
                self.active.append(seq)
                admitted = True
            if admitted:
                self.active.sort(key=lambda s: s.slot)  # groups on consecutive slots read the pool without a copy
        if not self.active:
            if self.observer is not None and events:
                self.observer.on_step(events)
            return events
        actions = {seq.id: seq.next_action(self.num_modules) for seq in self.active}
        long, taken = self._plan_pieces(actions)
        backbone, mtp, modules = [], [], []
        pieces: list[tuple[SequenceState, int, int, bool]] = []  # (request, action, rows, last piece)
        for seq in self.active:  # slot order: groups on consecutive slots read the pool without a copy
            k = actions[seq.id]
            if seq.id in long:
                if seq.id in taken:
                    pieces.append((seq, k, *taken[seq.id]))
            elif k < 0:
                backbone.append(seq)
            else:
                mtp.append(seq)
                modules.append(k)
        with torch.inference_mode():
            self._run_step(backbone, mtp, modules, pieces, events)
        self.active = [s for s in self.active if s.finished is None]
        if self.observer is not None:
            self.observer.on_step(events)
        return events

    def stream(self, request: GenerationRequest) -> Iterator:
        """Add one request and yield its events until it ends (for an engine serving only this request:
        events of other requests that run alongside are dropped)."""
        rid = self.add_request(request)
        while True:
            for event in self.step():
                if event.request_id == rid:
                    yield event
                    if isinstance(event, EndEvent):
                        return

    # --- forwards -----------------------------------------------------------------------------------------
    def _observed(self, kind: str, G: int, Q: int, fn):
        return fn() if self.observer is None else self.observer.on_forward(kind, G, Q, fn)

    def _record(self, seq: SequenceState, producer: str, q_len: int, pos_first: int, logits: torch.Tensor | None) -> None:
        logits = logits if self.observer.record_logits and not seq.verify else None  # None: a piece chooses nothing
        self.observer.on_request_forward(seq.id, producer, q_len, pos_first, logits)

    def _pad(self, rows: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows and their first rotary positions -> right-padded ids and position ids [G, Q]."""
        lens = [len(r) for r in rows]
        Q = max(lens)
        ids = torch.tensor([r + [0] * (Q - len(r)) for r in rows], dtype=torch.long, device=self.device)
        first = torch.tensor(starts, device=self.device)[:, None]  # (G, 1)
        pos = first + torch.arange(Q, device=self.device)  # (G, Q)
        if min(lens) < Q:  # padding repeats the row's last position
            pos = torch.minimum(pos, first + torch.tensor(lens, device=self.device)[:, None] - 1)
        return ids, pos

    def _free(self, seq: SequenceState) -> None:
        """Release a request's KV slot and hidden buffers (it leaves the batch after this step)."""
        if seq.slot is not None:
            self.kv.release(seq.slot)
            seq.slot = None
        seq.hidden = None

    # --- pieces of long work (chunked prefill) --------------------------------------------------------------
    def _rows_cost(self, past: int, rows: int) -> float:
        """Cost of rows past..past+rows-1 on one layer, in rows of dense work (projections and MLP): row t also
        attends to t + 1 positions, and `_attention_width` attended positions cost one row's dense work."""
        return rows * (1 + (past + 0.5) / self._attention_width) + rows * rows / (2 * self._attention_width)

    def _rows_within(self, past: int, work: int, budget: float) -> int:
        """The most rows (<= work) from position `past` whose cost on one layer fits `budget`."""
        if budget <= 0:
            return 0
        W, a = self._attention_width, 1 + (past + 0.5) / self._attention_width
        rows = min(work, max(int(W * (math.sqrt(a * a + 2 * budget / W) - a)), 0))
        while rows < work and self._rows_cost(past, rows + 1) <= budget:  # float rounding either way
            rows += 1
        while rows > 0 and self._rows_cost(past, rows) > budget:
            rows -= 1
        return rows

    def _long_work(self, seq: SequenceState, k: int) -> int | None:
        """Rows left of a long prefill (k < 0: a prompt over the chunk) or of a long MCTP catch-up (module k:
        more than a step's budget) that runs in pieces, else None (the step's usual backbone / MCTP forward)."""
        chunk = self.prefill_chunk_tokens
        if not chunk:
            return None
        if k < 0:
            work = seq.prompt_len - seq.bb_len
            long = seq.prompt_len > chunk and work > 0
        else:
            work = seq.bb_len - seq.mod_len[k]
            long = self._rows_within(seq.mod_len[k], work, self._step_budget) < work
        return work if long or k in seq.piecewise else None

    def _plan_pieces(self, actions: dict) -> tuple[dict, dict]:
        """Which requests have long work this step ({id: rows left}) and the pieces that run ({id: (rows, last)}).

        A step's pieces share one budget: what `prefill_chunk_tokens` prompt tokens from position 0 cost on the
        backbone, less the prompts read whole in this step (a short prompt is never delayed). A row's cost grows
        with the positions it attends to, so a piece deep into a long prompt holds fewer rows and every piece
        costs about the same. Prefills go before catch-ups (first tokens first), then the oldest request; the
        first piece of a step gets at least chunk / 8 rows, so a long prompt always moves on."""
        long = {s.id: work for s in self.active if (work := self._long_work(s, actions[s.id])) is not None}
        if not long:
            return long, {}
        NB = self.num_backbone
        budget = self._step_budget - NB * sum(self._rows_cost(s.bb_len, s.prompt_len - s.bb_len) for s in self.active
                                              if s.id not in long and s.bb_len < s.prompt_len)
        least = max(1, self.prefill_chunk_tokens // 8)
        taken: dict[str, tuple[int, bool]] = {}
        for seq in sorted((s for s in self.active if s.id in long), key=lambda s: (actions[s.id] >= 0, s.arrival)):
            k, work = actions[seq.id], long[seq.id]
            past, layers = (seq.bb_len, NB) if k < 0 else (seq.mod_len[k], 1)  # a module is one layer
            rows = self._rows_within(past, work, budget / layers)
            if not taken and budget >= self._step_budget:
                rows = max(rows, min(work, least))
            if rows > 0:  # else it waits for a step with budget left
                budget -= layers * self._rows_cost(past, rows)
                (seq.piecewise.discard if rows == work else seq.piecewise.add)(k)
                taken[seq.id] = (rows, rows == work)
        return long, taken

    def _run_step(self, backbone: list[SequenceState], mtp: list[SequenceState], modules: list[int],
                  pieces: list, events: list) -> None:
        """The pieces' forwards (long prefills, long MCTP catch-ups), the backbone forward and the MCTP forward,
        then one lm_head and one token choice over the rows that choose a token (a step's fixed costs are paid
        once, not per group), then each request's bookkeeping."""
        parts = []
        prefill = [(s, rows, last) for s, k, rows, last in pieces if k < 0]
        catchup = [(s, k, rows, last) for s, k, rows, last in pieces if k >= 0]
        if prefill:
            parts.append(self._backbone_forward([p[0] for p in prefill], [p[1] for p in prefill], [p[2] for p in prefill]))
        if backbone:
            parts.append(self._backbone_forward(backbone))
        if catchup:
            parts.append(self._mtp_forward([p[1] for p in catchup], [p[0] for p in catchup], [p[2] for p in catchup],
                                           [p[3] for p in catchup]))
        if mtp:
            parts.append(self._mtp_forward(modules, mtp))
        lasts = [part.last for part in parts if part.last.shape[0]]
        group, choice_rows, row = [], [], 0
        for part in parts:  # a verifying backbone row has 1 + #drafts logits rows; it chooses from the last
            part.first_row = row
            for seq, final in zip(part.group, part.final):
                if final:
                    row += len(seq.drafts) + 1 if part.modules is None else 1
                    group.append(seq)
                    choice_rows.append(row - 1)
        logits, chosen = None, []
        if lasts:
            last = lasts[0] if len(lasts) == 1 else torch.cat(lasts)  # (rows, H)
            lo, hi = self._choice_range(group)  # scores for ids lo..hi-1 only
            logits = self._observed("lm_head", last.shape[0], 1, lambda: self.model.decode_logits(last, lo, hi))
            if len(choice_rows) < logits.shape[0]:
                chosen = self._choose_unverified(group, logits[torch.tensor(choice_rows, device=logits.device)])
            else:
                chosen = self._choose_unverified(group, logits, lo)
        first = 0
        for part in parts:
            n = sum(part.final)
            rows = logits[part.first_row :] if logits is not None else None
            if part.modules is None:
                self._backbone_done(part, rows, chosen[first : first + n], events)
            else:
                self._mtp_done(part, rows, chosen[first : first + n], events)
            first += n

    def _choice_range(self, group: list[SequenceState]) -> tuple[int, int]:
        """The ids [lo, hi) a step needs lm_head scores for: when every row is a plain greedy choice under an
        output constraint (no drafts to verify, no penalty, no logits trace), the union of the ids its slot allows
        (a TTS step on audio slots: the codebook; on BOA: one id); else the whole vocabulary. The choice is
        the same: ids outside a slot's range are never chosen."""
        if self.observer is not None and self.observer.record_logits:
            return 0, self.vocab_size
        lo, hi = self.vocab_size, 0
        for seq in group:
            sampler = seq.sampler
            if seq.verify or sampler.constraint is None or not sampler.params.greedy or sampler.penalty is not None:
                return 0, self.vocab_size
            slot_lo, slot_hi, _ = sampler.constraint.ranges[sampler.constraint.slot(seq.generated)]
            lo, hi = min(lo, slot_lo), max(hi, slot_hi)
        return lo, hi

    def _backbone_forward(self, group: list[SequenceState], takes: list[int] | None = None,
                          final: list[bool] | None = None) -> "_Forward":
        """One backbone forward over the group's new tokens (and drafts to verify); with `takes`, pieces of long
        prefills: `takes[i]` prompt tokens of request i, which chooses a token only if `final[i]` (its last piece)."""
        model = self.model
        if takes is None:
            rows = [s.tokens[s.bb_len :] + s.drafts for s in group]
        else:
            rows = [s.tokens[s.bb_len : s.bb_len + t] for s, t in zip(group, takes)]
        final = final if final is not None else [True] * len(group)
        q_lens = [len(r) for r in rows]
        past = [s.bb_len for s in group]
        ids, pos = self._pad(rows, past)
        mask = group_attention_mask(past, q_lens, self.dtype, self.device)
        cache = BatchKV(self.kv, [s.slot for s in group], past, q_lens, self.device)
        drafting = any(s.drafts for s in group)

        def forward():
            hidden = model.run_backbone(model.model.embed_tokens(ids), pos, mask, cache)  # (G, Q, H)
            # hidden states to score: each row's last position, or its last 1 + #drafts positions when verifying
            if not drafting and min(q_lens) == max(q_lens) and all(final):
                return hidden, hidden[:, -1]  # (G, H)
            picks = [  # (row, position)
                (i, q - 1 - len(s.drafts) + j)
                for i, (s, q) in enumerate(zip(group, q_lens)) if final[i]
                for j in range(len(s.drafts) + 1)
            ]
            if not picks:
                return hidden, hidden.new_zeros(0, hidden.shape[-1])
            index = torch.tensor(picks, device=self.device)
            return hidden, hidden[index[:, 0], index[:, 1]]  # (rows picked, H)

        kind = "backbone" if takes is None else "prefill"
        hidden, last = self._observed(kind, len(group), max(q_lens), forward)
        return _Forward(group, q_lens, past, hidden, last, final=final)

    def _backbone_done(self, part: "_Forward", logits: torch.Tensor | None, chosen: list, events: list) -> None:
        row, c = 0, 0  # logits row, index in `chosen` (requests that choose a token)
        outputs = part.outputs() if any(seq.hidden[0] is not None for seq in part.group) else None
        for i, seq in enumerate(part.group):
            q = part.q_lens[i]
            seq.backbone_calls += 1
            seq.backbone_positions += q
            if seq.hidden[0] is not None:
                seq.hidden[0].append(outputs[i])
            if not part.final[i]:  # a piece of a long prefill: cached, nothing chosen yet
                seq.bb_len += q
                if self.observer is not None:
                    self._record(seq, "backbone", q, part.starts[i], None)
                continue
            n_logits = len(seq.drafts) + 1
            row += n_logits
            if self.observer is not None:
                self._record(seq, "backbone", q, part.starts[i], logits[row - 1])
            if seq.verify:
                self._verify(seq, logits[row - n_logits : row], events)
            else:
                seq.bb_len += q
                seq.chain_k = -1
                self._emit(seq, chosen[c], "backbone", events)
            c += 1

    def _mtp_forward(self, modules: list[int], group: list[SequenceState], takes: list[int] | None = None,
                     final: list[bool] | None = None) -> "_Forward":
        """Every request whose next action is an MCTP module, in one forward; request i runs modules[i]. With
        `takes`, pieces of long catch-ups: `takes[i]` rows, choosing a token only if `final[i]`."""
        model = self.model
        final = final if final is not None else [True] * len(group)
        firsts = [s.mod_len[k] for s, k in zip(group, modules)]
        ends = [s.bb_len for s in group]  # rows first..B-1, B = backbone positions
        if takes is not None:
            ends = [f + t for f, t in zip(firsts, takes)]
        q_lens = [b - f for f, b in zip(firsts, ends)]
        # row t of module k consumes token t+k+1 at rotary position t+k+1
        rows = [s.window(f + k + 1, b + k + 1) for s, k, f, b in zip(group, modules, firsts, ends)]
        ids, pos = self._pad(rows, [f + k + 1 for k, f in zip(modules, firsts)])
        G, Q = ids.shape
        h_rows = [s.hidden[k].get(f, b) for s, k, f, b in zip(group, modules, firsts, ends)]  # each (q_i, H)
        if min(q_lens) == Q:
            h_in = torch.stack(h_rows)  # (G, Q, H)
        else:
            h_in = torch.nn.utils.rnn.pad_sequence(h_rows, batch_first=True)  # right-padded with zeros
        mask = group_attention_mask(firsts, q_lens, self.dtype, self.device)
        cache = BatchKV(self.kv, [s.slot for s in group], firsts, q_lens, self.device, modules=modules,
                        entry=self.num_backbone)

        def forward():
            out = model.run_mtp_modules(modules, h_in, model.model.embed_tokens(ids), pos, mask, cache)  # (G, Q, H)
            if all(final):
                if min(q_lens) == Q:
                    return out, out[:, -1]
                return out, out[torch.arange(G, device=self.device), torch.tensor(q_lens, device=self.device) - 1]
            rows = [i for i in range(G) if final[i]]
            return out, out[torch.tensor(rows, dtype=torch.long, device=self.device),
                            torch.tensor([q_lens[i] - 1 for i in rows], dtype=torch.long, device=self.device)]

        kind = ("mtp" if takes is None else "prefill-mtp") + ",".join(str(k) for k in sorted(set(modules)))
        out, last = self._observed(kind, G, Q, forward)
        return _Forward(group, q_lens, firsts, out, last, modules, final=final)

    def _mtp_done(self, part: "_Forward", logits: torch.Tensor | None, chosen: list, events: list) -> None:
        outputs = part.outputs()
        c = 0  # index of the request among those that choose a token (rows of `logits` and `chosen`)
        for i, (seq, k) in enumerate(zip(part.group, part.modules)):
            q, end = part.q_lens[i], part.starts[i] + part.q_lens[i]
            seq.mtp_calls[k] += 1
            seq.mtp_positions[k] += q
            seq.mod_len[k] = end
            seq.hidden[k].trim(end - seq.hidden_slack)
            if k + 1 < self.num_modules and seq.hidden[k + 1] is not None:
                seq.hidden[k + 1].append(outputs[i])
            if not part.final[i]:  # a piece of a long catch-up: the module's cache grew, nothing chosen yet
                if self.observer is not None:
                    self._record(seq, self.mtp_names[k], q, part.starts[i] + k + 1, None)
                continue
            if self.observer is not None:
                self._record(seq, self.mtp_names[k], q, part.starts[i] + k + 1, logits[c])
            L = len(seq.tokens)
            if seq.verify:
                index = L + len(seq.drafts)
                draft = seq.sampler.draft(seq.prefix(index), logits[c : c + 1], index - seq.prompt_len)
                if seq.ids is not None:
                    seq.ids[0, index] = draft
                seq.drafts.append(draft)
                seq.drafted += 1
            else:
                seq.chain_k = k
                self._emit(seq, chosen[c], self.mtp_names[k], events)
            c += 1

    def _choose_unverified(self, group: list[SequenceState], logits: torch.Tensor, offset: int = 0) -> list[int | None]:
        """The next token of every unverified request of a group (logits [G, V], one row each; with `offset`,
        [G, W] over ids offset..offset+W-1) in one go; None for verifying requests, which choose in `_verify`."""
        rows = [i for i, s in enumerate(group) if not s.verify]
        chosen: list[int | None] = [None] * len(group)
        if rows:
            tokens = choose_batch(
                [group[i].sampler for i in rows],
                [group[i].prefix(len(group[i].tokens)) for i in rows],
                logits if len(rows) == len(group) else logits[rows],
                [group[i].generated for i in rows],
                offset,
            )
            for i, token in zip(rows, tokens):
                chosen[i] = token
        return chosen

    def _verify(self, seq: SequenceState, logits: torch.Tensor, events: list) -> None:
        """Accept the longest prefix of drafts equal to the backbone's own choices, plus its next token.

        logits [d+1, V]: row j is the backbone at the position of draft j-1 (row 0: of the last committed
        token), so it predicts the position of draft j. Caches are cut back past the first rejection.
        """
        L, drafts = len(seq.tokens), seq.drafts
        accepted = 0
        for j in range(len(drafts) + 1):
            token = seq.sampler.choose(seq.prefix(L + j), logits[j : j + 1], L + j - seq.prompt_len)
            if j < len(drafts) and token == drafts[j]:
                accepted += 1
                continue
            break
        seq.verify_calls += 1 if drafts else 0  # backbone forwards that checked at least one draft
        seq.accepted_drafts += accepted
        if drafts and seq.mode == EXACT:
            seq.adapt_draft_length(len(drafts), accepted, self.num_modules)
        # backbone keeps positions 0..L+accepted-1 (committed tokens and accepted drafts); the KV pool needs
        # no cut: positions past a length are masked out and overwritten by the next writes
        seq.bb_len = L + accepted
        if seq.hidden[0] is not None:
            seq.hidden[0].truncate(seq.bb_len)
        # module j row t consumed tokens up to t+j+1: valid iff t+j+1 <= L+accepted-1
        for j in range(self.num_modules):
            valid = max(0, min(seq.mod_len[j], L + accepted - j - 1))
            if valid < seq.mod_len[j]:
                seq.mod_len[j] = valid
                if j + 1 < self.num_modules and seq.hidden[j + 1] is not None:
                    seq.hidden[j + 1].truncate(valid)
        emitted = [(d, self.mtp_names[j]) for j, d in enumerate(drafts[:accepted])] + [(token, "backbone")]
        seq.drafts = []
        for tok, producer in emitted:
            self._emit(seq, tok, producer, events)
            if seq.finished is not None:
                return
        seq.set_draft_target(self.num_modules)

    def _emit(self, seq: SequenceState, token: int, producer: str, events: list) -> None:
        layout = self.layout
        if seq.ids is not None:
            seq.ids[0, len(seq.tokens)] = token
        seq.tokens.append(token)
        is_audio = layout.is_audio(token)
        events.append(TokenEvent(seq.id, token, is_audio, producer))
        if is_audio:
            seq.pending_codes.append(token - layout.audio_offset)
        elif token == layout.eoa and seq.pending_codes:
            events.append(AudioChunkEvent(seq.id, seq.pending_codes))
            seq.pending_codes = []
        if token in seq.stop_ids:
            self._finish(seq, "stop", events)
        elif seq.generated >= seq.max_new:
            self._finish(seq, "length", events)

    def _finish(self, seq: SequenceState, reason: str, events: list) -> None:
        if seq.pending_codes:  # the stream ended inside an audio span: flush what was decoded so far
            events.append(AudioChunkEvent(seq.id, seq.pending_codes))
            seq.pending_codes = []
        seq.finished = reason
        if self.observer is not None:
            self.observer.on_finish(seq.id, [seq.bb_len, *seq.mod_len])  # rows of backbone / module outputs
        events.append(EndEvent(seq.id, reason, seq.usage()))
        self._free(seq)
