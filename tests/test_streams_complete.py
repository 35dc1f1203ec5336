"""A response is complete or it fails visibly (issue 25's silent truncation: at 16 concurrent streamed speech
requests one came back 200 with half its audio, a chunk refused at the decoder's capacity having started the
decoder's lost-stream clock, and the body ending as a clean EOF).

- one request keeps at most `max_inflight_chunks` chunks at the decoder (the decoder's caps are sized on that);
- the decoder's caps are derived from the LLM's: they hold every LLM slot's chunks in flight;
- a chunk the decoder refused at capacity is resent, in order, and never starts the decoder's `chunk_wait_s` clock;
- rounds of 16 concurrent streamed speech requests at the shipped stage settings: every 200 response carries all
  the audio its usage reports (SSE: summed deltas vs `speech.audio.done` usage; raw pcm: bytes vs the same
  request's usage), and a stream that loses its decoder mid-way is an error the client sees (an SSE `error` event;
  an aborted chunked body for raw pcm, through httpx and the openai SDK), never a clean short body.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from actors.orchestration import ChunkGate, Limits, StageBusy, run_request
from actors.payloads import CodesChunk, LLMEnd, LLMOutput, PCMChunk
from actors.results import collect_async
from serve_testing import API_KEY, serve_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHIPPED = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())["applications"][0]["args"]
TEXT = "Hello there, how are you today?"
MAX_NEW_TOKENS = 32  # 3 audio chunks and the flush per stream on the tiny model
ROUNDS, CONCURRENT = 10, 16


# -- one request's chunks at the decoder ------------------------------------------------------------------


class CountingStages:
    """An LLM that sends `n` audio chunks at once and a slow decoder that counts the calls it holds at a time."""

    def __init__(self, n: int = 12):
        self.n, self.holding, self.most = n, 0, 0

    async def generate(self, request):
        for i in range(self.n):
            yield LLMOutput(request.request_id, "", [], [[i, i + 1]])
        yield LLMOutput(request.request_id, "", [], [], LLMEnd("stop", {}, [], 0.0))

    async def push(self, chunk):
        self.holding += 1
        self.most = max(self.most, self.holding)
        await asyncio.sleep(0.01)
        self.holding -= 1
        return PCMChunk(chunk.request_id, np.ones(len(chunk.codes), np.float32), 22050, chunk.seq + 1)

    def close(self, request_id):
        pass

    def abort(self, request_id):
        pass


@pytest.mark.parametrize("inflight", [1, 2, 4])
def test_one_request_holds_at_most_max_inflight_chunks_at_the_decoder(inflight):
    stages = CountingStages()
    limits = Limits(stage_timeout_s=5, request_timeout_s=10, max_inflight_chunks=inflight)
    result = asyncio.run(collect_async(run_request(stages, limits, "tts", text="hello")))
    assert result.ok, result.error
    assert len(result.pcm) == 2 * stages.n and result.done.usage["decoder"]["chunks"] == stages.n + 1
    assert stages.most == inflight  # the chunk being awaited counts: the decoder's caps are sized on this


def test_decoder_caps_are_derived_to_hold_every_llm_slots_chunks():
    """`serve.app.Args` raises (never lowers) the decoder's caps until it holds llm.max_ongoing_requests x
    llm.max_replicas x max_inflight_chunks chunks: all running at its max replicas, the rest queued at its fewest."""
    from serve.app import Args

    def chunks(args):
        return args.llm.max_ongoing_requests * args.llm.max_replicas * args.max_inflight_chunks

    for values in ({}, SHIPPED, {"llm": {"max_ongoing_requests": 32, "max_replicas": 4},
                                 "decoder": {"max_ongoing_requests": 8, "max_queued_requests": 8, "max_replicas": 2}},
                   {"max_inflight_chunks": 4, "decoder": {"max_queued_requests": -1}}):
        args = Args.model_validate(values)
        d = args.decoder
        assert d.max_ongoing_requests * d.max_replicas >= chunks(args), values
        assert d.max_queued_requests == -1 or (
            d.max_ongoing_requests * max(d.min_replicas, 1) + d.max_queued_requests >= chunks(args)), values
    shipped = Args.model_validate(SHIPPED).decoder  # the shipped config already holds them: unchanged
    assert (shipped.max_ongoing_requests, shipped.max_queued_requests) == (
        SHIPPED["decoder"]["max_ongoing_requests"], SHIPPED["decoder"]["max_queued_requests"])
    raised = Args.model_validate({"llm": {"max_ongoing_requests": 32, "max_replicas": 4},
                                  "decoder": {"max_ongoing_requests": 8, "max_replicas": 2}}).decoder
    assert raised.max_ongoing_requests == 128  # 32 x 4 x 2 chunks over 2 replicas


# -- a chunk refused at capacity ----------------------------------------------------------------------------


class RefusingDecoder:
    """A decoder deployment handle (`push.remote`) over a real DecoderStage: a call is accepted in a step of its
    own (as Serve's router does), and chunk `refuse_seq` is refused at capacity (BackPressureError) `refusals`
    times first. `arrived` lists the chunks in the order they reached the stage."""

    def __init__(self, stage, refuse_seq: int, refusals: int):
        self.stage, self.refuse_seq, self.left = stage, refuse_seq, refusals
        self.arrived: list[int] = []
        self.push = self  # handle.push.remote(chunk)

    def remote(self, chunk):
        return _Response(self, chunk)


class _Response:
    def __init__(self, handle, chunk):
        self.handle, self.chunk, self.task = handle, chunk, None

    async def _fetch_future_result_async(self):
        from ray.serve.exceptions import BackPressureError

        await asyncio.sleep(0.05)  # routing takes a moment
        if self.chunk.seq == self.handle.refuse_seq and self.handle.left > 0:
            self.handle.left -= 1
            raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
        if self.task is None:
            self.handle.arrived.append(self.chunk.seq)
            self.task = asyncio.ensure_future(self.handle.stage.push(self.chunk))

    def __await__(self):
        return self.task.__await__()

    def cancel(self):
        if self.task is not None:
            self.task.cancel()


def test_a_refused_chunk_is_resent_in_order_and_never_starts_the_wait_clock(tiny_models):
    """Chunk 1 is refused at capacity for longer than the decoder's chunk_wait_s while chunks 2, 3 and the final
    one are sent: they wait at the sender (ChunkGate), not at the decoder, so the stream completes, in order,
    with the audio of plain in-order pushes."""
    from actors.config import PipelineConfig
    from actors.decoder_stage import DecoderStage
    from serve.deployments import ServeStageClients

    config = PipelineConfig.from_models_dir(tiny_models).decoder
    stage = DecoderStage(dataclasses.replace(config, chunk_wait_s=0.2))
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 16384, 6).tolist() for _ in range(4)]
    chunks = [CodesChunk("r", c, seq=i) for i, c in enumerate(codes)] + [CodesChunk("r", [], final=True, seq=4)]

    async def stream(handle):
        clients = ServeStageClients(None, None, handle)
        first = await clients.push(chunks[0])  # the orchestration awaits the first chunk, then keeps 2+ in flight
        rest = await asyncio.gather(*(clients.push(c) for c in chunks[1:]))
        return clients, np.concatenate([first.pcm] + [c.pcm for c in rest])

    handle = RefusingDecoder(stage, refuse_seq=1, refusals=8)  # refused for ~0.4 s (8 x 50 ms routing) + backoff
    clients, pcm = asyncio.run(stream(handle))
    assert handle.left == 0 and clients.chunk_gate.refused == 8  # every refusal was resent
    assert handle.arrived == [0, 1, 2, 3, 4]  # nothing passed the refused chunk
    assert not stage.streams and not clients.chunk_gate.accepted  # the final chunk freed both sides

    reference = DecoderStage(config)

    async def plain():
        return np.concatenate([(await reference.push(c)).pcm for c in chunks])

    np.testing.assert_allclose(pcm, asyncio.run(plain()), atol=1e-4)


def test_a_chunk_refused_past_the_busy_bound_fails_the_stream_as_busy():
    async def refused():
        raise StageBusy("decoder", "decoder stage is at capacity")

    async def main():
        gate = ChunkGate(busy_timeout_s=0.3)
        with pytest.raises(StageBusy):
            await gate.send(CodesChunk("r", [1], seq=0), refused)
        return gate

    assert asyncio.run(main()).refused >= 3  # resent, backing off, until the bound


# -- the endpoint under load, and a lost stream -------------------------------------------------------------


def _stages_as_shipped() -> dict:
    """serve/config.yaml's stage settings (caps, queue caps, GPU shares on the session's logical GPUs), at their
    fewest replicas: autoscaling more replicas onto this 2-core machine would test the machine, not the caps."""
    return {stage: {**SHIPPED[stage], "max_replicas": max(SHIPPED[stage]["min_replicas"], 1)}
            for stage in ("encoder", "llm", "decoder")}


@pytest.fixture(scope="module")
def url(ray_session, tiny_models):
    with serve_app(tiny_models, max_tokens=2048, **_stages_as_shipped()) as base:
        yield base


SPEECH = {"model": "vita-audio", "input": TEXT, "response_format": "pcm", "max_new_tokens": MAX_NEW_TOKENS}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


async def _sse(client, url: str, body: dict = SPEECH) -> dict:
    """One SSE speech response: status, events, the audio bytes of its deltas."""
    async with client.stream("POST", f"{url}/v1/audio/speech", json={**body, "stream_format": "sse"},
                             headers=HEADERS) as response:
        text = (await response.aread()).decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    return {"status": response.status_code, "events": events, "bytes": len(audio)}


async def _raw(client, url: str, body: dict = SPEECH) -> dict:
    """One raw streamed pcm response: status and byte count if the body ended cleanly, else the error."""
    data = b""
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body, headers=HEADERS) as response:
            async for part in response.aiter_bytes():
                data += part
    except Exception as err:  # noqa: BLE001 - what the client saw
        return {"status": response.status_code, "bytes": len(data), "error": err}
    return {"status": response.status_code, "bytes": len(data), "error": None}


def _audio_tokens(sse: dict) -> int:
    done = sse["events"][-1]
    assert done["type"] == "speech.audio.done", sse["events"][-1]
    return done["usage"]["output_tokens_details"]["audio_tokens"]


@pytest.mark.slow
def test_rounds_of_16_concurrent_streams_carry_all_their_audio(url):
    """Each round: 8 SSE and 8 raw pcm streams at once. Each SSE response's deltas hold the audio its usage
    reports: as many bytes per audio token as the same request alone, to within half a token (a lost chunk is
    at least one token). Raw pcm has no usage in its headers (they go before the audio): its bytes are those of
    the same request's SSE stream, whose usage reports the same audio tokens in every round."""
    import httpx

    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=2 * CONCURRENT)) as client:
            alone = await _sse(client, url)
            rounds = []
            for _ in range(ROUNDS):
                rounds.append(await asyncio.gather(*(_sse(client, url) if i % 2 else _raw(client, url)
                                                     for i in range(CONCURRENT))))
            return alone, rounds

    alone, rounds = asyncio.run(main())
    assert alone["status"] == 200
    tokens = _audio_tokens(alone)
    assert tokens > 0 and alone["bytes"] > 0
    per_token = alone["bytes"] / tokens
    for n, responses in enumerate(rounds):
        for i, r in enumerate(responses):
            where = f"round {n} stream {i}"
            assert r["status"] == 200, (where, r)
            if "events" in r:
                got = _audio_tokens(r)
                assert abs(r["bytes"] - got * per_token) < per_token / 2, (where, r["bytes"], got, per_token)
                assert got == tokens, (where, got, tokens)  # greedy, forced layout: the same request, the same audio
                assert r["bytes"] == alone["bytes"], (where, r["bytes"], alone["bytes"])
            else:
                assert r["error"] is None, (where, r["error"])
                assert r["bytes"] == alone["bytes"], (where, r["bytes"], alone["bytes"])


