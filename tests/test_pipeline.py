"""The staged Ray pipeline on the session Ray (3 logical GPUs): placement, equality with the in-process
composition, real streaming, concurrency, cancellation, bad input, and (slow) stage failures.

One StagedPipeline serves the whole module (starting the three actors costs seconds); the fault tests come last
because they kill its actors (which Ray restarts).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
import torch

from actors.config import PipelineConfig
from actors.payloads import AudioChunk, Done, ErrorEvent
from actors.staged_pipeline import StagedPipeline
from actors.results import collect

def assert_same_audio(batched: np.ndarray, single: np.ndarray) -> None:
    """Same audio up to float reordering: a batched decoder forward sums in another order than a single one."""
    assert batched.shape == single.shape and len(single) > 0
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-2)
    assert np.sqrt(np.mean((batched - single) ** 2)) < 1e-2 * np.sqrt(np.mean(single ** 2))


TEXTS = ["Hello there.", "How are you today?", "The cat sat on the mat.", "One two three.",
         "Good morning!", "A short test.", "Streaming speech.", "Last one here."]


def small_config(models) -> PipelineConfig:
    """Tiny buffers (so backpressure shows), few ODE steps (fast), short timeouts (nothing hangs)."""
    config = PipelineConfig.from_models_dir(models, stage_timeout_s=30.0, request_timeout_s=120.0, max_inflight_chunks=1)
    config.llm.queue_size = 1
    config.decoder.n_steps = 2
    for stage in ("encoder", "llm", "decoder"):
        config.stage(stage).resources.max_restarts = 2
        # same torch thread count as this process: float reductions (and so the audio) match bit for bit
        config.stage(stage).resources.torch_threads = torch.get_num_threads()
    return config


@pytest.fixture(scope="module")
def pipe(ray_session, tiny_models):
    pipeline = StagedPipeline.start(small_config(tiny_models))
    try:
        yield pipeline
    finally:
        pipeline.shutdown()


@pytest.fixture(scope="module")
def local(tiny_models):
    from actors.local import LocalPipeline

    return LocalPipeline(small_config(tiny_models))


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory, local):
    """A real wav: the tiny TTS output (2-3 s of 22.05 kHz audio), so ASR/chat read a file like a user's."""
    from pipeline.audio import write_audio

    result = collect(local.tts("Hello there, how are you?", max_new_tokens=48))
    path = tmp_path_factory.mktemp("speech") / "hello.wav"
    write_audio(path, result.pcm, result.sample_rate)
    return path


def test_stages_get_three_different_gpus(pipe):
    placement = pipe.placement()
    gpu_ids = [tuple(placement[stage].gpu_ids) for stage in ("encoder", "llm", "decoder")]
    assert all(len(ids) == 1 for ids in gpu_ids)
    assert len(set(gpu_ids)) == 3  # one logical GPU each
    assert {p.cuda_visible_devices for p in placement.values()} == {ids[0] for ids in gpu_ids}
    assert len({p.node_id for p in placement.values()}) == 1  # PACK on the one local node
    for p in placement.values():  # no CUDA here: the stage falls back to CPU / fp32
        assert p.device == "cpu" and p.dtype == "float32" and p.node_id and p.ip


def test_tts_equals_in_process_composition(pipe, local):
    staged = collect(pipe.tts("Hello there.", max_new_tokens=40))
    reference = collect(local.tts("Hello there.", max_new_tokens=40))
    assert staged.ok, staged.error
    assert staged.token_ids == reference.token_ids and len(staged.token_ids) == 40
    assert staged.audio_codes == reference.audio_codes and staged.audio_codes
    assert staged.text == reference.text
    assert staged.sample_rate == reference.sample_rate == 22050
    np.testing.assert_allclose(staged.pcm, reference.pcm, rtol=0, atol=1e-6)
    assert len(staged.pcm) > 0


def test_asr_and_chat_equal_in_process(pipe, local, speech_file):
    staged = collect(pipe.asr(speech_file, max_new_tokens=16))
    reference = collect(local.asr(speech_file, max_new_tokens=16))
    assert staged.ok, staged.error
    assert staged.token_ids == reference.token_ids and staged.text == reference.text
    assert not staged.chunks and not staged.audio_codes  # ASR: text only
    assert staged.done.usage["encoder"]["codes"] > 0

    staged = collect(pipe.chat(speech_file, max_new_tokens=40))
    reference = collect(local.chat(speech_file, max_new_tokens=40))
    assert staged.ok, staged.error
    assert staged.token_ids == reference.token_ids
    np.testing.assert_allclose(staged.pcm, reference.pcm, rtol=0, atol=1e-6)
    forwards = {k: staged.done.usage["llm"][k] for k in ("backbone_forwards", "mtp_forwards")}
    assert forwards == {k: reference.done.usage["llm"][k] for k in forwards}
    # one forward per new token, plus one per extra piece of a prompt longer than the engine's prefill chunk
    assert 40 <= sum(forwards.values()) <= 40 + staged.done.usage["llm"].get("prompt_tokens", 10**6) // 64


