"""`StageClients` over handles to remote stages, written once for Ray actor handles (`actors.staged_pipeline`) and
Ray Serve deployment handles (`serve.deployments`): the data path calls, fire-and-forget frees, and the
translation of what a handle call raised into a stage-named failure.

    stage died / unreachable     -> StageFailure (Ray restarts it; the next request works)
    stage restarting (call never ran there) -> StageRestarting (the orchestration resends where safe)
    stage refused at capacity    -> StageBusy (Serve's max_queued_requests)
    the stage's own error        -> StageFailure with the error's type and first line

A transport subclass says how a call reaches its stage (`_await`) and how the LLM stream is read
(`_llm_stream`); everything else is here.
"""
from __future__ import annotations

import contextvars
from typing import AsyncIterator

from actors.orchestration import StageBusy, StageFailure, StageRestarting
from actors.payloads import AudioPayload, CodesChunk, LLMOutput, PCMChunk, SpeechRequest


def stage_failure(stage: str, err: BaseException) -> StageFailure:
    """A one-line, stage-named failure for what a handle call raised (`StageRestarting` if resending is safe,
    `StageBusy` if the stage refused the call at capacity)."""
    import ray

    if isinstance(err, StageFailure):
        return err
    if _is_back_pressure(err):
        return StageBusy(stage, f"{stage} stage is at capacity: {err}")
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        kind = StageRestarting if isinstance(err, ray.exceptions.ActorUnavailableError) else StageFailure
        return kind(stage, f"{stage} stage actor died or is unreachable during the request "
                           f"({type(err).__name__}); Ray restarts it, retry the request")
    if isinstance(err, ray.exceptions.RayTaskError):
        err = err.cause if getattr(err, "cause", None) is not None else err
    lines = str(err).strip().splitlines()
    return StageFailure(stage, f"{stage} stage failed: {type(err).__name__}: {lines[0] if lines else ''}")


def _is_back_pressure(err: BaseException) -> bool:
    try:
        from ray.serve.exceptions import BackPressureError
    except ImportError:  # Serve not installed: no deployment handle raised it
        return False
    return isinstance(err, BackPressureError)


class HandleStageClients:
    """`actors.orchestration.StageClients` over the three stages' handles (`encoder`, `llm`, `decoder`), whose
    `method.remote(...)` calls return awaitables."""

    def __init__(self, encoder, llm, decoder):
        self.encoder, self.llm, self.decoder = encoder, llm, decoder

    # --- what a transport provides ---------------------------------------------------------------------
    async def _await(self, stage: str, response):
        """The result of one handle call (`response` is what `.remote()` returned)."""
        return await response

    def _llm_stream(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        """The LLM stage's `generate` as the items it yields."""
        raise NotImplementedError

    # --- StageClients ------------------------------------------------------------------------------------
    async def _call(self, stage: str, method, *args):
        try:
            return await self._await(stage, method.remote(*args))
        except Exception as err:
            raise stage_failure(stage, err) from None

    async def encode(self, audio: AudioPayload) -> list[int]:
        return await self._call("encoder", self.encoder.encode, audio)

    async def generate(self, request: SpeechRequest) -> AsyncIterator[LLMOutput]:
        stream = self._llm_stream(request)
        try:
            while True:
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as err:
                    raise stage_failure("llm", err) from None
                yield item
        finally:
            await stream.aclose()

    async def push(self, chunk: CodesChunk) -> PCMChunk:
        return await self._call("decoder", self.decoder.push, chunk)

    def close(self, request_id: str) -> None:
        _fire(self.decoder.close, request_id)

    def abort(self, request_id: str) -> None:
        _fire(self.llm.abort, request_id)


def _fire(method, *args) -> None:
    """Send a free (abort, close) without waiting for it. It is sent in a fresh context, not as a child of the
    request being served: a consumer that went away cancels that request, and Ray Serve then cancels the
    request's child calls still being routed, which would drop this one and leave the stream open."""
    try:  # a dead stage is ignored: there is nothing left to free on it
        contextvars.Context().run(method.remote, *args)
    except Exception:
        pass
