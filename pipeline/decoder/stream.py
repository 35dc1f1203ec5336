"""Streaming decode with per-stream state: audio-id chunks in, new 22.05 kHz PCM out.

Three schedules, each a `DecoderStream` with `push(codes, final)` / `finish()`:

- `IncrementalStream` ("incremental"): linear total cost. Each chunk runs the flow on a bounded
  window (a block-aligned left context of earlier ids, with their already-final mel as the flow
  prompt, plus the new ids), holds back the last `overlap_frames` mel frames (re-generated and
  cross-faded when more ids arrive), and vocodes only the newly final frames with a bounded HiFT
  context (earlier mel and NSF source, the harmonic phase carried across chunks). Flow noise is a
  function of (seed, absolute frame), so `position_noise` gives the whole-decode equivalent.
- `GLM4VoiceStream` ("glm4voice"): GLM-4-Voice `AudioDecoder.token2wav` semantics: prompt = all
  earlier ids + all earlier *returned* mels, 34-frame hamming(68) mel cross-fade, HiFT cache of
  1 mel frame / 256 source samples, the last 256 samples held back; optional web-demo or
  block schedules. Cost grows with the prompt (quadratic overall), as in the original.
- `VitaPrefixStream` ("vita_prefix"): VITA-Audio's web_demo_stream: re-decode every id so far
  (first push, then when more than `min_new` ids are new, and at the end) with ODE steps 1, 3,
  5, ... capped at `n_steps`, and emit the samples past the ones already sent. Quadratic.

Every stream owns its state and its random generator(s); streams never share a cache key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.decoder.config import DecoderError
from pipeline.decoder.hift import draw_start_phases
from pipeline.decoder.speech_decoder import SpeechDecoder, make_generator

MODES = ("incremental", "glm4voice", "vita_prefix")
NOISE_BLOCK = 64  # frames per independently seeded noise block (incremental mode)


def _empty_pcm() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


def _pcm(speech: torch.Tensor) -> np.ndarray:
    return speech.reshape(-1).float().cpu().numpy().astype(np.float32, copy=False)


class DecoderStream:
    """One utterance being decoded; subclasses define the schedule."""

    mode = "base"

    def __init__(self, decoder: SpeechDecoder, n_steps: int = 10, seed: int = 42):
        self.decoder = decoder
        self.n_steps = decoder.check_steps(n_steps)
        make_generator(seed)  # validates
        self.seed = int(seed)
        self.finished = False
        self.codes_received = 0
        self.samples_emitted = 0

    def push(self, codes, final: bool = False) -> np.ndarray:
        """Add ids (codebook indices); return the PCM that became ready (float32, maybe empty)."""
        self._check_open()
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
            return _empty_pcm()
        return self.push([], final=True)

    def _check_open(self):
        if self.finished:
            raise DecoderError(f"{self.mode} stream is finished; start a new stream")

    def _push(self, codes: list[int], final: bool) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# GLM-4-Voice token2wav
# ----------------------------------------------------------------------------------------------


class GLM4VoiceStream(DecoderStream):
    """GLM-4-Voice chunked `token2wav` with its exact prompt/cross-fade/HiFT-cache bookkeeping.

    schedule: None -> every non-empty push is one token2wav call (final if `final`);
    "webdemo" -> calls of 25, 50, 100, 150, then 200 ids; "blocks" -> calls of `block_size` ids.
    With a schedule a full chunk is sent once a further id (or the end) arrives, so the chunk
    that ends the stream is the final one, as in the original drivers."""

    mode = "glm4voice"
    WEBDEMO_HOPS = (25, 50, 100, 150, 200)
    TOKEN_OVERLAP = 5  # ids -> mel_overlap_len = int(5 / 12.5 * 22050 / 256) = 34 frames
    MEL_CACHE = 1  # HiFT cache: 1 mel frame, 256 source samples

    def __init__(self, decoder: SpeechDecoder, n_steps: int = 10, seed: int = 42, schedule: str | None = None):
        super().__init__(decoder, n_steps, seed)
        if schedule not in (None, "webdemo", "blocks"):
            raise DecoderError(f"schedule must be None, 'webdemo' or 'blocks', got {schedule!r}")
        self.schedule = schedule
        self.mel_overlap = decoder.n_frames(self.TOKEN_OVERLAP)
        self.window = np.hamming(2 * self.mel_overlap)  # float64, as the original
        self.source_cache_len = self.MEL_CACHE * decoder.samples_per_frame
        self.prompt_tokens: list[int] = []
        self.returned_mels: list[torch.Tensor] = []
        self.held_mel: torch.Tensor | None = None
        self.hift_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending: list[int] = []
        self.calls: list[dict] = []  # per call: tokens, returned mel, F0 (diagnostics / parity tests)

    def _hop(self) -> int:
        if self.schedule == "blocks":
            return self.decoder.block_size
        return self.WEBDEMO_HOPS[min(len(self.calls), len(self.WEBDEMO_HOPS) - 1)]

    def _push(self, codes, final):
        self.pending += codes
        out = []
        if self.schedule is None:
            if self.pending or final:
                out.append(self._call(self.pending, final))
                self.pending = []
        else:
            while len(self.pending) > self._hop():
                hop = self._hop()
                out.append(self._call(self.pending[:hop], False))
                self.pending = self.pending[hop:]
            if final:
                out.append(self._call(self.pending, True))
                self.pending = []
        return np.concatenate(out) if out else _empty_pcm()

    def token2wav(self, tokens: list[int], final: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One original call -> (speech (1, S), returned mel (1, 80, T), F0 (1, T))."""
        dec = self.decoder
        generator = make_generator(self.seed)  # the original reseeds 42 on every call
        prompt_feat = torch.cat(self.returned_mels, dim=-1).transpose(1, 2) if self.returned_mels else None
        all_tokens = self.prompt_tokens + tokens
        noise = dec.draw_noise(dec.n_frames(len(all_tokens)), generator)
        mel = dec.flow_mel(dec.tensor(all_tokens), noise, prompt_feat, self.n_steps).clone()
        if self.held_mel is not None:
            n = self.mel_overlap
            if mel.shape[-1] < n:
                raise DecoderError(f"glm4voice chunk of {len(tokens)} ids gives {mel.shape[-1]} new mel frames, "
                                   f"fewer than the {n}-frame cross-fade")
            faded = mel[..., :n].double() * torch.from_numpy(self.window[:n]).to(mel.device) \
                + self.held_mel[..., -n:].double() * torch.from_numpy(self.window[n:]).to(mel.device)
            mel[..., :n] = faded.to(mel.dtype)
        cache_source = None
        if self.hift_cache is not None:
            cache_mel, cache_source = self.hift_cache
            mel = torch.cat([cache_mel, mel], dim=2)
        if not final:
            self.held_mel = mel[:, :, -self.mel_overlap:]
            mel = mel[:, :, : -self.mel_overlap]
            speech, source, f0 = dec.vocode(mel, generator, cache_source)
            self.hift_cache = (mel[:, :, -self.MEL_CACHE:], source[:, :, -self.source_cache_len:])
            speech = speech[:, : -self.source_cache_len]
        else:
            speech, source, f0 = dec.vocode(mel, generator, cache_source)
            self.held_mel, self.hift_cache = None, None
        self.prompt_tokens = all_tokens
        self.returned_mels.append(mel)
        self.calls.append({"tokens": list(tokens), "mel": mel.float().cpu(), "f0": f0.float().cpu(), "final": final})
        return speech, mel, f0

    def _call(self, tokens: list[int], final: bool) -> np.ndarray:
        if tokens:
            return _pcm(self.token2wav(tokens, final)[0])
        if not final or self.held_mel is None:
            return _empty_pcm()
        # our extension: the end arrives with no new ids -> vocode the held-back frames
        mel = self.held_mel if self.hift_cache is None else torch.cat([self.hift_cache[0], self.held_mel], dim=2)
        cache_source = None if self.hift_cache is None else self.hift_cache[1]
        speech, _, _ = self.decoder.vocode(mel, make_generator(self.seed), cache_source)
        self.held_mel, self.hift_cache = None, None
        return _pcm(speech)


