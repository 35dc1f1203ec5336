"""Long recordings: fixed windows with overlap (the encoder sees at most 30 s at once), and stitching the
windows' transcripts back into one text.

    windows = plan_windows(n_samples, 16000, WindowConfig())    # [(start, end), ...] in samples
    text = stitch([Segment(0.0, 30.0, "a b c d"), Segment(28.0, 41.5, "d e f")])    # "a b c d e f"

Neighbouring windows share `overlap_s` of audio, so their transcripts share the words spoken there. Without
word timestamps the overlap is resolved on the words: the longest run of words that ends the left text and
starts the right one is kept once; if there is none (the two windows heard the overlap differently), each
side keeps the half of the overlap nearest its own centre, its words placed by the segment's speaking rate.
A row keeps every segment's own text and times, so a better stitcher can be applied later.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[^\w']+")


@dataclass(frozen=True)
class WindowConfig:
    window_s: float = 30.0  # the speech encoder's window (GLM-4-Voice tokenizer: 30 s)
    overlap_s: float = 2.0  # audio shared by neighbouring windows (a word cut at one edge is whole in the other)

    def __post_init__(self):
        if not self.window_s > 0:
            raise ValueError(f"window_s={self.window_s!r} must be > 0")
        if not 0 <= self.overlap_s < self.window_s / 2:
            raise ValueError(f"overlap_s={self.overlap_s!r} must be >= 0 and below half of window_s={self.window_s}")


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the recording
    end: float
    text: str


def plan_windows(n_samples: int, sample_rate: int, config: WindowConfig) -> list[tuple[int, int]]:
    """[start, end) sample ranges covering the recording: one if it fits a window, else windows of
    `window_s` every `window_s - overlap_s`, the last one moved back to end at the recording's end
    (a full window, so it never holds a sliver of audio alone)."""
    window = int(round(config.window_s * sample_rate))
    hop = window - int(round(config.overlap_s * sample_rate))
    if n_samples <= window:
        return [(0, n_samples)]
    windows, start = [], 0
    while start + window < n_samples:
        windows.append((start, start + window))
        start += hop
    windows.append((n_samples - window, n_samples))
    return windows


def stitch(segments: list[Segment], max_match_words: int = 12) -> str:
    """One transcript from overlapping segments in time order (see the module docstring)."""
    words: list[str] = []
    previous: Segment | None = None
    for segment in segments:
        new = segment.text.split()
        if previous is not None and words and new:
            overlap = previous.end - segment.start
            k = _match(words, new, max_match_words)
            if k:
                new = new[k:]
            elif overlap > 0:
                words = words[: len(words) - _words_in(previous, previous.text.split(), overlap / 2)]
                new = new[_words_in(segment, new, overlap / 2) :]
        words.extend(new)
        previous = segment
    return " ".join(words)


def _match(left: list[str], right: list[str], limit: int) -> int:
    """Length of the longest run of words ending `left` and starting `right` (compared without case and
    punctuation), at most `limit`."""
    norm = lambda ws: [_WORD.sub("", w).lower() for w in ws]  # noqa: E731
    tail, head = norm(left[-limit:]), norm(right[:limit])
    for k in range(min(len(tail), len(head)), 0, -1):
        if tail[-k:] == head[:k] and any(tail[-k:]):
            return k
    return 0


def _words_in(segment: Segment, words: list[str], seconds: float) -> int:
    """How many of a segment's words fall in `seconds` of it, at its own speaking rate."""
    duration = max(segment.end - segment.start, 1e-6)
    return min(len(words), int(round(len(words) * seconds / duration)))
