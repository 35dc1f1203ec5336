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

A step runs at most two right-padded forwards, whatever the batch: one for every request whose next action
is the backbone (prefill, one token or a catch-up), one for every request on an MCTP module. Requests that
joined at different times sit at different points of their schedules, so the second forward mixes modules
(`model.run_mtp_modules`: per-module weights on each module's rows, attention shared). Masks are explicit
bottom-right-aligned causal masks with per-row position ids, through transformers' own sdpa / eager
attention; K/V live in one pool (`pipeline.kv_cache`). Requests join (`add_request`) and leave between steps.
"""
from __future__ import annotations

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

__all__ = ["DecodeEngine"]

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

    def outputs(self) -> list[torch.Tensor]:
        """Row i's real outputs [q_lens[i], H] (views; one op for the whole group)."""
        Q = self.out.shape[1]
        return [o if q == Q else o[:q] for o, q in zip(self.out.unbind(0), self.q_lens)]


class DecodeEngine:
    """Batched LLM + MCTP decoding with streaming events (see the module docstring).

    `device` / `dtype` move the model if given (bf16 on GPU for real checkpoints, float32 on CPU).
    `observer` (a `pipeline.observe.StepObserver`) is told about every forward, request and step: traces,
    profiles and benchmarks watch the engine through it.
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
    ):
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
        self.layout = layout if layout is not None else default_layout(model)
        self.max_batch_size = max_batch_size
        self.observer = observer
        self.num_modules = model.num_mtp_modules
        self.mtp_names = [f"mtp{k}" for k in range(self.num_modules)]  # producer of each module's tokens
        self.num_backbone = model.num_backbone_layers
        self.num_layers = model.config.num_hidden_layers
        self.vocab_size = model.config.vocab_size
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
        self.waiting.append(SequenceState(request, mode, verify, sampler, stop_ids, self.num_modules, self.device))
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
                if seq.slot is None and not joins_now(seq, self.active, self.waiting, self.align_steps, self.num_modules):
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
        backbone, mtp, modules = [], [], []
        for seq in self.active:
            k = seq.next_action(self.num_modules)
            if k < 0:
                backbone.append(seq)
            else:
                mtp.append(seq)
                modules.append(k)
        with torch.inference_mode():
            self._run_step(backbone, mtp, modules, events)
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

    def _record(self, seq: SequenceState, producer: str, q_len: int, pos_first: int, logits: torch.Tensor) -> None:
        logits = logits if self.observer.record_logits and not seq.verify else None
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

    def _run_step(self, backbone: list[SequenceState], mtp: list[SequenceState], modules: list[int], events: list) -> None:
        """The backbone forward and the MCTP forward, then one lm_head and one token choice over all their
        rows (a step's fixed costs are paid once, not per group), then each request's bookkeeping."""
        parts = []
        if backbone:
            parts.append(self._backbone_forward(backbone))
        if mtp:
            parts.append(self._mtp_forward(modules, mtp))
        last = parts[0].last if len(parts) == 1 else torch.cat([part.last for part in parts])  # (rows, H)
        group, choice_rows, row = [], [], 0
        for part in parts:  # a verifying backbone row has 1 + #drafts logits rows; it chooses from the last
            part.first_row = row
            for seq in part.group:
                row += len(seq.drafts) + 1 if part.modules is None else 1
                group.append(seq)
                choice_rows.append(row - 1)
        lo, hi = self._choice_range(group)  # scores for ids lo..hi-1 only
        logits = self._observed("lm_head", last.shape[0], 1, lambda: self.model.decode_logits(last, lo, hi))
        if len(choice_rows) < logits.shape[0]:
            chosen = self._choose_unverified(group, logits[torch.tensor(choice_rows, device=logits.device)])
        else:
            chosen = self._choose_unverified(group, logits, lo)
        first = 0
        for part in parts:
            n = len(part.group)
            if part.modules is None:
                self._backbone_done(part, logits[part.first_row :], chosen[first : first + n], events)
            else:
                self._mtp_done(part, logits[part.first_row :], chosen[first : first + n], events)
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

    def _backbone_forward(self, group: list[SequenceState]) -> "_Forward":
        model = self.model
        rows = [s.tokens[s.bb_len :] + s.drafts for s in group]
        q_lens = [len(r) for r in rows]
        past = [s.bb_len for s in group]
        ids, pos = self._pad(rows, past)
        mask = group_attention_mask(past, q_lens, self.dtype, self.device)
        cache = BatchKV(self.kv, [s.slot for s in group], past, q_lens, self.device)
        drafting = any(s.drafts for s in group)

        def forward():
            hidden = model.run_backbone(model.model.embed_tokens(ids), pos, mask, cache)  # (G, Q, H)
            # hidden states to score: each row's last position, or its last 1 + #drafts positions when verifying
            if not drafting and min(q_lens) == max(q_lens):
                return hidden, hidden[:, -1]  # (G, H)
            picks = [  # (row, position)
                (i, q - 1 - len(s.drafts) + j)
                for i, (s, q) in enumerate(zip(group, q_lens))
                for j in range(len(s.drafts) + 1)
            ]
            index = torch.tensor(picks, device=self.device)
            return hidden, hidden[index[:, 0], index[:, 1]]  # (rows picked, H)

        hidden, last = self._observed("backbone", len(group), max(q_lens), forward)
        return _Forward(group, q_lens, past, hidden, last)

    def _backbone_done(self, part: "_Forward", logits: torch.Tensor, chosen: list, events: list) -> None:
        row = 0
        outputs = part.outputs() if any(seq.hidden[0] is not None for seq in part.group) else None
        for i, seq in enumerate(part.group):
            q = part.q_lens[i]
            seq.backbone_calls += 1
            seq.backbone_positions += q
            if seq.hidden[0] is not None:
                seq.hidden[0].append(outputs[i])
            n_logits = len(seq.drafts) + 1
            row += n_logits
            if self.observer is not None:
                self._record(seq, "backbone", q, part.starts[i], logits[row - 1])
            if seq.verify:
                self._verify(seq, logits[row - n_logits : row], events)
            else:
                seq.bb_len += q
                seq.chain_k = -1
                self._emit(seq, chosen[i], "backbone", events)

    def _mtp_forward(self, modules: list[int], group: list[SequenceState]) -> "_Forward":
        """Every request whose next action is an MCTP module, in one forward; request i runs modules[i]."""
        model = self.model
        firsts = [s.mod_len[k] for s, k in zip(group, modules)]
        ends = [s.bb_len for s in group]  # rows first..B-1, B = backbone positions
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
            if min(q_lens) == Q:
                return out, out[:, -1]
            return out, out[torch.arange(G, device=self.device), torch.tensor(q_lens, device=self.device) - 1]

        kind = "mtp" + ",".join(str(k) for k in sorted(set(modules)))
        out, last = self._observed(kind, G, Q, forward)
        return _Forward(group, q_lens, firsts, out, last, modules)

    def _mtp_done(self, part: "_Forward", logits: torch.Tensor, chosen: list, events: list) -> None:
        outputs = part.outputs()
        for i, (seq, k) in enumerate(zip(part.group, part.modules)):
            q, end = part.q_lens[i], part.starts[i] + part.q_lens[i]
            seq.mtp_calls[k] += 1
            seq.mtp_positions[k] += q
            seq.mod_len[k] = end
            seq.hidden[k].trim(end - seq.hidden_slack)
            if k + 1 < self.num_modules and seq.hidden[k + 1] is not None:
                seq.hidden[k + 1].append(outputs[i])
            if self.observer is not None:
                self._record(seq, self.mtp_names[k], q, part.starts[i] + k + 1, logits[i])
            L = len(seq.tokens)
            if seq.verify:
                index = L + len(seq.drafts)
                draft = seq.sampler.draft(seq.prefix(index), logits[i : i + 1], index - seq.prompt_len)
                if seq.ids is not None:
                    seq.ids[0, index] = draft
                seq.drafts.append(draft)
                seq.drafted += 1
            else:
                seq.chain_k = k
                self._emit(seq, chosen[i], self.mtp_names[k], events)

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
