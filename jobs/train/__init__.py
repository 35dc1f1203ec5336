"""Staged VITA-Audio training (spec §6): stage rules, packing, the Ray Train worker loop, the run manifest."""
