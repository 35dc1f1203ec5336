"""Vocabulary, token layout, chat prompts and text/audio interleaving (spec §2)."""
