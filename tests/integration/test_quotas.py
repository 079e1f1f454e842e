"""Per-tenant byte quotas: an explicit RESOURCE_EXHAUSTED, never a silent drop.

Usage is the bytes of blobs a tenant's accepted Puts stored (trailer included);
a Put that would cross the limit is refused whole and stores nothing; a Delete
gives the bytes back; other tenants are unaffected.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import integrity
from kvstore.auth import bearer_metadata
from kvstore.errors import QuotaExceeded
from kvstore.quotas import QuotaLedger
from kvstore.server import ServerHandle, serve
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.fixtures.store import committed, store_config

LIMIT = 100_000
TOKENS = {"tok-small": "small", "tok-big": "big"}


# ---------------------------------------------------------------- unit: the ledger


def test_ledger_charges_refuses_and_releases() -> None:
    ledger = QuotaLedger(default_max_bytes=0, per_tenant={"small": 100})
    ledger.charge("small", 60)
    with pytest.raises(QuotaExceeded, match=r"60 bytes in use \+ 41 requested > limit 100 bytes"):
        ledger.charge("small", 41)
    assert ledger.usage("small") == 60  # the refused charge reserved nothing
    ledger.charge("small", 40)
    ledger.release("small", 70)
    assert ledger.usage("small") == 30
    ledger.replace("small", old_nbytes=30, new_nbytes=90)
    assert ledger.usage("small") == 90
    ledger.replace("small", old_nbytes=90, new_nbytes=10)
    assert ledger.usage("small") == 10
    ledger.release("small", 1000)  # never negative (e.g. after a restart reset usage)
    assert ledger.usage("small") == 0
    ledger.charge("anyone", 10**12)  # default 0 = unlimited
    assert ledger.limit("anyone") == 0 and not QuotaLedger().enabled
    with pytest.raises(ValueError):
        ledger.charge("small", -1)


def test_ledger_is_thread_safe_at_the_limit() -> None:
    ledger = QuotaLedger(per_tenant={"t": 1000})
    accepted = []

    def worker() -> None:
        for _ in range(100):
            try:
                ledger.charge("t", 7)
                accepted.append(7)
            except QuotaExceeded:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(accepted) == ledger.usage("t") <= 1000
    assert ledger.usage("t") > 1000 - 7


# ---------------------------------------------------------------- over gRPC


@pytest.fixture
def quota_server(tmp_path: Path) -> Iterator[ServerHandle]:
    handle = serve(store_config(tmp_path, **{"auth.tokens": TOKENS, "quotas.per_tenant": {"small": LIMIT}}))
    try:
        yield handle
    finally:
        handle.stop(grace=0)


def _put(stub: pb_grpc.KVStoreStub, tenant: str, key: bytes, nbytes: int, layers: int = 1) -> None:
    reqs = [
        pb.PutRequest(
            namespace=f"{tenant}/m/p",
            key=key,
            layer=i,
            num_layers=layers,
            blob=integrity.seal(os.urandom(nbytes - integrity.TRAILER_BYTES)),
        )
        for i in range(layers)
    ]
    stub.Put(committed(reqs), timeout=10, metadata=bearer_metadata(f"tok-{tenant}"))


def _present(stub: pb_grpc.KVStoreStub, tenant: str, key: bytes) -> int:
    return stub.Lookup(
        pb.LookupRequest(namespace=f"{tenant}/m/p", keys=[key], num_layers=1),
        timeout=10,
        metadata=bearer_metadata(f"tok-{tenant}"),
    ).num_present


def test_over_quota_put_is_refused_clearly_and_stores_nothing(quota_server: ServerHandle) -> None:
    with grpc.insecure_channel(quota_server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        first = os.urandom(32)
        _put(stub, "small", first, 20_000, layers=4)  # 80,000 of 100,000
        assert quota_server.service.quotas.usage("small") == 80_000

        second = os.urandom(32)
        with pytest.raises(grpc.RpcError) as err:
            _put(stub, "small", second, 10_000, layers=3)  # would be 110,000
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = err.value.details()
        assert "quota" in details and "80000 bytes in use" in details and "limit 100000" in details, details
        assert _present(stub, "small", second) == 0  # refused whole: not one layer stored
        assert quota_server.service.quotas.usage("small") == 80_000

        # Another tenant is not affected by small's quota (and has none of its own).
        _put(stub, "big", os.urandom(32), 50_000, layers=4)
        assert quota_server.service.quotas.usage("big") == 200_000

        # Deleting gives the bytes back; the refused Put now fits.
        deleted = stub.Delete(
            pb.DeleteRequest(namespace="small/m/p", keys=[first]),
            timeout=10,
            metadata=bearer_metadata("tok-small"),
        )
        assert deleted.num_deleted == 1
        assert quota_server.service.quotas.usage("small") == 0
        _put(stub, "small", second, 10_000, layers=3)
        assert _present(stub, "small", second) == 1
        assert quota_server.service.quotas.usage("small") == 30_000


def test_delete_with_num_layers_gives_back_exactly_those_layers(quota_server: ServerHandle) -> None:
    with grpc.insecure_channel(quota_server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        key = os.urandom(32)
        _put(stub, "small", key, 20_000, layers=4)
        assert quota_server.service.quotas.usage("small") == 80_000

        def delete(**extra: int) -> int:
            return stub.Delete(
                pb.DeleteRequest(namespace="small/m/p", keys=[key], **extra),
                timeout=10,
                metadata=bearer_metadata("tok-small"),
            ).num_deleted

        assert delete(num_layers=3) == 1  # layers 0..2: 60,000 bytes back, layer 3 still charged
        assert quota_server.service.quotas.usage("small") == 20_000
        assert delete() == 1  # no layer count: whatever is left, found by searching the tiers
        assert quota_server.service.quotas.usage("small") == 0


def test_quota_applies_without_auth_by_namespace_tenant(tmp_path: Path) -> None:
    """With auth off the tenant is the namespace's first part; quotas still hold."""
    handle = serve(store_config(tmp_path, **{"quotas.default_max_bytes": 10_000}))
    try:
        with grpc.insecure_channel(handle.target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            blob = integrity.seal(os.urandom(6_000))

            def put(ns: str) -> None:
                request = pb.PutRequest(namespace=ns, key=os.urandom(32), layer=0, num_layers=1, blob=blob)
                stub.Put(committed([request]), timeout=10)

            put("x/m/p")
            with pytest.raises(grpc.RpcError) as err:
                put("x/m/p")
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            put("y/m/p")  # y has its own 10,000 bytes
    finally:
        handle.stop(grace=0)


def test_rewriting_the_same_blocks_is_not_charged_twice(quota_server: ServerHandle) -> None:
    """Puts are idempotent (clients replay a whole batch on retry): a rewrite of stored
    blocks charges only the size difference, so retries cannot exhaust a quota."""
    with grpc.insecure_channel(quota_server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        key = os.urandom(32)
        blobs = [integrity.seal(os.urandom(20_000 - integrity.TRAILER_BYTES)) for _ in range(2)]
        reqs = [
            pb.PutRequest(namespace="small/m/p", key=key, layer=i, num_layers=2, blob=b)
            for i, b in enumerate(blobs)
        ]
        for _ in range(4):  # 4 x 40,000 bytes would exceed 100,000 if each replay were charged
            stub.Put(committed(reqs), timeout=10, metadata=bearer_metadata("tok-small"))
        assert quota_server.service.quotas.usage("small") == 40_000
