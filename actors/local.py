"""The same data path in one process, without Ray: speech encoder, LLM engine and audio decoder objects.

The reference the staged pipeline is checked against (same ids, same audio for greedy decoding) and the
baseline of `vita-audio bench pipeline`. Requests run through the same `actors.orchestration.run_request`
as the staged `Pipeline`; only the stage clients differ (`LocalStageClients`). Nothing here imports ray.

The stages compute on the pipeline's loop thread, one request at a time as before: the decoder decodes a
chunk the moment the LLM hands it over, and the LLM steps again only after that chunk's PCM reached the
consumer (so first-audio timings count no extra engine step).
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import torch

from actors.aio import LoopThread
from actors.config import PipelineConfig
from actors.orchestration import Limits, SpeechAPI
from actors.payloads import (
    AudioPayload,
    CodesChunk,
    LLMOutput,
    PCMChunk,
    SpeechRequest,
    TextDetokenizer,
    build_prompt,
    engine_events_to_output,
    to_generation_request,
)

# loop turns after each LLM output: the PCM of a chunk goes decoder -> PCM reader -> consumer (two hand-offs)
_HAND_OFFS = 4


class LocalStageClients:
    """`StageClients` over in-process stage objects (the encoder, tokenizer + engine, decoder)."""

    def __init__(self, config: PipelineConfig, encoder, tokenizer, layout, engine, decoder):
        self.config, self.encoder, self.tokenizer, self.layout = config, encoder, tokenizer, layout
        self.engine, self.decoder = engine, decoder
        self.streams: dict[str, object] = {}  # request id -> decoder stream

    async def encode(self, audio: AudioPayload) -> list[int]:
        with torch.inference_mode():
            return self.encoder.encode(audio.pcm, audio.sample_rate)

    async def generate(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        prompt_ids = build_prompt(request, self.tokenizer, self.layout)
        detok, token_ids = TextDetokenizer(self.tokenizer), []
        events = self.engine.stream(to_generation_request(request, prompt_ids))
        ended = False
        try:
            while not ended:
                with torch.inference_mode():
                    event = next(events)
                output = engine_events_to_output(request.request_id, [event], self.layout, detok, token_ids)
                ended = output.end is not None
                yield output
                for _ in range(_HAND_OFFS if output.audio_chunks else 1):
                    await asyncio.sleep(0)
        finally:
            events.close()
            if not ended:
                self.engine.abort(request.request_id)

    def push(self, chunk: CodesChunk) -> "asyncio.Future[PCMChunk]":
        """Decodes at once (the hand-off is the call) and returns the finished PCM as a done future."""
        result = asyncio.get_running_loop().create_future()
        try:
            result.set_result(self._decode(chunk))
        except Exception as err:
            self.streams.pop(chunk.request_id, None)
            result.set_exception(err)
        return result

    def _decode(self, chunk: CodesChunk) -> PCMChunk:
        stream = self.streams.get(chunk.request_id)
        if stream is None:
            settings = self.config.decoder
            stream = self.streams[chunk.request_id] = self.decoder.stream(
                kind=settings.stream_kind, n_steps=settings.n_steps, seed=settings.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            pcm = stream.push(list(chunk.codes), chunk.final)
        if chunk.final:
            self.streams.pop(chunk.request_id, None)
        # forwards: one per chunk, as the stage counts a request's unbatched pushes
        return PCMChunk(chunk.request_id, pcm, self.decoder.sample_rate, chunk.seq + 1, time.perf_counter() - start)

    def close(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)


class LocalPipeline(SpeechAPI):
    """tts / asr / chat (sync and `*_async`, see `SpeechAPI`) over stage objects built in this process."""

    def __init__(self, config: PipelineConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from pipeline.decoder.speech_decoder import load_decoder
        from pipeline.encoder.speech_encoder import load_encoder
        from pipeline.engine.decode_engine import DecodeEngine
        from pipeline.llm import load_llm
        from pipeline.tokens.vocab import TokenLayout, load_tokenizer

        self.config = config
        self.encoder = load_encoder(config.encoder.path, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(config.llm.path)
        self.layout = TokenLayout.from_tokenizer(self.tokenizer)
        model = load_llm(config.llm.path, device=device, dtype=dtype)
        self.engine = DecodeEngine(model, layout=self.layout, device=device, dtype=dtype,
                                   max_batch_size=config.llm.max_batch_size,
                                   align_steps=config.llm.align_steps)
        self.decoder = load_decoder(config.decoder.path, device=device, dtype=dtype)
        self.clients = LocalStageClients(config, self.encoder, self.tokenizer, self.layout, self.engine, self.decoder)
        self.limits = Limits.of(config)
        self.bridge = LoopThread("vita-local-pipeline")
