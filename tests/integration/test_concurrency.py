"""Many clients at once: no errors, every answer the bytes that were put.

16 clients (each its own transfer.rpc.client.KVClient and channel) put chunks, look
them up and read them back, and read chunks other clients wrote, against one
in-process server with RAM + disk tiers, for a few seconds. bench/reliability.py
runs 64 clients for 60 s against ``kvstore serve`` and reports throughput and p99.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore.config import StoreConfig
from kvstore.server import ServerHandle
from transfer.testing import run_concurrency


def test_sixteen_concurrent_clients_see_no_errors(kvstore_server: ServerHandle) -> None:
    report = run_concurrency(
        kvstore_server.target, clients=16, seconds=3.0, seed=4, layers=4, blob_bytes=8192
    )
    assert report["errors"] == 0, report["error_examples"]
    assert report["wrong_answers"] == 0, report
    assert report["ops"] >= 16 * 4, report  # every client completed at least one full cycle
    counters = kvstore_server.service.counters.snapshot()
    assert counters.get("rejected", 0) == 0, counters


def test_concurrent_clients_with_auth_stay_in_their_tenant(
    kvstore_config_factory: Callable[..., StoreConfig],
) -> None:
    """Clients of two tenants at once: each only ever sees its own bytes, none is refused."""
    import threading

    from kvstore.server import serve

    config = kvstore_config_factory(**{"auth.tokens": {"tok-a": "a", "tok-b": "b"}})
    handle = serve(config)
    try:
        results: dict[str, dict] = {}

        def run(tenant: str, token: str) -> None:
            results[tenant] = run_concurrency(
                handle.target,
                clients=4,
                seconds=2.0,
                seed=ord(tenant),
                token=token,
                namespace=f"{tenant}/model/profile",
                layers=2,
                blob_bytes=4096,
            )

        threads = [threading.Thread(target=run, args=(t, f"tok-{t}")) for t in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for tenant, report in results.items():
            assert report["errors"] == 0 and report["wrong_answers"] == 0, (tenant, report)
            assert report["ops"] > 0, (tenant, report)
    finally:
        handle.stop(grace=0)
