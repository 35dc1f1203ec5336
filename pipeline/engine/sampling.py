"""Token selection for the LLM engine: HF sampling semantics plus the output constraint.

Scores are processed exactly as transformers' `generate` does (logits in float32; repetition penalty over
prompt + generated ids, applied to every step including MCTP ones; then, when sampling, temperature ->
top-k -> top-p; greedy = argmax of the processed scores, sampling = multinomial over their softmax), using
transformers' own LogitsProcessor classes. Each request has its own seeded `torch.Generator`, so a
request's samples do not depend on what else is in the batch.

The output constraint (`"text"` / `"interleaved"`) masks ids by generated-token index: with random weights
it guarantees decodable audio spans in the training layout of spec §2.3; a trained model already follows
that layout, so there it changes nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.engine.sampling_params import SamplingParams
from pipeline.tokens.vocab import TokenLayout
from pipeline.tokens.chat import check_ratio

CONSTRAINTS = (None, "text", "interleaved")


_SLOT_IDS: dict = {}


def _slot_ids(layout: TokenLayout, vocab_size: int, device: torch.device) -> tuple[dict, dict]:
    """Per slot kind, the additive [1, V] float32 bias and the id range [lo, hi) around its allowed ids, with
    whether every id in that range is allowed; shared by every request of the same layout and device."""
    key = (layout, vocab_size, device)
    if key not in _SLOT_IDS:
        ids = torch.arange(vocab_size, device=device)
        audio = (ids >= layout.audio_offset) & (ids < layout.audio_offset + layout.codebook_size)
        real = ids < layout.vocab_size
        text = real & ~audio & (ids != layout.boa) & (ids != layout.eoa)
        allowed = {"text": text, "audio": audio, "boa": ids == layout.boa, "eoa": ids == layout.eoa}
        neg = torch.finfo(torch.float32).min
        biases = {slot: torch.zeros(vocab_size, device=device).masked_fill(~a, neg)[None] for slot, a in allowed.items()}
        ranges = {}
        for slot, a in allowed.items():
            where = a.nonzero()
            lo, hi = int(where[0]), int(where[-1]) + 1
            ranges[slot] = (lo, hi, bool(a[lo:hi].all()))
        _SLOT_IDS[key] = (biases, ranges)
    return _SLOT_IDS[key]


class OutputConstraint:
    """Allowed ids per generated-token index, as an additive float32 bias over the vocabulary.

    "text": no audio ids, BOA or EOA anywhere (ASR). "interleaved": the spec §2.3 layout of `ratio`
    [T1, A1, T2, A2, ...]: T1 text slots (text ids, eos included), BOA, A1-2 audio slots (audio ids only),
    EOA, T2 text slots, ...; the last pair repeats. Ids without a token (padding rows) are never allowed.
    """

    def __init__(self, kind: str, layout: TokenLayout, vocab_size: int, device, ratio: Sequence[int] | None = None):
        if kind not in ("text", "interleaved"):
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {kind!r}")
        self.kind = kind
        # per slot kind: its bias, and (lo, hi, exact) = the id range around its allowed ids and whether all of
        # them are allowed. A greedy choice looks only at that range: an argmax over the slice when exact
        # (audio, BOA, EOA), else over slice + bias (text: a few hundred ids of the vocabulary's ~17k or ~168k)
        self.bias, self.ranges = _slot_ids(layout, vocab_size, torch.device(device))
        # slot kind of each generated-token index: `head` for the pairs before the last, then `period` repeats
        self.head: list[str] = []
        self.period: list[str] = ["text"]
        if kind == "interleaved":
            values = check_ratio(ratio)
            pairs = [["text"] * t + ["boa"] + ["audio"] * (a - 2) + ["eoa"] for t, a in zip(values[::2], values[1::2])]
            self.head = [slot for pair in pairs[:-1] for slot in pair]
            self.period = pairs[-1]

    def slot(self, index: int) -> str:
        """Kind of generated token `index`: "text", "boa", "audio" or "eoa"."""
        if index < len(self.head):
            return self.head[index]
        return self.period[(index - len(self.head)) % len(self.period)]

    def __call__(self, scores: torch.Tensor | None, index: int, bias_only: bool = False) -> torch.Tensor:
        """scores [1, V] + the bias of slot `index`; with bias_only the [1, V] bias itself."""
        bias = self.bias[self.slot(index)]
        return bias if bias_only else scores + bias


class TokenSampler:
    """One request's score processing and token choice (HF order: processors, then warpers)."""

    def __init__(self, params: SamplingParams, device, constraint: OutputConstraint | None = None):
        self.params = params
        self.constraint = constraint
        self.penalty = (
            RepetitionPenaltyLogitsProcessor(params.repetition_penalty) if params.repetition_penalty != 1.0 else None
        )
        warpers = []
        if not params.greedy:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def process(self, prefix_ids: torch.Tensor | None, logits: torch.Tensor, index: int) -> torch.Tensor:
        """prefix_ids [1, L] (prompt + generated before this token; may be None without a repetition penalty),
        logits [1, V] -> processed float32 scores."""
        scores = logits.float()
        if self.penalty is not None:
            scores = self.penalty(prefix_ids, scores)
        if self.constraint is not None:
            scores = self.constraint(scores, index)
        return scores

    def choose(self, prefix_ids: torch.Tensor, logits: torch.Tensor, index: int) -> int:
        """The request's token for this step: argmax (greedy) or a sample of the warped distribution."""
        scores = self.process(prefix_ids, logits, index)
        if self.params.greedy:
            return int(scores.argmax(-1))
        scores = self.warpers(prefix_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))

    def draft(self, prefix_ids: torch.Tensor, logits: torch.Tensor, index: int) -> int:
        """An MCTP draft for verification: the most likely id under the processed scores (never sampled:
        argmax maximises the chance that the backbone's own sample equals it)."""
        return int(self.process(prefix_ids, logits, index).argmax(-1))


