"""The one speech data path (`actors.orchestration.run_request`) over stage clients: events and timings,
retries while a stage restarts, stage-named failures, cancellation; and LocalPipeline without ray."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import numpy as np

from actors.orchestration import Limits, StageBusy, StageFailure, StageRestarting, run_request
from actors.payloads import AudioChunk, LLMEnd, LLMOutput, PCMChunk
from actors.results import collect_async

LIMITS = Limits(stage_timeout_s=5.0, request_timeout_s=10.0, max_inflight_chunks=1)


class ScriptedStages:
    """Stage clients that produce fixed outputs; `restarts[stage]` calls raise StageRestarting first."""

    def __init__(self, chunks=([1, 2, 3], [4, 5]), restarts=None, fail=None, hang_after=None):
        self.chunks, self.restarts, self.fail, self.hang_after = list(chunks), dict(restarts or {}), fail, hang_after
        self.calls = {"encode": 0, "generate": 0, "push": 0}
        self.pushed, self.closed, self.aborted = [], [], []

    def _maybe_fail(self, stage: str) -> None:
        if self.restarts.get(stage, 0) > 0:
            self.restarts[stage] -= 1
            raise StageRestarting(stage, f"{stage} restarting")
        if self.fail == stage:
            raise RuntimeError("boom")

    async def encode(self, audio):
        self.calls["encode"] += 1
        self._maybe_fail("encoder")
        return [7] * 5

    async def generate(self, request):
        self.calls["generate"] += 1
        self._maybe_fail("llm")
        for i, chunk in enumerate(self.chunks):
            if self.hang_after is not None and i >= self.hang_after:
                await asyncio.sleep(3600)
            yield LLMOutput(request.request_id, f"w{i} ", [100 + i], [list(chunk)])
        yield LLMOutput(request.request_id, "", [], [], LLMEnd("stop", {"steps": 3}, [1, 2], 0.0))

    async def push(self, chunk):
        self.calls["push"] += 1
        self._maybe_fail("decoder")
        self.pushed.append((chunk.seq, list(chunk.codes), chunk.final))
        return PCMChunk(chunk.request_id, np.full(len(chunk.codes), chunk.seq, np.float32), 22050, chunk.seq + 1)

    def close(self, request_id):
        self.closed.append(request_id)

    def abort(self, request_id):
        self.aborted.append(request_id)


def run(stages, task="tts", **kwargs):
    kwargs.setdefault("text", "hello")
    return asyncio.run(collect_async(run_request(stages, LIMITS, task, **kwargs)))


def test_events_in_order_with_timings_and_usage():
    stages = ScriptedStages()
    result = run(stages, request_id="r1")
    assert result.ok, result.error
    assert result.text == "w0 w1 " and result.audio_codes == [1, 2, 3, 4, 5]
    assert [seq for seq, _, _ in stages.pushed] == [0, 1, 2] and stages.pushed[-1] == (2, [], True)
    assert np.array_equal(result.pcm, np.array([0, 0, 0, 1, 1], np.float32))
    assert {"time_to_first_text", "time_to_first_audio", "first_audio_codes", "llm_done", "total"} <= set(
        result.done.timings)
    assert result.done.usage["decoder"]["chunks"] == 3 and result.done.usage["llm"] == {"steps": 3}
    assert not stages.aborted and not stages.closed  # a finished request frees nothing


def test_restarting_stages_are_retried_where_resending_is_safe(tmp_path):
    from pipeline.audio import write_audio

    write_audio(tmp_path / "q.wav", np.zeros(16000, np.float32), 16000)
    stages = ScriptedStages(restarts={"encoder": 2, "llm": 2, "decoder": 1})
    result = run(stages, task="chat", text=None, audio=str(tmp_path / "q.wav"))
    assert result.ok, result.error
    assert stages.calls["encode"] == 3 and stages.calls["generate"] == 3
    assert stages.calls["push"] == 3 + 1  # the first chunk was resent once


def test_a_failing_stage_ends_the_request_with_its_name():
    for stage in ("llm", "decoder"):
        stages = ScriptedStages(fail=stage)
        result = run(stages, request_id="r2")
        assert result.error.stage == stage and "boom" in result.error.message
        assert stages.aborted == ["r2"] and stages.closed == ["r2"]
    result = run(ScriptedStages(), text="  ")
    assert result.error.stage == "input" and not result.chunks


def test_a_stage_at_capacity_ends_the_request_as_busy():
    class FullLLM(ScriptedStages):
        async def generate(self, request):
            raise StageBusy("llm", "llm stage is at capacity")
            yield  # an async generator

    result = run(FullLLM(), request_id="r3")
    assert result.error.stage == "llm" and result.error.busy and "capacity" in result.error.message
    assert not run(ScriptedStages(fail="llm")).error.busy  # a failure is not a refusal at capacity


def test_stage_without_progress_times_out_by_name():
    stages = ScriptedStages(hang_after=1)
    limits = Limits(stage_timeout_s=0.2, request_timeout_s=10.0, max_inflight_chunks=1)
    events = asyncio.run(collect_async(run_request(stages, limits, "tts", text="x", request_id="r3")))
    assert events.error.stage == "llm" and "stage_timeout_s" in events.error.message


def test_consumer_that_stops_aborts_and_closes():
    stages = ScriptedStages(hang_after=1)

    async def first_audio():
        agen = run_request(stages, LIMITS, "tts", text="x", request_id="r4")
        async for event in agen:
            if isinstance(event, AudioChunk):
                await agen.aclose()
                return event

    assert isinstance(asyncio.run(first_audio()), AudioChunk)
    assert stages.aborted == ["r4"] and stages.closed == ["r4"]


def test_stage_failure_is_importable_without_ray():
    assert issubclass(StageRestarting, StageFailure)
    code = "import sys, actors.orchestration; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_local_pipeline_runs_tts_and_asr_without_ray(tiny_models, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        from actors.config import PipelineConfig
        from actors.local import LocalPipeline
        from actors.results import collect
        from pipeline.audio import write_audio

        config = PipelineConfig.from_models_dir({str(tiny_models)!r})
        config.decoder.n_steps = 2
        local = LocalPipeline(config)
        tts = collect(local.tts("Hello there.", max_new_tokens=32))
        write_audio({str(tmp_path / 'a.wav')!r}, tts.pcm, tts.sample_rate)
        asr = collect(local.asr({str(tmp_path / 'a.wav')!r}, max_new_tokens=8))
        print(json.dumps({{"tts": tts.ok, "samples": len(tts.pcm), "asr": asr.ok, "asr_ids": len(asr.token_ids),
                          "ray": "ray" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"tts": True, "samples": report["samples"], "asr": True, "asr_ids": 8, "ray": False}
    assert report["samples"] > 0
