"""Stage actors as plain classes (no Ray): config checks, micro-batching, the LLM stage's continuous
batching / abort / per-request errors, the decoder stage's per-stream batching, the encoder stage."""
from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from actors.batching import MicroBatcher
from actors.config import LLMStageConfig, PipelineConfig, StageResources
from actors.payloads import AudioPayload, CodesChunk, SpeechRequest

def assert_same_audio(batched: np.ndarray, single: np.ndarray) -> None:
    """Same audio up to float reordering: a batched decoder forward sums in another order than a single one."""
    assert batched.shape == single.shape and len(single) > 0
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-2)
    assert np.sqrt(np.mean((batched - single) ** 2)) < 1e-2 * np.sqrt(np.mean(single ** 2))


TEXTS = ["Hello there.", "How are you today?", "The cat sat on the mat.", "One two three."]


@pytest.fixture(scope="module")
def config(tiny_models) -> PipelineConfig:
    config = PipelineConfig.from_models_dir(tiny_models)
    config.decoder.n_steps = 2
    return config


# --- config ---------------------------------------------------------------------------------------------


def test_stage_modules_do_not_import_ray():
    """The stages are plain classes whose device and dtype are passed in (`actors.builder` and the Serve
    deployments pick them on Ray): importing them, or the in-process pipeline built on them, loads no ray."""
    import subprocess
    import sys

    code = ("import sys, actors.encoder_stage, actors.llm_stage, actors.decoder_stage, actors.local; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_stage_device_is_cuda_bf16_only_for_an_assigned_gpu_on_a_cuda_machine(monkeypatch):
    import torch

    from actors.placement import device_for

    assert device_for([]) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for(["0"]) == (torch.device("cpu"), torch.float32)  # logical GPUs on a CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for(["3"]) == (torch.device("cuda", 0), torch.bfloat16)  # CUDA_VISIBLE_DEVICES=3: cuda:0


def test_config_checks_and_bundles(tmp_path):
    with pytest.raises(ValueError, match="placement_strategy"):
        PipelineConfig(placement_strategy="RANDOM")
    with pytest.raises(ValueError, match="num_gpus"):
        StageResources(num_gpus=1.5)
    with pytest.raises(ValueError, match="max_inflight_chunks"):
        PipelineConfig(max_inflight_chunks=0)
    with pytest.raises(ValueError, match="align_steps"):
        LLMStageConfig(align_steps=-1)
    with pytest.raises(ValueError, match="admission_wait_s"):
        LLMStageConfig(admission_wait_s=-0.1)
    with pytest.raises(FileNotFoundError, match="llm/"):
        PipelineConfig.from_models_dir(tmp_path)
    assert StageResources(num_gpus=0.5, num_cpus=1, memory=2**30).bundle() == {"GPU": 0.5, "CPU": 1, "memory": 2**30}
    assert StageResources(num_gpus=0).bundle() == {"CPU": 0.01}  # Ray refuses empty bundles
    cpu_only = PipelineConfig().with_resources(num_gpus=0, torch_threads=1)
    assert all(cpu_only.stage(s).resources.num_gpus == 0 for s in ("encoder", "llm", "decoder"))
    assert PipelineConfig().llm.resources.num_gpus == 1  # with_resources made copies


# --- micro-batching -------------------------------------------------------------------------------------


def test_micro_batcher_batches_concurrent_calls_and_keeps_per_key_order():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [f"{key}:{value}" for key, value in items]

    async def main():
        batcher = MicroBatcher(fn, max_batch_size=4, executor=ThreadPoolExecutor(1), key=lambda item: item[0])
        items = [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("b", 1), ("a", 2)]
        return await asyncio.gather(*(batcher.submit(item) for item in items)), batcher

    results, batcher = asyncio.run(main())
    assert results == ["a:0", "b:0", "a:1", "c:0", "b:1", "a:2"]
    for batch in calls:  # one item per key per forward
        assert len({key for key, _ in batch}) == len(batch)
    order = [value for batch in calls for key, value in batch if key == "a"]
    assert order == [0, 1, 2]
    assert batcher.largest_batch > 1 and batcher.batches == len(calls) < 6


def test_micro_batcher_fails_every_call_of_a_failed_forward():
    def fn(items):
        raise RuntimeError("boom")

    async def main():
        batcher = MicroBatcher(fn, max_batch_size=4, executor=ThreadPoolExecutor(1))
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


# --- LLM stage ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["inline-steps", "thread-steps"])
def llm_stage(config, request):
    """Steps inline on the event loop (automatic choice for the tiny model on CPU) and on a worker thread."""
    from actors.llm_stage import LLMStage

    return LLMStage(dataclasses.replace(config.llm, engine_thread=request.param))


async def _generate(stage, request):
    items = [item async for item in stage.generate(request)]
    return items


def test_llm_stage_streams_and_batches_concurrent_requests(llm_stage):
    def requests():
        return [SpeechRequest(task="tts", text=t, max_new_tokens=24, request_id=f"r{i}") for i, t in enumerate(TEXTS)]

    async def one_by_one():
        return [await _generate(llm_stage, r) for r in requests()]

    async def together():
        return await asyncio.gather(*(_generate(llm_stage, r) for r in requests()))

    sequential = asyncio.run(one_by_one())
    largest_before = llm_stage.largest_batch
    concurrent = asyncio.run(together())
    for seq, par in zip(sequential, concurrent):
        assert seq[-1].end is not None and par[-1].end is not None
        assert par[-1].end.token_ids == seq[-1].end.token_ids and len(seq[-1].end.token_ids) == 24
        assert sum(len(i.audio_chunks) for i in par) == sum(len(i.audio_chunks) for i in seq) > 0
        assert "".join(i.text for i in par) == "".join(i.text for i in seq)
        assert all(item.end is None for item in par[:-1])
    assert largest_before == 1 and llm_stage.largest_batch > 1  # the concurrent requests shared steps
    assert not llm_stage.engine.has_unfinished() and not llm_stage.requests


def test_llm_stage_abort_and_bad_request_affect_only_their_request(llm_stage):
    async def main():
        long = SpeechRequest(task="tts", text="A long one.", max_new_tokens=400, request_id="long")
        bad = SpeechRequest(task="tts", text="Bad mode.", mode="warp-speed", request_id="bad")
        good = SpeechRequest(task="asr", codes=[1, 2, 3, 4, 5], max_new_tokens=8, request_id="good")
        stream = llm_stage.generate(long)
        first = await stream.__anext__()
        with pytest.raises(ValueError, match="warp-speed"):
            await _generate(llm_stage, bad)
        good_items = await _generate(llm_stage, good)
        assert await llm_stage.abort("long") is True
        with pytest.raises(RuntimeError, match="aborted"):
            async for _ in stream:
                pass
        for _ in range(3):  # the engine drops the aborted request at its next step
            if not llm_stage.engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        return first, good_items

    first, good_items = asyncio.run(main())
    assert first.end is None
    assert good_items[-1].end.reason == "length" and not any(i.audio_chunks for i in good_items)  # ASR: text only
    assert not llm_stage.engine.active and not llm_stage.engine.waiting and not llm_stage.requests
    kv = llm_stage.engine.kv
    assert sorted(kv.free) == list(range(kv.num_slots))  # the aborted request's KV slot was freed too


def test_llm_stage_sends_the_first_text_at_once_and_merges_the_rest(config):
    """Text is merged over stream_interval_s into fewer items, but the first one is not held back: a client
    sees its first words as soon as they are decoded."""
    from actors.llm_stage import LLMStage

    stage = LLMStage(dataclasses.replace(config.llm, stream_interval_s=30.0))
    request = SpeechRequest(task="asr", codes=list(range(1, 20)), max_new_tokens=12, request_id="asr")
    items = asyncio.run(_generate(stage, request))
    assert len(items) == 2 and items[-1].end is not None  # the first token alone, then everything else merged
    assert items[0].text and len(items[-1].end.token_ids) == 12


def test_llm_stage_sends_the_first_audio_chunk_at_once_and_merges_later_ones(config):
    """TTS: the first item and the first audio chunk go out at once (the decoder starts on it); later chunks are
    merged with what follows within stream_interval_s. Same chunks, text and ids as sending every step's output."""
    from actors.llm_stage import LLMStage

    def run(interval):
        stage = LLMStage(dataclasses.replace(config.llm, stream_interval_s=interval))
        request = SpeechRequest(task="tts", text=TEXTS[1], max_new_tokens=64, request_id="tts")
        return asyncio.run(_generate(stage, request))

    merged, each = run(30.0), run(0.0)
    chunks = [c for item in each for c in item.audio_chunks]
    assert len(chunks) >= 3 and len(each) > 3
    first_audio = next(i for i, item in enumerate(merged) if item.audio_chunks)
    assert merged[first_audio].audio_chunks == chunks[:1]  # alone, not merged with later chunks
    assert len(merged) == first_audio + 2 and merged[-1].end is not None  # the rest: one item with the end
    assert [c for item in merged for c in item.audio_chunks] == chunks
    assert "".join(i.text for i in merged) == "".join(i.text for i in each)
    assert merged[-1].end.token_ids == each[-1].end.token_ids


def test_llm_stage_starts_a_burst_that_trickles_in_together(config):
    """Requests of a burst that arrive a little apart (each within admission_wait_s of the previous one, as Ray
    delivers a burst over several ms) start in the same first step; one arriving after the engine started joins
    later. A single request waits only admission_wait_s."""
    from actors.llm_stage import LLMStage

    stage = LLMStage(dataclasses.replace(config.llm, admission_wait_s=0.1))  # wide margins: CI timers jitter
    admitted = []  # requests added per engine step
    step = stage.loop.step
    stage.loop.step = lambda adds, aborts, full: (admitted.append(len(adds)), step(adds, aborts, full))[1]

    def request(i):
        return SpeechRequest(task="tts", text=TEXTS[i], max_new_tokens=8, request_id=f"b{i}")

    async def trickle(delays):
        async def late(i, delay):
            await asyncio.sleep(delay)
            return await _generate(stage, request(i))
        return await asyncio.gather(*(late(i, d) for i, d in enumerate(delays)))

    items = asyncio.run(trickle([0.0, 0.03, 0.06, 0.09]))  # 30 ms apart: each within 100 ms of the previous one
    assert all(i[-1].end is not None for i in items)
    assert admitted[0] == 4 and stage.largest_batch == 4

    admitted.clear()
    asyncio.run(trickle([0.0, 0.8]))  # the second comes after the wait (at most 4 x 100 ms) ended
    assert admitted[0] == 1 and sum(admitted) == 2


def test_text_detokenizer_pieces_add_up_to_the_whole_decode_in_linear_time(tiny_models):
    """Multi-byte characters split over byte tokens are held back until whole, special ids are skipped, and each
    push decodes only a short window (a long answer does not re-decode everything at every token)."""
    import random

    from actors.payloads import TextDetokenizer
    from pipeline.tokens.vocab import load_tokenizer

    tokenizer = load_tokenizer(tiny_models / "llm")
    decoded = []  # ids per decode call

    class Counting:
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for text in ["héllo wörld, a test.", "你好，世界！今天天气很好。", "emoji 🎉🎈 mixed 中文 and   spaces"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        ids = ids[:5] + [special] + ids[5:]
        for seed in range(5):
            rng, detok, pieces, i = random.Random(seed), TextDetokenizer(Counting()), [], 0
            while i < len(ids):
                n = rng.randint(1, 3)
                pieces.append(detok.push(ids[i : i + n]))
                i += n
            pieces.append(detok.flush())
            assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
            assert not any(p.endswith("\ufffd") for p in pieces)

    from pipeline.tokens.vocab import TokenLayout

    text_vocab = TokenLayout.from_tokenizer(tokenizer).audio_offset  # random text ids: byte pieces that do not
    for seed in range(50):  # always form whole characters, special ids, words
        rng = random.Random(seed)
        ids = [rng.randrange(text_vocab) for _ in range(rng.randint(1, 40))]
        detok, pieces = TextDetokenizer(tokenizer), []
        for i in range(0, len(ids), 2):
            pieces.append(detok.push(ids[i : i + 2]))
        assert "".join(pieces) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)

    decoded.clear()
    detok = TextDetokenizer(Counting())
    long_ids = tokenizer.encode("word " * 400, add_special_tokens=False)
    text = "".join(detok.push([t]) for t in long_ids) + detok.flush()
    assert text == "word " * 400
    assert sum(decoded) < 5 * len(long_ids)  # whole re-decodes would be ~len^2 / 2


# --- decoder and encoder stages -------------------------------------------------------------------------


def test_decoder_stage_fails_a_chunk_whose_stream_was_lost(config):
    """A later chunk reaching a replica without its stream (it lived on a replaced replica) fails at once; one whose
    earlier chunk never arrives fails by name after chunk_wait_s instead of waiting for the caller's stage timeout;
    the replica keeps serving other streams."""
    import dataclasses

    from actors.decoder_stage import DecoderStage

    stage = DecoderStage(dataclasses.replace(config.decoder, chunk_wait_s=0.3))

    async def main():
        with pytest.raises(ValueError, match="chunk 2 reached a decoder replica without its stream"):
            await stage.push(CodesChunk("lost", [1, 2, 3], seq=2))
        await stage.push(CodesChunk("gap", [1, 2, 3], seq=0))
        with pytest.raises(ValueError, match="chunk 2 waited 0.3 s for chunk 1 .*stream was lost"):
            await stage.push(CodesChunk("gap", [1, 2, 3], seq=2))
        return await stage.push(CodesChunk("fresh", [1, 2, 3], seq=0, final=True))

    assert len(asyncio.run(main()).pcm) > 0 and not stage.streams


def test_decoder_stage_batches_streams_and_matches_plain_stream_pushes(config):
    from actors.decoder_stage import DecoderStage

    stage = DecoderStage(config.decoder)
    rng = np.random.default_rng(0)
    chunks = {f"s{i}": [rng.integers(0, 16384, 8).tolist() for _ in range(3)] for i in range(3)}

    async def push_all():
        async def one(rid):
            out = [await stage.push(CodesChunk(rid, codes, seq=i)) for i, codes in enumerate(chunks[rid])]
            out.append(await stage.push(CodesChunk(rid, [], final=True, seq=len(chunks[rid]))))
            return np.concatenate([c.pcm for c in out])
        return await asyncio.gather(*(one(rid) for rid in chunks))

    batched = asyncio.run(push_all())
    assert stage.batcher.largest_batch > 1 and not stage.streams  # final chunks freed the streams
    for rid, pcm in zip(chunks, batched):
        stream = stage.decoder.stream(mode="incremental", n_steps=config.decoder.n_steps, seed=config.decoder.seed)
        reference = np.concatenate([stream.push(c) for c in chunks[rid]] + [stream.finish()])
        assert_same_audio(pcm, reference)

    async def out_of_order(rid):  # Ray may run calls in flight to an async actor in any order: seq restores it
        first = await stage.push(CodesChunk(rid, chunks[rid][0], seq=0))  # senders await a stream's first chunk
        calls = [stage.push(CodesChunk(rid, codes, seq=i)) for i, codes in enumerate(chunks[rid]) if i]
        calls.append(stage.push(CodesChunk(rid, [], final=True, seq=len(chunks[rid]))))
        tasks = [asyncio.ensure_future(c) for c in reversed(calls)]  # final first, second chunk last
        out = await asyncio.gather(*tasks)
        return np.concatenate([first.pcm] + [c.pcm for c in reversed(out)])

    assert_same_audio(asyncio.run(out_of_order("s1")), batched[1])
    assert not stage.streams

    async def open_and_close():
        await stage.push(CodesChunk("x", chunks["s0"][0]))
        return len(stage.streams), await stage.close("x"), await stage.close("x")

    assert asyncio.run(open_and_close()) == (1, True, False)

    async def late_chunks_after_close():  # a chunk waiting for its turn, and one arriving after close
        await stage.push(CodesChunk("y", chunks["s0"][0], seq=0))
        waiting = asyncio.ensure_future(stage.push(CodesChunk("y", chunks["s0"][2], seq=2)))
        await asyncio.sleep(0.01)
        await stage.close("y")
        results = await asyncio.gather(waiting, stage.push(CodesChunk("y", chunks["s0"][1], seq=1)),
                                       return_exceptions=True)
        return results, dict(stage.streams)

    results, streams = asyncio.run(late_chunks_after_close())
    assert all(isinstance(r, ValueError) and "closed" in str(r) for r in results) and not streams
    placement = asyncio.run(stage.placement())
    assert placement.device == "cpu" and placement.gpu_ids == [] and placement.stage == "decoder"


def test_encoder_stage_batches_and_matches_the_encoder(config):
    from actors.encoder_stage import EncoderStage

    stage = EncoderStage(config.encoder)
    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(16000 * s)).astype(np.float32) for s in (1, 2, 1)]

    async def main():
        return await asyncio.gather(*(stage.encode(AudioPayload(w, 16000)) for w in waves))

    codes = asyncio.run(main())
    assert codes == [stage.encoder.encode(w, 16000) for w in waves]
    assert all(len(c) > 0 for c in codes)
    with pytest.raises(ValueError, match="AudioPayload"):
        asyncio.run(stage.encode(waves[0]))
