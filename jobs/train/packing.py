"""Sequence packing (spec §6.3): samples appended to a row until the next would overflow `max_length`, each with
position ids restarting at 0, the row right-padded with `pad_id` (labels -100, positions continuing the last
sample). No attention mask: `pipeline.llm` keeps the samples apart from the position ids. A sample longer than
`max_length` is dropped, as the original does; the count of drops is returned so the job can report it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("id", "source", "task", "input_ids", "labels", "audio_seconds")


@dataclass
class PackedRows:
    input_ids: np.ndarray  # [R, max_length] int64
    position_ids: np.ndarray
    labels: np.ndarray
    sample_ids: list[list[str]] = field(default_factory=list)
    dropped: int = 0


def pack(samples, max_length: int, pad_id: int) -> PackedRows:
    """samples: iterable of dicts with `id`, `input_ids`, `labels` (equal lengths), in order."""
    rows: list[tuple[list, list, list, list]] = []
    cur: tuple[list, list, list, list] = ([], [], [], [])
    dropped = 0
    for s in samples:
        ids, labels = list(s["input_ids"]), list(s["labels"])
        if len(ids) != len(labels):
            raise ValueError(f"sample {s.get('id')!r}: input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
        if len(ids) > max_length or not ids:
            dropped += 1
            continue
        if len(cur[0]) + len(ids) > max_length:
            rows.append(cur)
            cur = ([], [], [], [])
        cur[0].extend(ids)
        cur[1].extend(range(len(ids)))
        cur[2].extend(labels)
        cur[3].append(str(s.get("id", "")))
    if cur[0]:
        rows.append(cur)
    R = len(rows)
    out = PackedRows(np.full((R, max_length), pad_id, np.int64), np.zeros((R, max_length), np.int64),
                     np.full((R, max_length), IGNORE_INDEX, np.int64), [r[3] for r in rows], dropped)
    for i, (ids, pos, labels, _) in enumerate(rows):
        n = len(ids)
        out.input_ids[i, :n], out.position_ids[i, :n], out.labels[i, :n] = ids, pos, labels
        out.position_ids[i, n:] = np.arange(pos[-1] + 1, pos[-1] + 1 + max_length - n)
    return out


def main_token_count(labels: np.ndarray) -> int:
    """Scored backbone targets of a batch, counted as the HF Trainer does for `num_items_in_batch` (spec §6.4):
    labels != -100 after the shift by one inside each row."""
    return int((np.asarray(labels)[..., 1:] != IGNORE_INDEX).sum())
