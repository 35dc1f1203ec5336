"""Per-request decode state of the LLM engine: tokens, caches, hidden buffers, schedule position, counters."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.engine.kv_cache import HiddenBuffer
from pipeline.engine.schedules import EXACT
from pipeline.engine.requests import GenerationRequest
from pipeline.engine.schedules import m_run, expand_schedule

if TYPE_CHECKING:
    from pipeline.engine.sampling import TokenSampler


class SequenceState:
    """Decode state of one request: tokens, caches, hidden buffers, schedule position, counters."""

    def __init__(self, request: GenerationRequest, mode, verify: bool, sampler, stop_ids, num_modules: int, device):
        self.request = request
        self.id = request.request_id
        self.prompt_len = len(request.prompt_ids)
        self.max_new = request.max_new_tokens
        self.mode = mode
        self.verify = verify
        self.sampler: TokenSampler = sampler
        self.stop_ids = stop_ids
        N = num_modules
        self.schedule = None if mode == EXACT else expand_schedule(mode, self.max_new)
        self.tokens = [int(t) for t in request.prompt_ids]  # committed: prompt + generated
        self.ids = None  # tokens, then drafts, as a [1, capacity] tensor: only a repetition penalty reads them
        if sampler.penalty is not None:
            self.ids = torch.zeros(1, self.prompt_len + self.max_new + N + 2, dtype=torch.long, device=device)
            self.ids[0, : self.prompt_len] = torch.tensor(self.tokens, dtype=torch.long)
        self.slot: int | None = None  # KV pool slot, held while the request is active
        used = self._modules_used(N)
        self.hidden = [HiddenBuffer() if k < N and used[k] else None for k in range(N + 1)]
        self.hidden_slack = N + 1 if verify else 0  # rejected drafts can roll a module back by up to N rows
        self.bb_len = 0  # positions in the backbone cache
        self.mod_len = [0] * N  # rows processed by each module (its cache length)
        self.chain_k = -1  # module of the last MCTP step of the current burst
        self.drafts: list[int] = []
        self.draft_target = 0
        self.exact_draft = 1  # exact mode: current draft length (grows 1, 2, 4, ... while drafts pass) ...
        self.exact_backoff = self.exact_pause = 0  # ... and backbone steps without drafts after a failed probe
        self.pending_codes: list[int] = []
        self.backbone_calls = 0
        self.backbone_positions = 0
        self.mtp_calls = [0] * N
        self.mtp_positions = [0] * N
        self.accepted_drafts = 0
        self.drafted = 0
        self.verify_calls = 0
        self.finished: str | None = None
        self.waited = 0  # steps spent waiting to join in phase with the running requests
        self.arrival = 0  # the engine's count of requests added before this one (long work is served in order)
        self.piecewise: set[int] = set()  # actions (-1 backbone, k module) whose long work runs in pieces now

    def _modules_used(self, N: int) -> list[bool]:
        used = [False] * N
        if self.mode == EXACT:
            return [True] * N
        if self.verify:
            longest, i = 0, 0
            while i < len(self.schedule):
                run = m_run(self.schedule, i)
                longest, i = max(longest, run), i + max(run, 1)
            return [k < min(N, longest) for k in range(N)]
        k = -1
        for c in self.schedule[1:]:
            k = -1 if c == "M" else k + 1
            if 0 <= k < N:
                used[k] = True
            elif k >= N:
                k = -1
        return used

    def prefix(self, length: int) -> torch.Tensor | None:
        """The first `length` ids (committed tokens, then drafts) as [1, length] for the score processors,
        or None when none reads them (no repetition penalty; the warpers ignore the ids)."""
        return None if self.ids is None else self.ids[:, :length]

    def window(self, first: int, last: int) -> list[int]:
        """Ids first..last-1 of the committed tokens followed by the pending drafts."""
        n = len(self.tokens)
        if last <= n:
            return self.tokens[first:last]
        return self.tokens[first:] + self.drafts[max(first - n, 0) : last - n]

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def future_actions(self, N: int, count: int, prefill_chunk: int = 0) -> list[int] | None:
        """The next `count` actions (as `next_action`), one per step; None if they depend on the outputs
        (verification). Without verification every step emits exactly one token, so the schedule fixes them
        (a prompt longer than `prefill_chunk` takes one backbone step per piece; the pieces of a long MCTP
        catch-up after it are not counted: an estimate for admission)."""
        if self.verify:
            return None
        actions, g, chain = [], self.generated, self.chain_k
        if self.bb_len < self.prompt_len:  # prefill: one step, or one per piece when it is chunked
            remaining = self.prompt_len - self.bb_len
            pieces = -(-remaining // prefill_chunk) if prefill_chunk and self.prompt_len > prefill_chunk else 1
            actions.extend([-1] * min(pieces, count))
            g, chain = g + 1, -1
        while len(actions) < count and g < self.max_new:
            k = -1 if self.schedule[g] == "M" else chain + 1
            k = k if k < N else -1
            actions.append(k)
            chain, g = k, g + 1
        return actions

    def next_action(self, N: int) -> int:
        """-1 = backbone forward, k >= 0 = MCTP module k forward."""
        if self.bb_len < self.prompt_len:  # prefill (or its next piece)
            return -1
        if self.verify:
            return len(self.drafts) if len(self.drafts) < self.draft_target else -1
        if self.schedule[self.generated] == "M":
            return -1
        k = self.chain_k + 1
        return k if k < N else -1  # quirk: a burst longer than N falls back to the backbone

    def set_draft_target(self, N: int) -> None:
        """Drafts before the next verifying backbone forward: the schedule's next 'm' run (verify=True), or
        in exact mode an adaptive length (doubles while every draft is accepted, else accepted + 1)."""
        remaining = self.max_new - self.generated
        if self.mode == EXACT:
            run = 0 if self.exact_pause > 0 else self.exact_draft
            self.exact_pause = max(self.exact_pause - 1, 0)
        else:
            run = m_run(self.schedule, self.generated)
        self.draft_target = max(0, min(N, run, remaining - 1))

    def adapt_draft_length(self, drafted: int, accepted: int, N: int) -> None:
        """Exact mode: double the draft length while all drafts pass, else use accepted + 1; when even a
        single draft fails, pause drafting for 1, 2, 4, ... 32 backbone steps (drafts that are never
        accepted then cost a small share of the backbone steps instead of one MCTP step per token)."""
        if accepted == drafted:
            self.exact_draft, self.exact_backoff = min(2 * drafted, N), 0
        elif accepted > 0 or drafted > 1:
            self.exact_draft, self.exact_backoff = accepted + 1, 0
        else:
            self.exact_backoff = min(max(2 * self.exact_backoff, 1), 32)
            self.exact_pause = self.exact_backoff

    def usage(self) -> dict:
        usage = {
            "prompt_tokens": self.prompt_len,
            "generated_tokens": self.generated,
            "backbone_forwards": self.backbone_calls,
            "mtp_forwards": sum(self.mtp_calls),
            "forward_calls": self.backbone_calls + sum(self.mtp_calls),
            "backbone_positions": self.backbone_positions,
            "mtp_forwards_per_module": list(self.mtp_calls),
            "mtp_positions_per_module": list(self.mtp_positions),
            "mode": self.mode,
            "verify": self.verify,
        }
        if self.verify:
            usage["drafted_tokens"] = self.drafted
            usage["accepted_drafts"] = self.accepted_drafts
            usage["acceptance_length"] = self.accepted_drafts / max(self.verify_calls, 1)
        return usage
