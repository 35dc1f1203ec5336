"""The decoder's request-id router on its own (no cluster): a request's calls stay on one replica, new streams
spread over the replicas, ended pins linger only so long, and a lost replica does not hold its requests."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from actors.payloads import CodesChunk
from serve.decoder_router import DecoderStreamRouter, stream_call


def _router(**state) -> DecoderStreamRouter:
    router = object.__new__(DecoderStreamRouter)  # the routing logic alone, without Serve's handle machinery
    router.initialize_state(**state)
    return router


def _replicas(*names):
    return [SimpleNamespace(replica_id=n) for n in names]


def _route(router, replicas, arg) -> str:
    pending = SimpleNamespace(args=[arg], routing_context=SimpleNamespace(should_backoff=False))
    (rank,) = asyncio.run(router.choose_replicas(replicas, pending))
    assert pending.routing_context.should_backoff  # Serve backs off between tries instead of spinning
    (replica,) = rank
    return replica.replica_id


def _push(request_id: str, seq: int, final: bool = False) -> CodesChunk:
    return CodesChunk(request_id, [] if final else [1, 2, 3], seq=seq, final=final)


def test_a_requests_chunks_stay_on_the_replica_of_its_first_chunk():
    router, replicas = _router(), _replicas("a", "b", "c")
    owners = {f"r{i}": _route(router, replicas, _push(f"r{i}", 0)) for i in range(6)}
    assert sorted(owners.values()) == ["a", "a", "b", "b", "c", "c"]  # fewest open streams first
    for seq in range(1, 5):
        for rid, owner in owners.items():
            assert _route(router, replicas, _push(rid, seq)) == owner
    assert _route(router, replicas, _push("r0", 5, final=True)) == owners["r0"]
    assert _route(router, replicas, _push("r0", 5, final=True)) == owners["r0"]  # a retried final call too
    assert _route(router, replicas, "r1") == owners["r1"]  # close(request_id)
    assert router.streams[owners["r0"]] == 1 and router.streams[owners["r1"]] == 1  # ended: no longer counted


def test_a_lost_replica_frees_its_requests_and_ended_pins_expire():
    router = _router(linger_s=0.0)
    first = _route(router, _replicas("a", "b"), _push("x", 0))
    other = "b" if first == "a" else "a"
    assert _route(router, _replicas(other), _push("x", 1)) == other  # refused there (no stream), not stuck
    assert "x" in router.owner and router.streams[first] == 0
    _route(router, _replicas(other), _push("x", 2, final=True))
    _route(router, _replicas(other), _push("y", 0))  # the next call forgets ended pins older than linger_s
    assert "x" not in router.owner and set(router.owner) == {"y"}


def test_open_pins_are_bounded_and_other_calls_are_not_stream_calls():
    router, replicas = _router(max_streams=3), _replicas("a", "b")
    for i in range(5):
        _route(router, replicas, _push(f"r{i}", 0))
    _route(router, replicas, _push("r5", 0))
    assert list(router.live) == ["r3", "r4", "r5"] and sum(router.streams.values()) == 3
    assert stream_call(SimpleNamespace(args=[])) == (None, False)  # check_health, stats
    assert stream_call(SimpleNamespace(args=[[1, 2, 3]])) == (None, False)  # decode(codes)
    assert _route(router, replicas, [1, 2, 3]) in {"a", "b"}


def test_the_serve_internals_the_router_relies_on_exist():
    """The router matches a chosen replica to its own call through RequestRouter internals of the pinned Ray
    (pyproject): an upgrade that renames them must fail here, not route chunks to the wrong replica."""
    from ray.serve.request_router import RequestRouter

    for name in ("_pending_requests_to_fulfill", "_cancel_routing_task_for_pending_request", "_record_queue_wait_time",
                 "_remove_pending_request_from_indices"):
        assert name in RequestRouter.__init__.__code__.co_names or hasattr(RequestRouter, name), name