# ----------------------------------------------------------------------------------------------
# VITA-Audio prefix re-decode
# ----------------------------------------------------------------------------------------------


class VitaPrefixStream(DecoderStream):
    """VITA-Audio web_demo_stream: whole re-decode of the prefix, emit the new tail (quadratic cost)."""

    mode = "vita_prefix"

    def __init__(self, decoder: SpeechDecoder, n_steps: int = 10, seed: int = 42, min_new: int = 16,
                 grow_steps: bool = True, reset_after: int | None = None):
        super().__init__(decoder, n_steps, seed)
        if not isinstance(min_new, int) or min_new < 0:
            raise DecoderError(f"min_new must be an int >= 0, got {min_new!r}")
        if reset_after is not None and (not isinstance(reset_after, int) or reset_after < 1):
            raise DecoderError(f"reset_after must be None or a positive int, got {reset_after!r}")
        self.min_new, self.reset_after = min_new, reset_after
        self.steps = 1 if grow_steps else self.n_steps
        self.grow_steps = grow_steps
        self.codes: list[int] = []
        self.decoded_codes = 0  # ids covered by the last decode
        self.emitted = 0  # samples of the current history already sent
        self.decodes: list[dict] = []

    def _push(self, codes, final):
        self.codes += codes
        new = len(self.codes) - self.decoded_codes
        first = not self.decodes and bool(self.codes)
        if not (first or new > self.min_new or (final and new > 0)):
            return _empty_pcm()
        speech = self.decoder.decode(self.codes, n_steps=self.steps, seed=self.seed)
        out = speech[self.emitted:]
        self.decodes.append({"codes": len(self.codes), "steps": self.steps, "samples": speech.size, "from": self.emitted})
        self.emitted, self.decoded_codes = speech.size, len(self.codes)
        if self.grow_steps:
            self.steps = min(self.steps + 2, self.n_steps)
        if self.reset_after is not None and len(self.codes) > self.reset_after:
            self.codes, self.decoded_codes, self.emitted = [], 0, 0
        return out.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Incremental (linear cost)