ARGMAX_BLOCK = 128  # argmax_rows: ids per block


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` for a [G, V] batch of scores, by blocks on CPU.

    PyTorch's CPU argmax walks a row element by element, while a max reduction is vectorised. So: the max of each block of `ARGMAX_BLOCK` ids, the first block
    holding the row's max, then the argmax inside that block. The earlier blocks' maxima are strictly
    smaller, so this is the first index of the max, as `argmax` gives (NaN counts as the max, as there).
    """
    G, V = x.shape
    B = ARGMAX_BLOCK
    if x.device.type != "cpu" or G < 2 or V < 16 * B:  # one row, a GPU or a short range: argmax is as fast
        return x.argmax(-1)
    nb = V // B
    head = x[:, : nb * B].unflatten(1, (nb, B))  # (G, nb, B), a view
    block = head.amax(-1).argmax(-1)  # (G,) first block holding the max
    rows = torch.arange(G, device=x.device)
    index = block * B + head[rows, block].argmax(-1)
    if nb * B < V:  # the tail wins only if its max is larger (or NaN where the head has none)
        best = x[rows, index]
        tail_value, tail_index = x[:, nb * B :].max(-1)
        wins = (tail_value > best) | (tail_value.isnan() & ~best.isnan())
        index = torch.where(wins, tail_index + nb * B, index)
    return index


def choose_batch(samplers: Sequence[TokenSampler], prefixes: Sequence[torch.Tensor], logits: torch.Tensor,
                 indices: Sequence[int], offset: int = 0) -> list[int]:
    """`choose` for several requests at once: float32 logits [G, V] -> one token per row.

    With `offset`, logits [G, W] score ids offset..offset+W-1 only (`decode_logits` over an id range); every
    row must then be a plain greedy one whose allowed ids lie inside that range.

    Plain greedy rows (no repetition penalty) are chosen together, a few tensor ops per kind of choice
    instead of a bias add over the vocabulary per row: rows without a constraint by one argmax; constrained
    rows by one argmax per slot kind over the id range around the slot's allowed ids, adding the bias over
    that range only where the range has holes (a single allowed id needs no argmax). Ties resolve to the
    lowest id in every case, so the tokens equal those of `choose`. Every other row goes through its own
    `choose`.
    """
    tokens: list[int | None] = [None] * len(samplers)
    kinds: dict[tuple, list[int]] = {}  # how a plain greedy row is chosen -> its rows
    for i, sampler in enumerate(samplers):
        if not sampler.params.greedy or sampler.penalty is not None:
            continue
        constraint = sampler.constraint
        if constraint is None:
            kinds.setdefault((offset, offset + logits.shape[1], None), []).append(i)
            continue
        slot = constraint.slot(indices[i])
        lo, hi, exact = constraint.ranges[slot]
        kinds.setdefault((lo, hi, None if exact else (slot, id(constraint.bias))), []).append(i)
    for (lo, hi, biased), rows in kinds.items():
        if biased is None and hi - lo == 1:  # a single allowed id
            chosen = [lo] * len(rows)
        else:
            cols = slice(lo - offset, hi - offset)
            scores = logits[:, cols] if len(rows) == logits.shape[0] else logits[rows, cols]
            if biased is not None:  # the argmax of logits + bias lies inside the allowed ids' range
                scores = scores + samplers[rows[0]].constraint.bias[biased[0]][:, lo:hi]
            chosen = argmax_rows(scores).add(lo).tolist()
        for i, token in zip(rows, chosen):
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if tokens[i] is None:
            if offset:
                raise ValueError("rows other than plain greedy ones need the whole vocabulary's logits (offset 0)")
            tokens[i] = sampler.choose(prefixes[i], logits[i : i + 1], indices[i])
    return tokens
