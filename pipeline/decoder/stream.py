"""Streaming decode with per-stream state: audio-code chunks in, new 22.05 kHz PCM out.

A `DecoderStream` has `push(codes, final)` / `finish()`. Its kind (`SpeechDecoder.stream(kind)`):

- `IncrementalStream` ("incremental", here): linear total cost. Each chunk runs the flow on a bounded
  window (a block-aligned left context of earlier ids, with their already-final mel as the flow
  prompt, plus the new ids), holds back the last `overlap_frames` mel frames (re-generated and
  cross-faded when more ids arrive), and vocodes only the newly final frames with a bounded HiFT
  context (earlier mel and NSF source, the harmonic phase carried across chunks). Flow noise is a
  function of (seed, absolute frame), so `position_noise` gives the whole-decode equivalent.
- `GLM4VoiceStream` ("glm4voice") and `VitaPrefixStream` ("vita_prefix"): the originals' schedules
  (`pipeline.decoder.original_streams`).

Batching: a `batchable` stream splits a push into a public plan / apply protocol whose job objects carry
the state between the two halves, so several streams' windows of equal shapes run as one forward:

    job = stream.plan_flow(codes, final)        # FlowJob | None: the flow window to run
    stream.apply_flow(job, mel)                 # mel = that job's row of FlowJob.run_batch(decoder, jobs)
    job = stream.plan_vocoder(final)            # VocoderJob | None: the HiFT window to run
    pcm = stream.apply_vocoder(job, speech)     # speech = its row of VocoderJob.run_batch(decoder, jobs)

`decode_batch` drives any mix of streams through that protocol only (others are pushed one by one).
Every stream owns its state and its random generator(s); streams never share a cache key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.decoder.config import DecoderError
from pipeline.decoder.core import DecoderCore, make_generator
from pipeline.decoder.hift import draw_start_phases

__all__ = ["DecoderStream", "IncrementalStream", "FlowJob", "VocoderJob", "decode_batch", "position_noise",
           "empty_pcm", "to_pcm", "NOISE_BLOCK"]

NOISE_BLOCK = 64  # frames per independently seeded noise block (incremental kind)


def empty_pcm() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


def to_pcm(speech: torch.Tensor) -> np.ndarray:
    return speech.reshape(-1).float().cpu().numpy().astype(np.float32, copy=False)


class DecoderStream:
    """One utterance being decoded; subclasses define the schedule (`_push`), or the batchable protocol."""

    kind = "base"
    batchable = False  # True: implements plan_flow / apply_flow / plan_vocoder / apply_vocoder

    def __init__(self, decoder: DecoderCore, n_steps: int = 10, seed: int = 42):
        self.decoder = decoder
        self.n_steps = decoder.check_steps(n_steps)
        make_generator(seed)  # validates
        self.seed = int(seed)
        self.finished = False
        self.codes_received = 0
        self.samples_emitted = 0

    @property
    def mode(self) -> str:
        """Old name of `kind` ("mode" now names only the LLM's MCTP decode schedule)."""
        return self.kind

    def push(self, codes, final: bool = False) -> np.ndarray:
        """Add audio codes (codebook indices); return the PCM that became ready (float32, maybe empty)."""
        self.check_open()
        codes = self.decoder.check_codes(codes, allow_empty=True)
        self.codes_received += len(codes)
        with torch.inference_mode():
            pcm = self._push(codes, bool(final))
        if final:
            self.finished = True
        self.samples_emitted += pcm.size
        return pcm

    def finish(self) -> np.ndarray:
        """Flush everything still held back and close the stream."""
        if self.finished:
            return empty_pcm()
        return self.push([], final=True)

    def check_open(self) -> None:
        if self.finished:
            raise DecoderError(f"{self.kind} stream is finished; start a new stream")

    def _push(self, codes: list[int], final: bool) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Jobs of the plan / apply protocol
# ----------------------------------------------------------------------------------------------


@dataclass
class FlowJob:
    """One flow window a stream asked for, and what taking its mel back needs."""

    tokens: torch.Tensor  # (1, N) window ids
    noise: torch.Tensor  # (1, 80, T)
    prompt: torch.Tensor | None  # (1, P, 80)
    n_steps: int
    final: bool  # the push that ends the stream: nothing is held back
    tokens_end: int  # absolute index one past the window's last id

    @property
    def key(self):
        """Jobs with equal keys run as one batched forward."""
        return ("flow", self.tokens.shape[1], 0 if self.prompt is None else self.prompt.shape[1], self.noise.shape[-1],
                self.n_steps)

    @staticmethod
    def run_batch(decoder: DecoderCore, jobs: list["FlowJob"]) -> list[torch.Tensor]:
        """The mel of each job (jobs of one key), in one forward."""
        prompt = None if jobs[0].prompt is None else torch.cat([j.prompt for j in jobs])
        tokens, noise = torch.cat([j.tokens for j in jobs]), torch.cat([j.noise for j in jobs])
        return list(decoder.flow_mel(tokens, noise, prompt, jobs[0].n_steps).split(1))


@dataclass
class VocoderJob:
    """One HiFT window a stream asked for: its mel and NSF source, and where the new samples lie in it."""

    mel: torch.Tensor  # (1, 80, T) window mel
    source: torch.Tensor  # (1, 1, 256 T) its NSF source
    window_start: int  # absolute frame of mel[..., 0]
    emit_end: int  # frames up to here are spoken after this job
    new_source: torch.Tensor  # source of the frames not spoken before (carried into the next window)
    cum: torch.Tensor  # harmonic phase accumulator over new_source (its last value carries the phase)

    @property
    def key(self):
        return ("hift", self.mel.shape[-1])

    @staticmethod
    def run_batch(decoder: DecoderCore, jobs: list["VocoderJob"]) -> list[torch.Tensor]:
        """The speech of each job (jobs of one key), in one forward."""
        speech = decoder.synthesize(torch.cat([j.mel for j in jobs]), torch.cat([j.source for j in jobs]))
        return list(speech.split(1))


# ----------------------------------------------------------------------------------------------
# Incremental (linear cost)
# ----------------------------------------------------------------------------------------------


def position_noise(decoder: DecoderCore, start: int, end: int, seed: int) -> torch.Tensor:
    """Flow noise for absolute frames [start, end): (1, 80, end - start), a pure function of (seed, frame).

    Frames come in blocks of NOISE_BLOCK, block k drawn from its own generator seeded `seed * 1000003 + k`."""
    if end <= start:
        return torch.zeros(1, decoder.mel_bins, 0, device=decoder.device, dtype=decoder.dtype)
    blocks = []
    for k in range(start // NOISE_BLOCK, (end - 1) // NOISE_BLOCK + 1):
        g = torch.Generator().manual_seed(seed * 1000003 + k)
        blocks.append(torch.randn((NOISE_BLOCK, decoder.mel_bins), generator=g))
    noise = torch.cat(blocks, dim=0)  # (frames, 80)
    offset = (start // NOISE_BLOCK) * NOISE_BLOCK
    return noise[start - offset: end - offset].T[None].contiguous().to(decoder.device, decoder.dtype)


class IncrementalStream(DecoderStream):
    """Bounded-window streaming: constant cost per chunk, so total cost is linear in the audio length.

    context_tokens: earlier ids re-encoded as left context (window start aligned down to the
    encoder's block grid, its first frame on the whole decode's frame grid and stride-2 parity);
    flow noise is per absolute frame (`position_noise`). overlap_frames: mel frames held back
    and re-generated with the next chunk (hamming cross-fade), capped at half a chunk so the
    first chunk of 2 ids already yields audio. hift_context_frames / hift_hold_frames: HiFT left
    context (mel + source) and frames vocoded but not yet emitted. min_tokens: ids to collect
    before running the flow (except at the end). record_mel keeps every final mel frame in
    `mel_log` (to measure the distance to a whole decode). prompt_mel: condition the flow on the
    context's final mel as GLM-4-Voice's streaming does; off by default, so the conditioning stays
    empty as in a whole decode, which keeps the result closer to it (the context ids still shape mu)."""

    kind = "incremental"
    batchable = True

    def __init__(self, decoder: DecoderCore, n_steps: int = 10, seed: int = 42, context_tokens: int = 30,
                 overlap_frames: int = 34, hift_context_frames: int = 16, hift_hold_frames: int = 4, min_tokens: int = 1,
                 record_mel: bool = False, prompt_mel: bool = False):
        super().__init__(decoder, n_steps, seed)
        for name, value, low in (("context_tokens", context_tokens, 0), ("overlap_frames", overlap_frames, 0),
                                 ("hift_context_frames", hift_context_frames, 0), ("hift_hold_frames", hift_hold_frames, 0),
                                 ("min_tokens", min_tokens, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise DecoderError(f"{name} must be an int >= {low}, got {value!r}")
        self.context_tokens, self.overlap_frames = int(context_tokens), int(overlap_frames)
        self.hift_context, self.hift_hold, self.min_tokens = int(hift_context_frames), int(hift_hold_frames), int(min_tokens)
        self.generator = make_generator(self.seed)
        self.start_phases = draw_start_phases(1, decoder.hift.n_harmonics, self.generator)
        B, C = 1, decoder.mel_bins
        self.codes: list[int] = []
        self.codes_base = 0  # absolute index of codes[0]
        self.tokens_done = 0  # ids the flow has covered
        self.mel = torch.zeros(B, C, 0, device=decoder.device, dtype=decoder.dtype)  # final mel frames
        self.mel_base = 0  # absolute frame of mel[..., 0]
        self.held: torch.Tensor | None = None  # provisional frames right after the final ones
        self.source = torch.zeros(B, 1, 0, device=decoder.device, dtype=decoder.dtype)  # NSF source of spoken frames
        self.source_base = 0  # absolute frame of source[..., 0]
        self.spoken = 0  # frames whose speech was emitted
        self.phase = torch.zeros(B, decoder.hift.n_harmonics, device=decoder.device, dtype=torch.float32)
        self.flow_calls = 0
        self.hift_calls = 0
        self.mel_log: list[torch.Tensor] | None = [] if record_mel else None  # every final mel piece (diagnostics)
        self.prompt_mel = bool(prompt_mel)
        self.frame_align = 2 ** (len(decoder.config.flow.channels) - 1)  # the estimator's down-sampling factor

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def final_frames(self) -> int:
        return self.mel_base + self.mel.shape[-1]

    # -- the plan / apply protocol (see the module docstring) ------------------------------------

    def plan_flow(self, codes, final: bool = False) -> FlowJob | None:
        """Take new ids; the flow window to run for them, or None (too few ids yet, or none at the end: the
        held-back frames then become final as they are)."""
        self.check_open()
        codes = self.decoder.check_codes(codes, allow_empty=True)
        self.codes_received += len(codes)
        self.codes += codes
        dec = self.decoder
        end = self.codes_base + len(self.codes)
        done = self.tokens_done
        if end == done or (end - done < self.min_tokens and not final):
            if final:
                self._release_held()
            return None
        block, align = dec.block_size, self.frame_align
        frames_end, final_frames = dec.n_frames(end), self.final_frames
        start = max(0, (done - self.context_tokens) // block * block)
        while True:  # the window must reach back over the frames already final (its prompt)
            # on the whole decode's frame grid, and on its parity for the U-Net's stride-2 levels
            start_frame = dec.n_frames(start) // align * align
            if start == 0 or start_frame <= final_frames - 1:
                break
            start = max(0, start - block)
        if start < self.codes_base or start_frame < self.mel_base:
            raise RuntimeError("incremental stream trimmed its history too far (internal error)")
        tokens = dec.tensor(self.codes[start - self.codes_base: end - self.codes_base])
        noise = position_noise(dec, start_frame, frames_end, self.seed)
        n_prompt = final_frames - start_frame
        prompt = self.mel[:, :, start_frame - self.mel_base:].transpose(1, 2) if n_prompt else None
        if prompt is not None and not self.prompt_mel:
            prompt = torch.zeros_like(prompt)  # context ids only: conditioning left empty as in a whole decode
        return FlowJob(tokens, noise, prompt, self.n_steps, bool(final), end)

    def recorded_mel(self) -> torch.Tensor:
        """All final mel frames so far (1, 80, T); needs `record_mel=True`."""
        if self.mel_log is None:
            raise DecoderError("recorded_mel needs a stream made with record_mel=True")
        return torch.cat(self.mel_log, dim=-1) if self.mel_log else torch.zeros(1, self.decoder.mel_bins, 0)

    def _release_held(self):
        """The end arrived with no new ids: the held-back frames become final as they are."""
        if self.held is not None:
            self.mel = torch.cat([self.mel, self.held], dim=-1)
            if self.mel_log is not None:
                self.mel_log.append(self.held.float().cpu())
            self.held = None

    def apply_flow(self, job: FlowJob, mel: torch.Tensor) -> None:
        """Take the flow's mel (1, 80, n) for `job`: frames [final_frames, frames(end)); hold back the last ones."""
        final = job.final
        mel = mel.clone()
        if self.held is not None:
            n = min(self.held.shape[-1], mel.shape[-1])
            w = torch.from_numpy(np.hamming(2 * n)).to(mel.device)
            mel[..., :n] = (mel[..., :n].double() * w[:n] + self.held[..., :n].double() * w[n:]).to(mel.dtype)
        hold = 0 if final else min(self.overlap_frames, mel.shape[-1] // 2)
        self.held = mel[..., mel.shape[-1] - hold:] if hold else None
        self.mel = torch.cat([self.mel, mel[..., : mel.shape[-1] - hold]], dim=-1)
        if self.mel_log is not None:
            self.mel_log.append(mel[..., : mel.shape[-1] - hold].float().cpu())
        self.tokens_done = job.tokens_end
        self.flow_calls += 1
        self._trim()

    def _trim(self):
        dec = self.decoder
        keep_tokens = self.context_tokens + 2 * dec.block_size
        cut = max(0, (self.tokens_done - keep_tokens) // dec.block_size * dec.block_size)
        if cut > self.codes_base:
            self.codes = self.codes[cut - self.codes_base:]
            self.codes_base = cut
        keep_from = min(dec.n_frames(cut) - dec.n_frames(2 * dec.block_size) if cut else 0, self.spoken - self.hift_context)
        keep_from = max(keep_from, self.mel_base)
        if keep_from > self.mel_base:
            self.mel = self.mel[..., keep_from - self.mel_base:]
            self.mel_base = keep_from

    def plan_vocoder(self, final: bool = False) -> VocoderJob | None:
        """The HiFT window that speaks the newly final frames (its NSF source computed here), or None. With
        `final` the stream is finished after this push."""
        if final:
            self.finished = True
        dec = self.decoder
        final_frames = self.final_frames
        if final_frames <= self.spoken:
            return None
        hold = 0 if final else min(self.hift_hold, (final_frames - self.spoken) // 2)
        emit_end = final_frames - hold
        if emit_end <= self.spoken:
            return None
        start = max(self.mel_base, self.source_base, self.spoken - self.hift_context)
        mel = self.mel[..., start - self.mel_base:]
        f0 = dec.hift.f0_predictor(mel)
        new_source, cum = dec.hift.harmonic_source(f0[:, self.spoken - start:], self.generator, self.start_phases, self.phase)
        spf = dec.samples_per_frame
        old_source = self.source[..., (start - self.source_base) * spf:]
        return VocoderJob(mel, torch.cat([old_source, new_source], dim=-1), start, emit_end, new_source, cum)

    def apply_vocoder(self, job: VocoderJob, speech: torch.Tensor) -> np.ndarray:
        """Take HiFT's speech for `job`; return the samples that became ready."""
        spf = self.decoder.samples_per_frame
        start, spoken, emit_end = job.window_start, self.spoken, job.emit_end
        out = speech[:, (spoken - start) * spf: (emit_end - start) * spf]
        n_new = (emit_end - spoken) * spf
        self.phase = (job.cum[:, :, n_new - 1] % 1).float()
        self.source = torch.cat([self.source, job.new_source[..., :n_new]], dim=-1)
        self.spoken = emit_end
        keep_from = max(self.source_base, self.spoken - self.hift_context)
        if keep_from > self.source_base:
            self.source = self.source[..., (keep_from - self.source_base) * spf:]
            self.source_base = keep_from
        self.hift_calls += 1
        pcm = to_pcm(out)
        self.samples_emitted += pcm.size
        return pcm

    def push(self, codes, final: bool = False) -> np.ndarray:
        with torch.inference_mode():
            job = self.plan_flow(codes, final)
            if job is not None:
                self.apply_flow(job, FlowJob.run_batch(self.decoder, [job])[0])
            vocoder = self.plan_vocoder(final)
            if vocoder is None:
                return empty_pcm()
            return self.apply_vocoder(vocoder, VocoderJob.run_batch(self.decoder, [vocoder])[0])


# ----------------------------------------------------------------------------------------------
# Batched pushes
# ----------------------------------------------------------------------------------------------


def decode_batch(decoder: DecoderCore, items: list) -> list[np.ndarray]:
    """Push `[(stream, codes, final), ...]` at once: batchable streams' flow windows (then HiFT windows) of
    equal shapes run as one forward, through the plan / apply protocol; other streams are pushed one by one."""
    if not isinstance(items, (list, tuple)):
        raise DecoderError(f"items must be a list of (stream, codes, final), got {type(items).__name__}")
    seen = set()
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], DecoderStream)):
            raise DecoderError(f"each item must be (stream, codes, final), got {item!r:.80}")
        if id(item[0]) in seen:
            raise DecoderError("a stream appears twice in one decode_batch call; push its chunks in one item")
        if item[0].decoder is not decoder:
            raise DecoderError("a stream of another decoder was passed to decode_batch")
        seen.add(id(item[0]))
    outputs: list[np.ndarray | None] = [None] * len(items)
    batched = []
    for i, (stream, codes, final) in enumerate(items):
        if stream.batchable:
            batched.append(i)
        else:
            outputs[i] = stream.push(codes, bool(final))
    with torch.inference_mode():
        groups: dict = {}
        for i in batched:
            stream, codes, final = items[i]
            job = stream.plan_flow(codes, bool(final))
            if job is not None:
                groups.setdefault(job.key, []).append((i, job))
        for members in groups.values():
            for (i, job), mel in zip(members, FlowJob.run_batch(decoder, [job for _, job in members])):
                items[i][0].apply_flow(job, mel)
        groups = {}
        for i in batched:
            stream, _, final = items[i]
            job = stream.plan_vocoder(bool(final))
            if job is None:
                outputs[i] = empty_pcm()
            else:
                groups.setdefault(job.key, []).append((i, job))
        for members in groups.values():
            for (i, job), speech in zip(members, VocoderJob.run_batch(decoder, [job for _, job in members])):
                outputs[i] = items[i][0].apply_vocoder(job, speech)
    return outputs
