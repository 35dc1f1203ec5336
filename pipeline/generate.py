"""The LLM engine's public names, and `generate` for one prompt.

The engine is split by concept: `pipeline.requests` (request, events, result), `pipeline.schedules` (MCTP
decode schedules), `pipeline.sequence` (per-request decode state), `pipeline.admission` (when a new request
joins the batch), `pipeline.layout` (a model's token layout) and `pipeline.engine` (`DecodeEngine`). Code
outside `pipeline/` imports them from here.
"""
from __future__ import annotations

from pipeline.engine import DecodeEngine
from pipeline.layout import default_layout
from pipeline.observe import RequestTrace, StepObserver
from pipeline.requests import EXACT, AudioChunkEvent, EndEvent, GenerationRequest, GenerationResult, TokenEvent
from pipeline.sampling import SamplingParams
from pipeline.schedules import checkpoint_default_mode, expand_schedule, resolve_mode
from pipeline.tokens import TokenLayout

__all__ = [
    "SamplingParams", "GenerationRequest", "TokenEvent", "AudioChunkEvent", "EndEvent", "DecodeEngine",
    "GenerationResult", "generate", "expand_schedule", "resolve_mode", "default_layout", "EXACT",
    "checkpoint_default_mode", "StepObserver", "RequestTrace",
]


def generate(
    model,
    prompt_ids,
    mode=None,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_ids=None,
    layout: TokenLayout | None = None,
    constraint: str | None = None,
    trace: bool = False,
    verify: bool = False,
    trace_logits: bool = False,
) -> GenerationResult:
    """Generate for one prompt and return the new ids with forward counts (and the trace if asked)."""
    observer = RequestTrace(logits=trace_logits) if trace or trace_logits else None
    engine = DecodeEngine(model, layout=layout, observer=observer)
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        mode=mode,
        max_new_tokens=max_new_tokens,
        sampling=sampling if sampling is not None else SamplingParams(),
        stop_ids=stop_ids,
        constraint=constraint,
        verify=verify,
    )
    ids, end = [], None
    for event in engine.stream(request):
        if isinstance(event, TokenEvent):
            ids.append(event.token_id)
        elif isinstance(event, EndEvent):
            end = event
    usage = end.usage
    return GenerationResult(
        ids=ids,
        end_reason=end.reason,
        backbone_forwards=usage["backbone_forwards"],
        mtp_forwards=usage["mtp_forwards"],
        usage=usage,
        trace=observer.pop(request.request_id) if observer is not None else None,
    )
