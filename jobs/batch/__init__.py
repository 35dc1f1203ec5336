"""Batch ASR / TTS over audio archives on Ray Data: exactly once, resumable (`vita-audio batch`).

    inputs    folder / JSONL-CSV manifest / WebDataset tar / Parquet audio dataset / texts, local or on an object
              store (s3://...) -> BatchInput list (fixed order, unique ids)
    segments  long recordings: windows with overlap, transcripts stitched (per-segment timestamps kept)
    stages    Ray Data callable classes over the actors/ stage classes (encoder, LLM+MCTP, decoder)
    job       BatchConfig, run_batch: the pipeline, block-keyed result files, resume, retries, cancel, TooManyErrors
    lines     the OpenAI Batch API's lines (task "requests"): specs, audio references, result rows
    openai_batch  the Batch API's job: its settings onto run_batch, the folder read back in the endpoint's terms
    driver    a batch's detached driver actor (start, state, stop)
    results   the folder's files by name, read_results, which error rows a rerun retries
    report    summary.json / report.md (counts, audio hours, RTF, throughput, WER / CER with jiwer)
"""
