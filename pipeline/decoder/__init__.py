"""The audio decoder (GLM-4-Voice speech decoder): audio codes (12.5 Hz) -> flow matching -> mel -> HiFT -> 22.05 kHz PCM.

Modules, bottom up: `config` (safe reading of the released config.yaml), `flow` (token encoder, length
regulator, conditional flow matching with its U-Net estimator), `hift` (HiFT vocoder with NSF source),
`core` (`DecoderCore`: flow mel, vocoder, whole decode), `stream` (the stream plan / apply protocol and the
incremental stream), `original_streams` (GLM-4-Voice chunked, VITA-Audio prefix re-decode),
`speech_decoder` (`SpeechDecoder`: streams of each kind, batched pushes, checkpoint loading), `tiny` (tiny
checkpoints in the released format).
"""
