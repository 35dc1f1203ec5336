"""actors.vad on real speech (mini-speech question wavs) and silence, no Serve: two utterances 1.5 s apart give
two start/stop pairs at the right times, at 16 and 24 kHz, whatever the chunking; silence and quiet noise give
none; a silence window longer than the gap joins the two; a higher threshold never starts earlier."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import soxr

from actors.vad import FRAME_MS, SpeechDetector, VadParams, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEAD_S, GAP_S = 0.5, 1.5


@pytest.fixture(scope="module")
def recording(shared_dir) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """0.5 s silence, q01, 1.5 s silence, q02, 1.5 s silence at 16 kHz int16; the utterances' (start, end) s."""
    folder = shared_dir / "corpora" / "mini-speech" / "qa_wavs"
    first, _ = soundfile.read(folder / "q01.wav", dtype="int16")
    second, _ = soundfile.read(folder / "q02.wav", dtype="int16")
    silence = lambda s: np.zeros(int(s * 16000), np.int16)
    audio = np.concatenate([silence(LEAD_S), first, silence(GAP_S), second, silence(GAP_S)])
    t1 = LEAD_S + len(first) / 16000
    return audio, [(LEAD_S, t1), (t1 + GAP_S, t1 + GAP_S + len(second) / 16000)]


def run(audio: np.ndarray, chunk: int, rate: int = 16000, **params):
    detector = SpeechDetector(VadParams(**params), rate=rate)
    events = []
    for i in range(0, len(audio), chunk):
        events += detector.feed(audio[i:i + chunk].tobytes())
    return events


def test_two_utterances_two_pairs(recording):
    audio, truth = recording
    events = run(audio, 1600)
    assert [e.kind for e in events] == ["start", "stop", "start", "stop"]
    for (start, stop), (t0, t1) in zip(zip(events[::2], events[1::2]), truth):
        # the wavs have a little leading/trailing silence of their own: speech lies within each file
        assert t0 * 1000 - FRAME_MS <= start.ms < t1 * 1000 and start.ms < stop.ms <= t1 * 1000 + FRAME_MS
    assert events[2].ms - events[1].ms >= GAP_S * 1000  # the gap is silence


def test_chunking_and_rate_do_not_change_the_decisions(recording):
    audio, _ = recording
    reference = run(audio, 1600)
    assert run(audio, 7) == run(audio, 48000) == reference  # tiny and huge appends alike
    at_24k = (soxr.resample(audio.astype(np.float32) / 32768, 16000, 24000) * 32767).astype(np.int16)
    resampled = run(at_24k, 2400, rate=24000)
    assert [e.kind for e in resampled] == [e.kind for e in reference]
    assert all(abs(a.ms - b.ms) <= 2 * FRAME_MS for a, b in zip(resampled, reference))


def test_silence_and_quiet_noise_are_not_speech():
    assert run(np.zeros(16000 * 3, np.int16), 800) == []
    noise = (np.random.default_rng(0).normal(0, 30, 16000 * 3)).astype(np.int16)  # about -60 dBFS hiss
    assert run(noise, 800) == []


def test_silence_window_longer_than_the_gap_joins_the_utterances(recording):
    audio, _ = recording
    events = run(audio, 1600, silence_ms=2500)
    assert [e.kind for e in events] == ["start"]  # the trailing 1.5 s is not enough to end it either
    events = run(np.concatenate([audio, np.zeros(16000 * 2, np.int16)]), 1600, silence_ms=2500)
    assert [e.kind for e in events] == ["start", "stop"]


def test_higher_threshold_never_starts_earlier(recording):
    audio, _ = recording
    low, high = run(audio, 1600, threshold=0.3), run(audio, 1600, threshold=0.9)
    assert low[0].kind == high[0].kind == "start" and low[0].ms <= high[0].ms


def test_reset_starts_time_again(recording):
    audio, _ = recording
    detector = SpeechDetector(VadParams(), model=load_model())
    first = detector.feed(audio.tobytes())
    detector.reset()
    assert detector.ms == 0 and detector.feed(audio.tobytes()) == first