def _kill_decoder_replicas() -> int:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "vita-decoder" in a["name"] and a["namespace"] == "serve"]
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return len(names)


@pytest.mark.slow
def test_a_stream_that_loses_its_decoder_is_an_error_the_client_sees(url):
    """Long streams (SSE, raw pcm through httpx, raw pcm through the openai SDK) lose their decoder replica after
    their first audio: SSE ends with an `error` event, never `speech.audio.done`; the raw bodies are aborted (no
    terminating chunk), so both clients raise instead of returning a clean, short body."""
    import threading

    import httpx
    import openai

    long = {**SPEECH, "max_new_tokens": 1024}
    started = threading.Barrier(4, timeout=120)
    results: dict = {}

    def sse():
        with httpx.stream("POST", f"{url}/v1/audio/speech", json={**long, "stream_format": "sse"}, headers=HEADERS,
                          timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            started.wait()
            events = [json.loads(first[6:])] + [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        results["sse"] = (response.status_code, events)

    def raw():
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=long, headers=HEADERS, timeout=120) as response:
            parts = response.iter_bytes()
            next(parts)
            started.wait()
            try:
                for _ in parts:
                    pass
                results["raw"] = (response.status_code, None)
            except httpx.HTTPError as err:
                results["raw"] = (response.status_code, err)

    def sdk():
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        with client.audio.speech.with_streaming_response.create(
                model="vita-audio", voice="alloy", input=TEXT, response_format="pcm",
                extra_body={"max_new_tokens": 1024}) as response:
            parts = response.iter_bytes()
            next(parts)
            started.wait()
            try:
                for _ in parts:
                    pass
                results["sdk"] = (response.status_code, None)
            except Exception as err:  # noqa: BLE001 - the SDK's transport raises its own httpx's errors
                results["sdk"] = (response.status_code, err)

    threads = [threading.Thread(target=f) for f in (sse, raw, sdk)]
    for t in threads:
        t.start()
    started.wait()
    assert _kill_decoder_replicas() >= 1
    for t in threads:
        t.join(180)
    status, events = results["sse"]
    assert status == 200 and events[-1]["type"] == "error", events[-1]
    assert "decoder" in events[-1]["error"]["message"] and all(e["type"] != "speech.audio.done" for e in events)
    for name in ("raw", "sdk"):
        status, err = results[name]
        assert status == 200 and type(err).__name__ == "RemoteProtocolError", (name, results[name])
        assert "incomplete chunked read" in str(err)  # the body was aborted: no terminating chunk
