"""Ray actors wrapping one pipeline stage each, and the streaming StagedPipeline that chains them.

    config         PipelineConfig: paths, resources per stage (GPUs, CPUs, memory, restarts), placement, timeouts
    payloads       typed stage payloads, client events, and the glue functions between stages
    encoder_stage  EncoderStage: waveform -> audio codes (batched)
    llm_stage      LLMStage: prompt -> text deltas + audio chunks (continuous batching, per-request backpressure)
    engine_loop    EngineLoop: the LLM stage's engine task (admission wait, inline-or-thread steps, runs of steps)
    decoder_stage  DecoderStage: audio chunks -> PCM (one incremental stream per request, batched)
    builder        the stages' Ray forms (device from the assigned GPU), placement group + ray.remote + resources
    placement      where a stage runs: device and dtype for its GPU ids, a placement report (no ray)
    orchestration  run_request: the speech data path, once, over a StageClients protocol (no ray)
    streams        the LLM fold and the decoder's chunk protocol, shared by run_request and the batch job
    handles        StageClients over remote handles (Ray actors, Serve deployments): error translation, once
    pipeline       StagedPipeline: RayStageClients over the three actors' handles
    local          LocalPipeline: LocalStageClients over the stage objects in one process (no ray)
    results        collect: a request's events gathered into one result

Nothing here knows HTTP; `serve/` builds on these classes.
"""
from __future__ import annotations

_EXPORTS = {
    "PipelineConfig": "actors.config",
    "StageResources": "actors.config",
    "StagedPipeline": "actors.staged_pipeline",
    "collect": "actors.results",
    "run_request": "actors.orchestration",
    "StageClients": "actors.orchestration",
    "StageFailure": "actors.orchestration",
    "LocalPipeline": "actors.local",
    "EncoderStage": "actors.encoder_stage",
    "LLMStage": "actors.llm_stage",
    "DecoderStage": "actors.decoder_stage",
    "build_stages": "actors.builder",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):  # lazy: `import actors.config` stays free of torch and ray
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'actors' has no attribute {name!r}")
