"""The two original streaming schedules, reproduced call for call (their cost grows with the utterance):

- `GLM4VoiceStream` ("glm4voice"): GLM-4-Voice `AudioDecoder.token2wav` semantics: prompt = all
  earlier ids + all earlier *returned* mels, 34-frame hamming(68) mel cross-fade, HiFT cache of
  1 mel frame / 256 source samples, the last 256 samples held back; optional web-demo or
  block schedules. Cost grows with the prompt (quadratic overall), as in the original.
- `VitaPrefixStream` ("vita_prefix"): VITA-Audio's web_demo_stream: re-decode every id so far
  (first push, then when more than `min_new` ids are new, and at the end) with ODE steps 1, 3,
  5, ... capped at `n_steps`, and emit the samples past the ones already sent. Quadratic.

Neither is batchable: `decode_batch` pushes them one by one.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.decoder.config import DecoderError
from pipeline.decoder.core import DecoderCore, make_generator
from pipeline.decoder.stream import DecoderStream, empty_pcm, to_pcm

__all__ = ["GLM4VoiceStream", "VitaPrefixStream"]


class GLM4VoiceStream(DecoderStream):
    """GLM-4-Voice chunked `token2wav` with its exact prompt/cross-fade/HiFT-cache bookkeeping.

    schedule: None -> every non-empty push is one token2wav call (final if `final`);
    "webdemo" -> calls of 25, 50, 100, 150, then 200 ids; "blocks" -> calls of `block_size` ids.
    With a schedule a full chunk is sent once a further id (or the end) arrives, so the chunk
    that ends the stream is the final one, as in the original drivers."""

    kind = "glm4voice"
    WEBDEMO_HOPS = (25, 50, 100, 150, 200)
    TOKEN_OVERLAP = 5  # ids -> mel_overlap_len = int(5 / 12.5 * 22050 / 256) = 34 frames
    MEL_CACHE = 1  # HiFT cache: 1 mel frame, 256 source samples

    def __init__(self, decoder: DecoderCore, n_steps: int = 10, seed: int = 42, schedule: str | None = None):
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
        return np.concatenate(out) if out else empty_pcm()

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
            return to_pcm(self.token2wav(tokens, final)[0])
        if not final or self.held_mel is None:
            return empty_pcm()
        # our extension: the end arrives with no new ids -> vocode the held-back frames
        mel = self.held_mel if self.hift_cache is None else torch.cat([self.hift_cache[0], self.held_mel], dim=2)
        cache_source = None if self.hift_cache is None else self.hift_cache[1]
        speech, _, _ = self.decoder.vocode(mel, make_generator(self.seed), cache_source)
        self.held_mel, self.hift_cache = None, None
        return to_pcm(speech)


# ----------------------------------------------------------------------------------------------
# VITA-Audio prefix re-decode
# ----------------------------------------------------------------------------------------------


class VitaPrefixStream(DecoderStream):
    """VITA-Audio web_demo_stream: whole re-decode of the prefix, emit the new tail (quadratic cost)."""

    kind = "vita_prefix"

    def __init__(self, decoder: DecoderCore, n_steps: int = 10, seed: int = 42, min_new: int = 16,
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
            return empty_pcm()
        speech = self.decoder.decode(self.codes, n_steps=self.steps, seed=self.seed)
        out = speech[self.emitted:]
        self.decodes.append({"codes": len(self.codes), "steps": self.steps, "samples": speech.size, "from": self.emitted})
        self.emitted, self.decoded_codes = speech.size, len(self.codes)
        if self.grow_steps:
            self.steps = min(self.steps + 2, self.n_steps)
        if self.reset_after is not None and len(self.codes) > self.reset_after:
            self.codes, self.decoded_codes, self.emitted = [], 0, 0
        return out.astype(np.float32, copy=False)
