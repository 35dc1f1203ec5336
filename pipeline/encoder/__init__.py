"""The GLM-4-Voice speech encoder: Whisper features -> block-causal encoder -> pool -> VQ audio codes."""
