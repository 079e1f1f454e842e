"""Calls every workload makes: one RPC as a status, the commit-ended Put stream, a round trip.

Also :data:`PRECISE`, the statuses a server chooses on purpose (what the fuzzer and
the fault workloads accept as an answer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from kvstore import integrity
from kvstore.auth import bearer_metadata
from kvstore.keys import KEY_BYTES
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

SERVICE = "/kvstore.v1.KVStore/"
C = grpc.StatusCode
#: Statuses a server chooses on purpose. UNKNOWN, INTERNAL (a bug or an unhandled
#: exception), UNAVAILABLE and DEADLINE_EXCEEDED (server down or hung) never count as precise.
PRECISE = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.RESOURCE_EXHAUSTED,
        C.DATA_LOSS,
        C.PERMISSION_DENIED,
        C.UNAUTHENTICATED,
    }
)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rpc_code(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str, Any]:
    """Run one call; (status, details, result) instead of an exception."""
    try:
        result = fn()
        return C.OK, "", result
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def committed(requests: Any) -> Iterator[Any]:
    """A Put request stream ended by its commit message (the server stores nothing without it)."""
    yield from requests
    yield pb.PutRequest(commit=True)


#: The commit message as bytes, appended to every raw Put stream the fuzzer sends.
COMMIT_BYTES = pb.PutRequest(commit=True).SerializeToString()


def roundtrip_ok(target: str, namespace: str, token: str | None, credentials: Any = None) -> bool:
    """A valid Put then Get of a fresh blob answers OK with the same bytes."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = pb_grpc.KVStoreStub(channel)
        md = bearer_metadata(token) if token else None
        key, blob = os.urandom(KEY_BYTES), integrity.seal(os.urandom(1000))
        try:
            stub.Put(
                committed([pb.PutRequest(namespace=namespace, key=key, layer=0, num_layers=1, blob=blob)]),
                timeout=10,
                metadata=md,
            )
            got = list(
                stub.Get(
                    pb.GetRequest(namespace=namespace, keys=[key], layer_start=0, layer_end=1),
                    timeout=10,
                    metadata=md,
                )
            )
        except grpc.RpcError:
            return False
        return len(got) == 1 and got[0].blob == blob


def seed_chunks(
    target: str, namespace: str, token: str | None, count: int = 8, num_layers: int = 4
) -> list[tuple[bytes, int]]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        out = []
        for _ in range(count):
            key = os.urandom(KEY_BYTES)
            reqs = [
                pb.PutRequest(
                    namespace=namespace,
                    key=key,
                    layer=i,
                    num_layers=num_layers,
                    blob=integrity.seal(os.urandom(512)),
                )
                for i in range(num_layers)
            ]
            stub.Put(committed(reqs), timeout=10, metadata=bearer_metadata(token) if token else None)
            out.append((key, num_layers))
        return out
