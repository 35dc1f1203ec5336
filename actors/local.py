"""The in-process composition of the same modules, without Ray: encoder -> engine.stream -> decoder stream.

The reference the staged pipeline is checked against (same ids, same audio for greedy decoding) and the
baseline of `vita-audio bench pipeline`. It yields the same events as `actors.pipeline.Pipeline`, one
request at a time, with the same glue functions (`actors.payloads`).
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from actors.config import PipelineConfig
from actors.payloads import (
    TASK_DEFAULT,
    AudioChunk,
    Done,
    ErrorEvent,
    PipelineEvent,
    SpeechRequest,
    TextDelta,
    TextDetokenizer,
    build_prompt,
    engine_events_to_output,
    load_waveform,
    new_request_id,
    to_generation_request,
)
from actors.pipeline import _is_codes, _looks_like_path


class LocalPipeline:
    def __init__(self, config: PipelineConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from pipeline.decoder import load_decoder
        from pipeline.encoder import load_encoder
        from pipeline.generate import DecodeEngine
        from pipeline.llm import load_llm
        from pipeline.tokens import TokenLayout, load_tokenizer

        self.config = config
        self.encoder = load_encoder(config.encoder.path, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(config.llm.path)
        self.layout = TokenLayout.from_tokenizer(self.tokenizer)
        model = load_llm(config.llm.path, device=device, dtype=dtype)
        self.engine = DecodeEngine(model, layout=self.layout, device=device, dtype=dtype,
                                   max_batch_size=config.llm.max_batch_size,
                                   align_steps=config.llm.align_steps)
        self.decoder = load_decoder(config.decoder.path, device=device, dtype=dtype)

    def tts(self, text: str, *, voice=None, **options) -> Iterator[PipelineEvent]:
        return self._run("tts", text=text, voice=voice, **options)

    def asr(self, audio, **options) -> Iterator[PipelineEvent]:
        return self._run("asr", audio=audio, **options)

    def chat(self, audio_or_text, *, history: Sequence[dict] = (), voice=None, system: str | None = None,
             **options) -> Iterator[PipelineEvent]:
        if isinstance(audio_or_text, str) and not _looks_like_path(audio_or_text):
            return self._run("chat", text=audio_or_text, history=history, voice=voice, system=system, **options)
        return self._run("chat", audio=audio_or_text, history=history, voice=voice, system=system, **options)

    def _tokenize(self, audio) -> list[int]:
        payload = load_waveform(audio)
        return self.encoder.tokenize(payload.pcm, payload.sample_rate)

    @torch.inference_mode()
    def _run(self, task: str, *, text=None, audio=None, voice=None, history=(), system=None, mode=None,
             max_new_tokens: int = 256, sampling=None, constraint=TASK_DEFAULT, request_id: str = "",
             timeout_s: float | None = None) -> Iterator[PipelineEvent]:
        request_id = request_id or new_request_id(task)
        start, timings = time.perf_counter(), {}
        try:
            codes = self._tokenize(audio) if audio is not None else None
            voice_codes = None
            if voice is not None:
                voice_codes = [int(c) for c in voice] if _is_codes(voice) else self._tokenize(voice)
            request = SpeechRequest(task=task, request_id=request_id, text=text, codes=codes, history=tuple(history),
                                    voice_codes=voice_codes, system=system, mode=mode, max_new_tokens=max_new_tokens,
                                    sampling=sampling, constraint=constraint)
        except (ValueError, FileNotFoundError) as err:
            yield ErrorEvent("input", str(err), request_id)
            return
        prompt_ids = build_prompt(request, self.tokenizer, self.layout)
        detok, token_ids, audio_codes, text_out = TextDetokenizer(self.tokenizer), [], [], ""
        stream, index, end, decoder_compute = None, 0, None, 0.0
        for event in self.engine.stream(to_generation_request(request, prompt_ids)):
            output = engine_events_to_output(request_id, [event], self.layout, detok, token_ids)
            if output.text or output.text_ids:
                text_out += output.text
                timings.setdefault("time_to_first_text", time.perf_counter() - start)
                yield TextDelta(output.text, output.text_ids)
            for chunk in output.audio_chunks:
                timings.setdefault("first_audio_codes", time.perf_counter() - start)
                audio_codes.extend(chunk)
                if stream is None:
                    stream = self.decoder.stream(mode=self.config.decoder.stream_mode, n_steps=self.config.decoder.n_steps,
                                                 seed=self.config.decoder.seed)
                pushed = time.perf_counter()
                pcm = stream.push(chunk)
                decoder_compute += time.perf_counter() - pushed
                if len(pcm):
                    timings.setdefault("first_audio_decoder_compute", decoder_compute)
                    timings.setdefault("time_to_first_audio", time.perf_counter() - start)
                    yield AudioChunk(pcm, self.decoder.sample_rate, index)
                    index += 1
            if output.end is not None:
                end = output.end
                break
        timings["llm_done"] = time.perf_counter() - start
        if stream is not None:
            tail = stream.finish()
            if len(tail):
                timings.setdefault("time_to_first_audio", time.perf_counter() - start)
                yield AudioChunk(tail, self.decoder.sample_rate, index)
        timings["total"] = time.perf_counter() - start
        yield Done(reason=end.reason, text=text_out, token_ids=list(end.token_ids), audio_codes=audio_codes,
                   usage={"llm": end.usage}, timings=timings)
