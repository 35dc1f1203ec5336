"""Token selection for the decode engine: HF sampling semantics plus the output constraint.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.tokens import TokenLayout, check_ratio

CONSTRAINTS = (None, "text", "interleaved")


@dataclass
class SamplingParams:
    """HF generation settings of one request. greedy=True ignores temperature / top_k / top_p."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; HF semantics (divide positive scores, multiply negative)
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self):
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be a bool, got {self.greedy!r}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        rp = self.repetition_penalty
        if not (isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")


_BIASES: dict = {}


def _slot_biases(layout: TokenLayout, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Additive [1, V] float32 bias per slot kind; shared by every request of the same layout and device."""
    key = (layout, vocab_size, device)
    if key not in _BIASES:
        ids = torch.arange(vocab_size, device=device)
        audio = (ids >= layout.audio_offset) & (ids < layout.audio_offset + layout.codebook_size)
        real = ids < layout.vocab_size
        text = real & ~audio & (ids != layout.boa) & (ids != layout.eoa)
        neg = torch.finfo(torch.float32).min

        def bias(allowed: torch.Tensor) -> torch.Tensor:
            return torch.zeros(vocab_size, device=device).masked_fill(~allowed, neg)[None]  # (1, V)

        _BIASES[key] = {"text": bias(text), "audio": bias(audio), "boa": bias(ids == layout.boa),
                        "eoa": bias(ids == layout.eoa)}
    return _BIASES[key]


def _bias_bounds(bias: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the smallest id range holding every id a [1, V] slot bias allows."""
    allowed = (bias[0] == 0).nonzero()
    return int(allowed[0]), int(allowed[-1]) + 1


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
        self.bias = _slot_biases(layout, vocab_size, torch.device(device))
        # slots whose allowed ids are one range [lo, hi): greedy choice is an argmax over that slice
        self.spans = {"audio": (layout.audio_offset, layout.audio_offset + layout.codebook_size),
                      "boa": (layout.boa, layout.boa + 1), "eoa": (layout.eoa, layout.eoa + 1), "text": None}
        # the id range around each slot's allowed ids: a greedy choice needs the bias only over it (text ids
        # are a few hundred of the vocabulary's ~17k or ~168k)
        self.bounds = {slot: _bias_bounds(bias) for slot, bias in self.bias.items()}
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

    PyTorch's CPU argmax walks a row element by element (~1 ns per id: 0.1 ms for 8 rows of audio ids),
    while a max reduction is vectorised. So: the max of each block of `ARGMAX_BLOCK` ids, the first block
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
                 indices: Sequence[int]) -> list[int]:
    """`choose` for several requests at once: float32 logits [G, V] -> one token per row.

    Plain greedy rows (no repetition penalty) are chosen together, a few tensor ops for the whole batch
    instead of a bias add over the vocabulary per row: rows without a constraint by one argmax, rows whose
    constrained slot allows one id range by an argmax over that slice (a single allowed id needs none), other
    constrained rows by one bias add + argmax per slot kind over the range around its allowed ids. Ties resolve
    to the lowest id in every case, so the tokens equal those of `choose`. Every other row goes through its own
    `choose`.
    """
    tokens: list[int | None] = [None] * len(samplers)
    kinds: dict[tuple, list[int]] = {}  # how a plain greedy row is chosen -> its rows
    for i, sampler in enumerate(samplers):
        if not sampler.params.greedy or sampler.penalty is not None:
            continue
        constraint = sampler.constraint
        if constraint is None:
            kinds.setdefault(("argmax",), []).append(i)
            continue
        slot = constraint.slot(indices[i])
        span = constraint.spans[slot]
        kind = ("bias", slot, id(constraint.bias)) if span is None else ("span", *span)
        kinds.setdefault(kind, []).append(i)
    for kind, rows in kinds.items():
        if kind[0] == "span" and kind[2] - kind[1] == 1:
            chosen = [kind[1]] * len(rows)
        else:
            every = len(rows) == logits.shape[0]
            if kind[0] == "span":
                lo, hi = kind[1], kind[2]
                chosen = argmax_rows(logits[:, lo:hi] if every else logits[rows, lo:hi]).add(lo).tolist()
            elif kind[0] == "bias":  # the argmax of logits + bias lies inside the allowed ids' bounds
                constraint = samplers[rows[0]].constraint
                lo, hi = constraint.bounds[kind[1]]
                scores = (logits[:, lo:hi] if every else logits[rows, lo:hi]) + constraint.bias[kind[1]][:, lo:hi]
                chosen = argmax_rows(scores).add(lo).tolist()
            else:
                chosen = argmax_rows(logits if every else logits[rows]).tolist()
        for i, token in zip(rows, chosen):
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if tokens[i] is None:
            tokens[i] = sampler.choose(prefixes[i], logits[i : i + 1], indices[i])
    return tokens
