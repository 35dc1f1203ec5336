"""The LLM decode engine: KV pool, MCTP schedules, sampling, admission, sequences, events, observers."""
