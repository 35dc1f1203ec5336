"""GLM-4-Voice speech decoder: audio ids (12.5 Hz) -> flow matching -> mel -> HiFT -> 22.05 kHz PCM.

Modules: `config` (safe reading of the released config.yaml), `flow` (token encoder, length
regulator, conditional flow matching with its U-Net estimator), `hift` (HiFT vocoder with NSF
source), `speech_decoder` (`SpeechDecoder`, checkpoint loading), `stream` (per-stream state:
incremental, GLM-4-Voice chunked, VITA-Audio prefix re-decode), `tiny` (tiny checkpoints in the
released format).
"""
from __future__ import annotations

from pipeline.decoder.config import DecoderConfig, DecoderError, FlowConfig, HiFTConfig, load_decoder_config
from pipeline.decoder.speech_decoder import SpeechDecoder, load_decoder
from pipeline.decoder.stream import DecoderStream, GLM4VoiceStream, IncrementalStream, VitaPrefixStream
from pipeline.decoder.tiny import write_tiny_decoder

__all__ = [
    "DecoderConfig", "DecoderError", "FlowConfig", "HiFTConfig", "load_decoder_config",
    "SpeechDecoder", "load_decoder", "DecoderStream", "GLM4VoiceStream", "IncrementalStream",
    "VitaPrefixStream", "write_tiny_decoder",
]
