"""The same data path in one process, without Ray: the three stage objects (`EncoderStage`, `LLMStage`,
`DecoderStage`) driven on the pipeline's own event loop.

The reference the staged pipeline is checked against (same ids, same audio for greedy decoding) and the
baseline of `vita-audio bench pipeline`. Requests run through the same `actors.orchestration.run_request`
over the same stage classes as the staged `StagedPipeline`; only the stage clients differ (`LocalStageClients`
calls the objects' methods where `RayStageClients` sends them to actors). Nothing here imports ray.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from actors.aio import LoopThread
from actors.config import PipelineConfig
from actors.decoder_stage import DecoderStage
from actors.encoder_stage import EncoderStage
from actors.llm_stage import LLMStage
from actors.orchestration import Limits, SpeechAPI
from actors.payloads import AudioPayload, CodesChunk, LLMOutput, PCMChunk, SpeechRequest
from actors.requests import model_caps


@dataclass
class LocalStages:
    """The three stage objects of a `LocalPipeline` (as `actors.builder.StageHandles` holds the actors)."""

    encoder: EncoderStage | None = None  # a batch job's pool holds only the stages it runs
    llm: LLMStage | None = None
    decoder: DecoderStage | None = None

    def get(self, stage: str):
        return getattr(self, stage)


class LocalStageClients:
    """`StageClients` over stage objects in this process: their methods, called on the caller's event loop."""

    def __init__(self, stages: LocalStages):
        self.stages = stages
        self.pending: set[asyncio.Task] = set()  # fire-and-forget calls not yet done

    async def encode(self, audio: AudioPayload) -> list[int]:
        return await self.stages.encoder.encode(audio)

    def generate(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        return self.stages.llm.generate(request)

    async def push(self, chunk: CodesChunk) -> PCMChunk:
        return await self.stages.decoder.push(chunk)

    def close(self, request_id: str) -> None:
        self._fire(self.stages.decoder.close(request_id))

    def abort(self, request_id: str) -> None:
        self._fire(self.stages.llm.abort(request_id))

    def _fire(self, call) -> None:
        try:
            task = asyncio.get_running_loop().create_task(call)
        except RuntimeError:  # no running loop (the request's generator was dropped): nothing can run it
            call.close()
            return
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)


class LocalPipeline(SpeechAPI):
    """tts / asr / chat (sync and `*_async`, see `SpeechAPI`) over stage objects built in this process, on
    `device` in `dtype` (CPU fp32 by default)."""

    def __init__(self, config: PipelineConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.config = config
        self.stages = LocalStages(EncoderStage(config.encoder, device, dtype), LLMStage(config.llm, device, dtype),
                                  DecoderStage(config.decoder, device, dtype))
        self.clients = LocalStageClients(self.stages)
        self.encoder = self.stages.encoder.encoder  # the speech encoder (callers encode audio prompts with it)
        self.tokenizer, self.layout = self.stages.llm.tokenizer, self.stages.llm.layout
        self.limits = Limits.of(config)
        self.caps = model_caps(config.llm.path)  # the request policy's model caps (actors.requests)
        self.bridge = LoopThread("vita-local-pipeline")

    def shutdown(self) -> None:
        """Stop the pipeline's event loop (its LLM stage's engine task with it)."""
        self.bridge.stop()
