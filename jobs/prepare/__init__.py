"""Corpus preparation: open speech corpora -> audio-token training shards, once, on Ray Data.

    vita-audio prepare --source librispeech:/data/LibriSpeech --source vita-jsonl:/data/sqa.jsonl --out prepared/

    from jobs.prepare import PrepareConfig, run_prepare
    manifest = run_prepare(PrepareConfig(sources=["librispeech:/data/LibriSpeech@dev-clean"], out="prepared/"))

recipes  corpus folder -> Utterances (LibriSpeech, LibriTTS, LJSpeech, Common Voice, VITA JSONL, Lhotse; Parquet
         audio datasets and WebDataset shards, also on an object store: `parquet:s3://...`, `webdataset:s3://...`)
checks   read + resample (pipeline.audio) + duration / silence / clipping checks; what is rejected or converted
samples  inputs (utterance x task), the chat layout of each task, the schemas below
stages   the Ray Data steps: read_and_check tasks, SampleBuilder actor pool (speech encoder + tokenizer)
job      PrepareConfig, run_prepare: blocks with deterministic keys, resume (jobs.run_folder's lock, plan, writer)
shards   the folder's files by name (block b's shard, errors, marker), read_shards
report   dedup by audio content, errors.parquet, manifest.json, report.md

Output folder (schema version 1; the trainer and the batch jobs read it):

    DIR/shards/part-NNNNNN.parquet   one row per training sample; block NNNNNN of the input list
    DIR/errors.parquet               one row per rejected input
    DIR/manifest.json                counts, hours, tokens, schema version, sources, config, runs
    DIR/report.md                    hours and tokens per source and task, rejects by reason, throughput
    DIR/plan.json, runs.jsonl, .blocks/   what makes a rerun resume (not for readers; `restart` clears them)

Read the samples from `DIR/shards/` (not `DIR/`, which also holds errors.parquet). Shard columns:

| column        | type               | meaning                                                                       |
|---------------|--------------------|-------------------------------------------------------------------------------|
| id            | string             | unique sample id `SOURCE/UTTERANCE/TASK`, e.g. `librispeech/1000-5000-0000/asr` |
| source        | string             | the `--source` it came from: its kind (`librispeech`, ...; `-2`, `-3` when a kind repeats) |
| task          | string             | `asr`, `tts`, `sqa` (spoken QA and other speech chat) or `text`               |
| part          | string             | the split (`dev-clean`, a JSONL file's stem, a Lhotse manifest's part)        |
| utterance     | string             | the corpus's own utterance id (VITA JSONL: `FILE-LINE`)                        |
| input_ids     | list<int32>        | the sample's token ids: ChatML turns, audio as `<|begin_of_audio|>` codes `<|end_of_audio|>`, the assistant turn interleaved text/audio with the interval ratio (default Boost `1 10 4 10`) |
| labels        | list<int32>        | same length; `-100` for system/user turns and the assistant header, else the id (unshifted: the model shifts) |
| audio_seconds | float64            | seconds of all the sample's audio (16 kHz, after resampling)                  |
| audio_codes   | list<list<int32>>  | the speech encoder's codes (0..16383, 12.5 per second) of each audio, in the order of the conversation |
| text          | string             | the transcript (ASR/TTS) or the assistant's text                              |
| speaker       | string             | speaker id when the corpus has one, else null                                 |
| language      | string             | language when the corpus has one, else null                                   |
| paths         | list<string>       | the audio files read (one per audio of the sample)                            |
| num_tokens    | int32              | len(input_ids)                                                                |
| num_scored    | int32              | labels != -100                                                                |
| audio_sha1    | string             | sha1 of the 16 kHz audio as 16-bit samples (deduplication key with the task)  |
| converted     | list<string>       | what reading changed, e.g. `resampled 22050 Hz`, `channel 0 of 2`             |

errors.parquet columns: `id` (the sample id that was not built), `source`, `path` (the audio files, `;`-joined),
`reason` (`missing_file`, `empty`, `truncated`, `unreadable`, `non_finite`, `low_sample_rate`, `high_sample_rate`,
`too_many_channels`, `too_large`, `multichannel`, `too_short`, `too_long`, `silent`, `clipped`, `duplicate`,
`bad_input`, `bad_sample`, `encoder`),
`detail` (the message), `task`, `utterance`. Every input is exactly one shard row or one error row.
"""
from jobs.prepare.checks import AudioChecks
from jobs.pools import PoolConfig
from jobs.prepare.job import PrepareConfig, SourceSpec, run_prepare
from jobs.prepare.recipes import (AudioRef, Utterance, prepare_commonvoice, prepare_lhotse, prepare_librispeech,
                                  prepare_libritts, prepare_ljspeech, prepare_parquet, prepare_vita_jsonl,
                                  prepare_webdataset)
from jobs.prepare.samples import ERROR_SCHEMA, SAMPLE_SCHEMA, SCHEMA_VERSION

from jobs.prepare.shards import read_shards
__all__ = ["AudioChecks", "AudioRef", "ERROR_SCHEMA", "PoolConfig", "PrepareConfig", "SAMPLE_SCHEMA", "SCHEMA_VERSION",
           "SourceSpec", "Utterance", "prepare_commonvoice", "prepare_lhotse", "prepare_librispeech", "prepare_libritts",
           "prepare_ljspeech", "prepare_parquet", "prepare_vita_jsonl", "prepare_webdataset", "read_shards", "run_prepare"]
