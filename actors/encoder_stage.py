"""EncoderStage: waveform -> audio codes (GLM-4-Voice speech tokenizer), concurrent calls batched.

A plain class that never imports ray: its device and dtype are arguments (tests and `LocalPipeline` build it
directly on CPU; `actors.builder` makes it a Ray actor that computes where Ray placed it).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from actors.batching import MicroBatcher
from actors.config import EncoderStageConfig
from actors.payloads import AudioPayload
from actors.placement import StagePlacement, describe


class EncoderStage:
    def __init__(self, config: EncoderStageConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, **encoder_options):
        """`encoder_options`: passed to `load_encoder` (e.g. `max_batch_windows`)."""
        from pipeline.encoder.speech_encoder import load_encoder

        self.config = config
        if config.resources.torch_threads:
            torch.set_num_threads(config.resources.torch_threads)
        self.device, self.dtype = torch.device(device), dtype
        self.encoder = load_encoder(config.path, device=self.device, dtype=self.dtype, **encoder_options)
        self.sample_rate = self.encoder.sample_rate
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self.batcher = MicroBatcher(self._encode_batch, config.max_batch_size, self.executor)
        self.started_at = time.time()

    def _encode_batch(self, payloads: list[AudioPayload]) -> list[list[int]]:
        with torch.inference_mode():
            return self.encoder.encode_batch([p.pcm for p in payloads], [p.sample_rate for p in payloads])

    async def encode(self, audio: AudioPayload) -> list[int]:
        """Audio codes of one waveform (shares a forward with concurrent calls)."""
        if not isinstance(audio, AudioPayload):
            raise ValueError(f"audio must be an AudioPayload, got {type(audio).__name__}")
        return await self.batcher.submit(audio)

    async def encode_waveforms(self, waveforms: list[np.ndarray]) -> list[list[int]]:
        """Audio codes of many 16 kHz waveforms at once (a batch job's call: their windows share forwards in
        groups of `max_batch_windows`; the same codes as one at a time)."""
        def run() -> list[list[int]]:
            with torch.inference_mode():
                return self.encoder.encode_waveforms(waveforms) if waveforms else []

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    async def stats(self) -> dict:
        return {"forwards": self.batcher.batches, "largest_batch": self.batcher.largest_batch}

    async def placement(self) -> StagePlacement:
        return describe("encoder", self.device, self.dtype)

    async def check_health(self) -> None:
        """Raises if the stage cannot serve (Ray restarts an actor whose health check keeps failing in Serve)."""
        if self.executor._shutdown:
            raise RuntimeError("encoder stage executor is shut down")