def test_staged_and_local_run_the_same_orchestration(pipe, local, speech_file, monkeypatch):
    """Both front ends call `actors.orchestration.run_request` (only their stage clients differ) and agree."""
    import actors.orchestration as orchestration

    seen = []
    original = orchestration.run_request

    def counting(clients, limits, task, **kwargs):
        seen.append((type(clients).__name__, task))
        return original(clients, limits, task, **kwargs)

    monkeypatch.setattr(orchestration, "run_request", counting)
    for run in (lambda p: p.tts("Good morning!", max_new_tokens=32), lambda p: p.asr(speech_file, max_new_tokens=12)):
        staged, reference = collect(run(pipe)), collect(run(local))
        assert staged.ok and reference.ok, (staged.error, reference.error)
        assert staged.token_ids == reference.token_ids and staged.audio_codes == reference.audio_codes
        np.testing.assert_allclose(staged.pcm, reference.pcm, rtol=0, atol=1e-6)
    assert seen == [("RayStageClients", "tts"), ("LocalStageClients", "tts"),
                    ("RayStageClients", "asr"), ("LocalStageClients", "asr")]


@pytest.mark.parametrize("task", ["tts", "chat"])
def test_first_audio_arrives_before_the_llm_finishes(pipe, task):
    events = []
    stream = pipe.tts("Streaming speech, chunk by chunk.", max_new_tokens=200) if task == "tts" else \
        pipe.chat("Tell me a story.", max_new_tokens=200)
    for event in stream:
        events.append(event)
    done = events[-1]
    assert isinstance(done, Done), done
    kinds = [type(e).__name__ for e in events]
    first_audio = kinds.index("AudioChunk")
    # event order: text from the LLM keeps coming after the first PCM chunk
    assert "TextDelta" in kinds[first_audio:]
    # time: the LLM stage's own finish stamp is later than the first PCM at the client
    assert done.timings["time_to_first_audio"] < done.timings["llm_finished"] < done.timings["total"]
    assert done.usage["decoder"]["chunks"] >= 5


def test_eight_concurrent_tts_equal_sequential(pipe):
    sequential = [collect(pipe.tts(text, max_new_tokens=30)) for text in TEXTS]
    results = [None] * len(TEXTS)
    steps_before = pipe.stats()["llm"]["steps"]

    def run(i):
        results[i] = collect(pipe.tts(TEXTS[i], max_new_tokens=30))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for seq, par in zip(sequential, results):
        assert par is not None and par.ok, par and par.error
        assert par.token_ids == seq.token_ids
        assert_same_audio(par.pcm, seq.pcm)
    stats = pipe.stats()
    assert stats["llm"]["largest_batch"] > 1  # requests shared decode steps
    # 8 x 30 tokens in far fewer steps than 240: continuous batching
    assert stats["llm"]["steps"] - steps_before < 8 * 30
    assert stats["llm"]["active"] == 0 and stats["decoder"]["open_streams"] == 0


def test_consumer_that_stops_frees_llm_and_decoder_state(pipe):
    stream = pipe.tts("Stop me early, please.", max_new_tokens=400)
    for event in stream:
        if isinstance(event, AudioChunk):
            break
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = pipe.stats()
        if stats["llm"]["active"] == 0 and stats["decoder"]["open_streams"] == 0:
            break
        time.sleep(0.1)
    assert stats["llm"]["active"] == 0 and stats["decoder"]["open_streams"] == 0
    assert collect(pipe.tts("Still working?", max_new_tokens=12)).ok


def test_bad_input_ends_with_an_input_error(pipe, tmp_path):
    for events in (pipe.tts("   "), pipe.asr(tmp_path / "missing.wav")):
        result = collect(events)
        assert result.error is not None and result.error.stage == "input"
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    result = collect(pipe.asr(corrupt))
    assert result.error is not None and result.error.stage == "input"
    bad_mode = collect(pipe.tts("Hi.", mode="warp-speed"))
    # refused at the edge by the request policy (actors.requests), before any stage work
    assert bad_mode.error is not None and bad_mode.error.stage == "input" and "warp-speed" in bad_mode.error.message


def test_request_timeout_gives_an_error_event(pipe):
    result = collect(pipe.tts("A long answer.", max_new_tokens=400, timeout_s=0.2))
    assert result.error is not None and result.error.stage == "pipeline" and "timed out" in result.error.message
    assert collect(pipe.tts("After the timeout.", max_new_tokens=12)).ok


# ---------------------------------------------------------------------------------------------------------
# Failures (slow: they kill actors and wait for Ray to restart them)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["decoder", "llm"])
def test_killed_stage_ends_request_with_error_and_next_request_succeeds(pipe, stage):
    stream = pipe.tts("Kill a stage in the middle of this.", max_new_tokens=400)
    killed_at, events = None, []
    for event in stream:
        events.append(event)
        if killed_at is None and isinstance(event, AudioChunk):
            ray.kill(pipe.stages.get(stage), no_restart=False)
            killed_at = time.monotonic()
    assert killed_at is not None
    error = events[-1]
    assert isinstance(error, ErrorEvent), error
    assert error.stage == stage and "died" in error.message
    assert time.monotonic() - killed_at < 5.0
    result = collect(pipe.tts("After the restart.", max_new_tokens=24))
    assert result.ok, result.error
    assert len(result.pcm) > 0
