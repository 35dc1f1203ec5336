"""`generate`: one prompt through the decode engine (`decode_engine.DecodeEngine`), ids and forward counts back."""
from __future__ import annotations

from pipeline.engine.decode_engine import DecodeEngine
from pipeline.engine.observe import RequestTrace
from pipeline.engine.requests import (
    EndEvent,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)
from pipeline.engine.sampling import SamplingParams
from pipeline.tokens.vocab import TokenLayout



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