# ----------------------------------------------------------------------------------------------


def position_noise(decoder: SpeechDecoder, start: int, end: int, seed: int) -> torch.Tensor:
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


@dataclass
class FlowJob:
    tokens: torch.Tensor  # (1, N) window ids
    noise: torch.Tensor  # (1, 80, T)
    prompt: torch.Tensor | None  # (1, P, 80)
    n_steps: int

    @property
    def key(self):
        return ("flow", self.tokens.shape[1], 0 if self.prompt is None else self.prompt.shape[1], self.noise.shape[-1], self.n_steps)


@dataclass
class HiftJob:
    mel: torch.Tensor  # (1, 80, T) window mel
    source: torch.Tensor  # (1, 1, 256 T)

    @property
    def key(self):
        return ("hift", self.mel.shape[-1])


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

    mode = "incremental"

    def __init__(self, decoder: SpeechDecoder, n_steps: int = 10, seed: int = 42, context_tokens: int = 30,
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
        # set by _plan_hift for the matching _apply_hift (the NSF source of the new frames, its phase, window)
        self._emit_end, self._window_start = 0, 0
        self._new_source: torch.Tensor | None = None
        self._cum: torch.Tensor | None = None
        self.mel_log: list[torch.Tensor] | None = [] if record_mel else None  # every final mel piece (diagnostics)
        self.prompt_mel = bool(prompt_mel)
        self.frame_align = 2 ** (len(decoder.config.flow.channels) - 1)  # the estimator's down-sampling factor

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def final_frames(self) -> int:
        return self.mel_base + self.mel.shape[-1]

    def _accept(self, codes: list[int]):
        self._check_open()
        codes = self.decoder.check_codes(codes, allow_empty=True)
        self.codes_received += len(codes)
        self.codes += codes

    def _plan_flow(self, final: bool) -> FlowJob | None:
        dec = self.decoder
        end = self.codes_base + len(self.codes)
        done = self.tokens_done
        if end == done or (end - done < self.min_tokens and not final):
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
        return FlowJob(tokens, noise, prompt, self.n_steps)

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

    def _apply_flow(self, mel: torch.Tensor, final: bool):
        """mel (1, 80, n): frames [final_frames, frames(end)) from the flow."""
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
        self.tokens_done = self.codes_base + len(self.codes)
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

    def _plan_hift(self, final: bool) -> HiftJob | None:
        dec = self.decoder
        final_frames = self.final_frames
        if final_frames <= self.spoken:
            return None
        hold = 0 if final else min(self.hift_hold, (final_frames - self.spoken) // 2)
        self._emit_end = final_frames - hold
        if self._emit_end <= self.spoken:
            return None
        start = max(self.mel_base, self.source_base, self.spoken - self.hift_context)
        mel = self.mel[..., start - self.mel_base:]
        f0 = dec.hift.f0_predictor(mel)
        new_source, cum = dec.hift.harmonic_source(f0[:, self.spoken - start:], self.generator, self.start_phases, self.phase)
        spf = dec.samples_per_frame
        old_source = self.source[..., (start - self.source_base) * spf:]
        self._new_source, self._cum, self._window_start = new_source, cum, start
        return HiftJob(mel, torch.cat([old_source, new_source], dim=-1))

    def _apply_hift(self, speech: torch.Tensor) -> np.ndarray:
        spf = self.decoder.samples_per_frame
        start, spoken, emit_end = self._window_start, self.spoken, self._emit_end
        out = speech[:, (spoken - start) * spf: (emit_end - start) * spf]
        n_new = (emit_end - spoken) * spf
        self.phase = (self._cum[:, :, n_new - 1] % 1).float()
        self.source = torch.cat([self.source, self._new_source[..., :n_new]], dim=-1)
        self.spoken = emit_end
        keep_from = max(self.source_base, self.spoken - self.hift_context)
        if keep_from > self.source_base:
            self.source = self.source[..., (keep_from - self.source_base) * spf:]
            self.source_base = keep_from
        self.hift_calls += 1
        self._new_source = self._cum = None
        return _pcm(out)

    def _push(self, codes, final):
        self.codes += codes
        job = self._plan_flow(final)
        if job is not None:
            self._apply_flow(self.decoder.flow_mel(job.tokens, job.noise, job.prompt, job.n_steps), final)
        elif final:
            self._release_held()
        hjob = self._plan_hift(final)
        if hjob is None:
            return _empty_pcm()
        return self._apply_hift(self.decoder.hift.synthesize(hjob.mel, hjob.source))


def make_stream(decoder: SpeechDecoder, mode: str = "incremental", n_steps: int = 10, seed: int = 42, **options) -> DecoderStream:
    classes = {"incremental": IncrementalStream, "glm4voice": GLM4VoiceStream, "vita_prefix": VitaPrefixStream}
    if mode not in classes:
        raise DecoderError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        return classes[mode](decoder, n_steps=n_steps, seed=seed, **options)
    except TypeError as err:
        raise DecoderError(f"bad option for a {mode!r} stream: {err}") from err


# ----------------------------------------------------------------------------------------------
# Batched pushes
# ----------------------------------------------------------------------------------------------


def decode_batch(decoder: SpeechDecoder, items: list) -> list[np.ndarray]:
    """Push `[(stream, codes, final), ...]` at once. Incremental streams' flow windows (and HiFT
    windows) with equal shapes run as one batched forward; other streams are pushed one by one."""
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
    incremental = []
    for i, (stream, codes, final) in enumerate(items):
        if isinstance(stream, IncrementalStream):
            stream._accept(codes)
            incremental.append(i)
        else:
            outputs[i] = stream.push(codes, bool(final))
    with torch.inference_mode():
        # flow: group equal-shape windows
        groups: dict = {}
        for i in incremental:
            stream, _, final = items[i]
            job = stream._plan_flow(bool(final))
            if job is None:
                if final:
                    stream._release_held()
                continue
            groups.setdefault(job.key, []).append((i, job))
        for members in groups.values():
            jobs = [job for _, job in members]
            prompt = None if jobs[0].prompt is None else torch.cat([j.prompt for j in jobs])
            mels = decoder.flow_mel(torch.cat([j.tokens for j in jobs]), torch.cat([j.noise for j in jobs]), prompt, jobs[0].n_steps)
            for (i, _), mel in zip(members, mels.split(1)):
                items[i][0]._apply_flow(mel, bool(items[i][2]))
        # HiFT: group equal-length windows
        groups = {}
        for i in incremental:
            stream, _, final = items[i]
            job = stream._plan_hift(bool(final))
            if job is None:
                outputs[i] = _empty_pcm()
                continue
            groups.setdefault(job.key, []).append((i, job))
        for members in groups.values():
            speech = decoder.hift.synthesize(torch.cat([j.mel for _, j in members]), torch.cat([j.source for _, j in members]))
            for (i, _), row in zip(members, speech.split(1)):
                outputs[i] = items[i][0]._apply_hift(row)
    for i in incremental:
        stream, _, final = items[i]
        stream.samples_emitted += outputs[i].size
        if final:
            stream.finished = True
    return outputs
