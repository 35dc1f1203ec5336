"""Request-id affinity for the audio decoder deployment, so that it can run more than one replica.

A decoder stream (flow-matching cache, vocoder state) lives on the replica that decoded the request's first
chunk. Serve's default router picks a replica per call, so the request's later `push` calls would reach
replicas without its stream. `DecoderStreamRouter` keeps request id -> replica from the first chunk until the
final chunk or `close`, and sends every call of the request to that replica alone (waiting while it is busy).
A new stream goes to the replica with the fewest open streams pinned by this router (ties at random). A call
may be routed more than once (a replica at max_ongoing_requests refuses it and the router tries again), so an
ended stream's pin lingers a minute. Such a retry never lets a later chunk of the stream overtake it: the caller
(`serve.deployments.ServeStageClients`, through `actors.orchestration.ChunkGate`) sends a request's next chunk
only once this one was accepted, and the decoder's caps hold every LLM slot's chunks (`serve.app.Args`).

The router runs in each caller (the ingress replicas) and sees only that caller's requests, which is enough:
all chunks of a request come from the one ingress replica that runs it. If the owner replica dies, its
requests' later chunks go to another replica, which has no stream for them: the chunk waits there for its
earlier ones at most `chunk_wait_s` and fails (the request ends with a decoder error), and the next request pins
a live replica.
"""
from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict
from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from actors.payloads import CodesChunk

ROUTER_CLASS = "serve.decoder_router:DecoderStreamRouter"  # the decoder deployment's request_router_class


class DecoderStreamRouter(RequestRouter):
    """Pins each request's decoder calls (`push` of its chunks, `close`) to one replica."""

    def initialize_state(self, max_streams: int = 100_000, linger_s: float = 60.0):
        self.owner: dict[str, ReplicaID] = {}  # request id -> its stream's replica
        self.live: OrderedDict[str, None] = OrderedDict()  # requests whose stream is open, oldest first
        self.ended: OrderedDict[str, float] = OrderedDict()  # request id -> when its last call was routed
        self.streams = Counter()  # replica -> open streams pinned to it
        self.max_streams = max_streams  # forget the oldest open pins beyond this (callers that never closed)
        self.linger_s = linger_s  # an ended stream's pin stays this long (its last call may be routed again)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        self._forget_old()
        request_id, ends = stream_call(pending_request)
        if pending_request is not None:  # Serve retries this choice at once unless told to back off: a busy
            pending_request.routing_context.should_backoff = True  # loop while the replica is probed or full
        if request_id is None:  # not a stream call (health, stats, whole-utterance decode): any replica
            return [[random.choice(candidate_replicas)]]
        by_id = {r.replica_id: r for r in candidate_replicas}
        owner = self.owner.get(request_id)
        if owner is not None and owner not in by_id:  # its replica is gone, and the stream with it
            self._unpin(request_id)
            owner = None
        if owner is None:
            fewest = min(self.streams[r] for r in by_id)
            owner = random.choice([r for r in by_id if self.streams[r] == fewest])
            self.owner[request_id] = owner
            self.live[request_id] = None
            self.streams[owner] += 1
            while len(self.live) > self.max_streams:
                self._unpin(next(iter(self.live)))
        if ends and request_id in self.live:  # the final chunk or close: the stream ends on that replica
            del self.live[request_id]
            self.streams[owner] -= 1
            self.ended[request_id] = time.monotonic()
        return [[by_id[owner]]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give the replica chosen for a call to that call. Serve's own matching goes by internal request id, which
        all calls a replica makes while serving one HTTP request share (it is inherited from that request), so
        concurrent pushes of one stream would wait on each other's match; the call's metadata object is its own."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return

    def _unpin(self, request_id: str) -> None:
        owner = self.owner.pop(request_id, None)
        if request_id in self.live:
            del self.live[request_id]
            self.streams[owner] -= 1
        self.ended.pop(request_id, None)

    def _forget_old(self) -> None:
        now = time.monotonic()
        while self.ended and now - next(iter(self.ended.values())) > self.linger_s:
            self._unpin(next(iter(self.ended)))


def stream_call(pending_request: Optional[PendingRequest]) -> tuple[str | None, bool]:
    """(request id, whether this call ends the stream) of a decoder call, or (None, False) for other calls."""
    if pending_request is None or not pending_request.args:
        return None, False
    first = pending_request.args[0]
    if isinstance(first, CodesChunk):  # push
        return first.request_id, first.final
    if isinstance(first, str):  # close(request_id)
        return first, True
    return None, False
