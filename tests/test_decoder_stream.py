"""Decoder streams: independence, batching, incremental mode's cost bound and distance to a whole decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.decoder.speech_decoder import load_decoder
from pipeline.decoder.tiny import write_tiny_decoder
from pipeline.decoder.stream import IncrementalStream, position_noise


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    return load_decoder(write_tiny_decoder(tmp_path_factory.mktemp("dec") / "decoder", seed=0))


@pytest.fixture(scope="module")
def fixture_decoder(shared_dir):
    return load_decoder(shared_dir / "parity" / "codec" / "decoder")


def _codes(n, seed):
    return np.random.default_rng(seed).integers(0, 16384, n)


def _run(stream, codes, chunk):
    out = [stream.push(codes[i: i + chunk]) for i in range(0, len(codes), chunk)]
    return np.concatenate(out + [stream.finish()])


@pytest.mark.parametrize("mode", ["incremental", "glm4voice"])
def test_interleaved_streams_equal_each_alone(tiny_decoder, mode):
    a_codes, b_codes = _codes(30, 1), _codes(20, 2)
    alone_a = _run(tiny_decoder.stream(mode, n_steps=2), a_codes, 10)
    alone_b = _run(tiny_decoder.stream(mode, n_steps=2, seed=5), b_codes, 10)
    a, b = tiny_decoder.stream(mode, n_steps=2), tiny_decoder.stream(mode, n_steps=2, seed=5)
    out_a, out_b = [], []
    for i in range(0, 30, 10):
        out_a.append(a.push(a_codes[i: i + 10]))
        if i < 20:
            out_b.append(b.push(b_codes[i: i + 10]))
    out_b.append(b.finish())
    out_a.append(a.finish())
    np.testing.assert_array_equal(np.concatenate(out_a), alone_a)
    np.testing.assert_array_equal(np.concatenate(out_b), alone_b)


def test_stream_leaves_global_rng_alone(tiny_decoder):
    state = torch.get_rng_state()
    _run(tiny_decoder.stream("incremental", n_steps=2), _codes(12, 3), 4)
    assert torch.equal(torch.get_rng_state(), state)


def test_incremental_total_length_and_first_chunk(tiny_decoder):
    codes = _codes(26, 4)
    stream = tiny_decoder.stream("incremental", n_steps=2)
    first = stream.push(codes[:2])  # Balance: the first audio chunk is 2 ids
    assert first.size > 0 and first.dtype == np.float32
    rest = _run(stream, codes[2:], 8)
    assert first.size + rest.size == 256 * tiny_decoder.n_frames(26)
    boost = tiny_decoder.stream("incremental", n_steps=2).push(codes[:8])  # Boost: 8 ids
    assert boost.size >= 256 * 8


def test_incremental_cost_is_bounded(tiny_decoder):
    """The flow window never grows with the stream: tokens per forward stay below context + block + chunk."""
    stream: IncrementalStream = tiny_decoder.stream("incremental", n_steps=1, context_tokens=20)
    codes, sizes = _codes(120, 5), []
    original = tiny_decoder.flow_mel

    def spy(tokens, noise, prompt, n_steps):
        sizes.append(tokens.shape[1])
        return original(tokens, noise, prompt, n_steps)

    tiny_decoder.flow_mel = spy
    try:
        total = _run(stream, codes, 10)
    finally:
        del tiny_decoder.flow_mel
    assert total.size == 256 * tiny_decoder.n_frames(120)
    assert max(sizes) <= 20 + 2 * tiny_decoder.block_size + 10
    assert len(stream.codes) <= 20 + 3 * tiny_decoder.block_size  # history trimmed
    assert stream.mel.shape[-1] < tiny_decoder.n_frames(60)


def test_incremental_close_to_whole_decode(fixture_decoder, shared_dir):
    """Mel distance to a whole decode with the same (position-keyed) noise: the price of the window."""
    tokens = np.load(shared_dir / "parity" / "codec" / "inputs" / "decoder_tokens.npy")
    dec = fixture_decoder
    n = dec.n_frames(len(tokens))
    with torch.inference_mode():
        whole = dec.flow_mel(dec.tensor(tokens.tolist()), position_noise(dec, 0, n, 42), None, 10).numpy()
    stream = dec.stream("incremental", context_tokens=30, record_mel=True)
    pcm = _run(stream, tokens, 10)
    mel = stream.recorded_mel().numpy()
    assert mel.shape == whole.shape and pcm.size == 256 * n
    snr = 10 * np.log10((whole ** 2).sum() / ((whole - mel) ** 2).sum())
    assert snr > 12.0, snr  # measured 15.5 dB (L1 0.17; whole decodes with two noises differ by L1 1.29)
    assert np.abs(mel - whole).mean() < 0.3


def test_decode_batch_matches_individual_pushes(tiny_decoder):
    streams = [tiny_decoder.stream("incremental", n_steps=2, seed=s) for s in (1, 2, 3)]
    alone = [tiny_decoder.stream("incremental", n_steps=2, seed=s) for s in (1, 2, 3)]
    glm_b, glm_a = tiny_decoder.stream("glm4voice", n_steps=2), tiny_decoder.stream("glm4voice", n_steps=2)
    codes = [_codes(24, 10 + s) for s in range(3)]
    batched = [[] for _ in range(4)]
    single = [[] for _ in range(4)]
    for i in range(0, 24, 8):
        final = i + 8 >= 24
        outs = tiny_decoder.decode_batch([(s, c[i: i + 8], final) for s, c in zip(streams, codes)] + [(glm_b, codes[0][i: i + 8], final)])
        for k, o in enumerate(outs):
            batched[k].append(o)
        for k, (s, c) in enumerate(zip(alone, codes)):
            single[k].append(s.push(c[i: i + 8], final=final))
        single[3].append(glm_a.push(codes[0][i: i + 8], final=final))
    for b, s in zip(batched, single):
        b, s = np.concatenate(b), np.concatenate(s)
        assert b.shape == s.shape
        # same math; batched BLAS rounding (~1e-6) is amplified by HiFT's exp() at a few peaks
        snr = 10 * np.log10((s ** 2).sum() / max(((b - s) ** 2).sum(), 1e-20))
        assert np.abs(b - s).max() < 1e-2 and snr > 40, snr
    assert all(s.finished for s in streams)
    with pytest.raises(ValueError, match="twice"):
        tiny_decoder.decode_batch([(alone[0], [1], False), (alone[0], [2], False)])


def test_glm4voice_finish_flushes_held_frames(tiny_decoder):
    """Our extension: the end arrives with no new ids -> the 34 held-back frames are vocoded."""
    stream = tiny_decoder.stream("glm4voice", n_steps=2)
    first = stream.push(_codes(10, 6))
    second = stream.push(_codes(10, 7))
    tail = stream.finish()
    assert first.size and second.size and tail.size == 256 * (1 + stream.mel_overlap)
    assert stream.finished and stream.finish().size == 0
