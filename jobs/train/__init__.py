"""Staged VITA-Audio training (spec §6): the typed config (config), stage rules, packing, the Ray Train worker loop,
the run (run folder, plan, run.json)."""
