"""``replica_repair``: a replica SIGKILLed under load comes back empty and gets its copies back.

Three (``replicas``) ``kvstore serve`` processes with RAM only, R=2. Cluster
clients (blocking, or asyncio with ``aio``) read and write while one replica is
SIGKILLed, stays down for ``down_s`` (writes then land on one owner only), and
is restarted on its port with nothing in it: every chunk it owns, written
before or during the outage, now has one copy. Then, polled against a
deadline:

* **looks up whole**: a *fresh* cluster client (no hints, no memory of the
  failure) looks up every acknowledged prefix, pass after pass; each must come
  back whole (``fresh_client_short_per_pass`` counts the short ones per pass,
  the first pass starting as the replica is back);
* **copies whole**: every acknowledged chunk is held by each of its R owners,
  asked replica by replica with plain clients (which repair nothing).

Counted: caller errors (any exception out of a client call: must be 0), wrong
bytes read back (must be 0), lookups that came back short during the load, the
seconds from the return until each condition held (the end of the first pass
that found it so), and the bytes the clients' repairs copied
(``bytes_repaired`` of every client) against the bytes the victim was owed (its
chunks acknowledged by the time it came back, times layers times blob size: a
lower bound, since writers that still had it marked down kept writing one copy
for a moment), and the bytes the victim took in (Put) against the bytes it
holds at the end: the difference is what was copied to it twice (two clients
repairing the same chunk at once).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from kvstore import integrity
from kvstore.keys import chunk_keys
from transfer.errors import TransferError
from transfer.replicas import placement
from transfer.replicas.aio_client import AsyncClusterKVClient, connect_async
from transfer.replicas.client import ClusterKVClient, connect
from transfer.rpc.client import KVClient

CHUNK_TOKENS = 16
NAMESPACE = "repair/model/profile"


class _Prefix:
    """A prompt of ``chunks`` chunks: its keys and the sealed blob of every layer."""

    def __init__(self, ns: str, rng: random.Random, chunks: int, layers: int, blob_bytes: int) -> None:
        tokens = [rng.randrange(50_000) for _ in range(chunks * CHUNK_TOKENS)]
        self.ns = ns
        self.keys = chunk_keys(tokens, ns, CHUNK_TOKENS)
        self.layers = layers
        self.blobs = [[integrity.seal(rng.randbytes(blob_bytes)) for _ in range(layers)] for _ in self.keys]

    def items(self) -> list[tuple[bytes, int, int, bytes]]:
        return [
            (k, layer, self.layers, self.blobs[i][layer])
            for i, k in enumerate(self.keys)
            for layer in range(self.layers)
        ]

    def wrong(self, layer: int, blobs: list[Any]) -> int:
        return sum(bytes(b) != self.blobs[i][layer] for i, b in enumerate(blobs))


class _Tally:
    """What the load clients share: the acknowledged prefixes, counts, errors, and their counters."""

    def __init__(self, layers: int, blob_bytes: int) -> None:
        self.layers = layers
        self.blob_bytes = blob_bytes
        self.lock = threading.Lock()
        self.counts = {"reads": 0, "puts": 0, "short_lookups": 0, "wrong_blobs": 0}
        self.errors: list[str] = []
        self.acked: list[_Prefix] = []
        self.counters: list[dict[str, dict[str, int]]] = []

    def add(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                self.counts[k] += v


def run_replica_repair(
    start: Callable[[int], Any],
    *,
    replicas: int = 3,
    replication: int = 2,
    prefixes: int = 24,
    chunks: int = 8,
    layers: int = 4,
    blob_bytes: int = 1024,
    readers: int = 2,
    writers: int = 1,
    warm_s: float = 1.0,
    down_s: float = 2.5,
    deadline_s: float = 60.0,
    aio: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """``start(port)`` starts a RAM-only ``kvstore serve`` (port 0: any) and returns its ServerProcess."""
    rng = random.Random(seed)
    procs = [start(0) for _ in range(replicas)]
    target = ",".join(p.target for p in procs)
    members = tuple(sorted(p.target for p in procs))
    tally = _Tally(layers, blob_bytes)
    stop = threading.Event()
    ns = NAMESPACE
    try:
        with _cluster(connect(target, replication=replication)) as client:
            for _ in range(prefixes):
                p = _Prefix(ns, rng, chunks, layers, blob_bytes)
                if client.put(ns, p.items()).num_stored == len(p.keys) * layers:
                    tally.acked.append(p)
        load = _aio_load if aio else _load
        threads = [
            threading.Thread(target=load, args=(role, target, replication, tally, stop, seed * 100 + i))
            for i, role in enumerate(["read"] * readers + ["write"] * writers)
        ]
        for t in threads:
            t.start()
        stop.wait(warm_s)  # load before the crash
        victim = procs[1]
        victim.kill()
        stop.wait(down_s)  # load while it is down: its chunks get one copy
        procs[1] = start(victim.port)  # back, empty, on the same port
        back = time.monotonic()
        with tally.lock:
            acked = list(tally.acked)
        owed = [
            (p, k)
            for p in acked
            for k in p.keys
            if victim.target in placement.owners(k, members, replication)
        ]
        lookup_whole_s = None
        copies: dict[str, Any] = {}
        checker = threading.Thread(
            target=_watch_copies, args=(procs, acked, replication, layers, back, deadline_s, copies)
        )
        checker.start()
        short_by_pass: list[int] = []
        with _cluster(connect(target, replication=replication)) as fresh:
            while time.monotonic() - back < deadline_s and (lookup_whole_s is None or checker.is_alive()):
                short = sum(fresh.lookup(p.ns, p.keys, layers) < len(p.keys) for p in acked)
                short_by_pass.append(short)
                if short == 0 and lookup_whole_s is None:
                    lookup_whole_s = round(time.monotonic() - back, 2)
            checker.join()
            tally.counters.append(fresh.replica_counters())
        copies_whole_s = copies.get("whole_s")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        repaired = _sum(tally.counters, "bytes_repaired")
        owed_bytes = len(owed) * layers * (blob_bytes + integrity.TRAILER_BYTES)  # sealed blobs
        with KVClient(procs[1].target) as plain:  # what the victim took since it came back
            stats = plain.stats()
        held = sum(t.bytes for t in stats.tiers)
        return {
            "clients": "asyncio" if aio else "blocking",
            "replicas": replicas,
            "replication": replication,
            "acked_prefixes": len(acked),
            "acked_chunks": sum(len(p.keys) for p in acked),
            **tally.counts,
            "caller_errors": len(tally.errors),
            "errors": tally.errors[:5],
            "down_s": down_s,
            "lookup_whole_after_return_s": lookup_whole_s,
            "copies_whole_after_return_s": copies_whole_s,
            "deadline_s": deadline_s,
            "fresh_client_short_per_pass": short_by_pass,
            "chunks_owed": len(owed),
            "bytes_owed": owed_bytes,
            "chunks_repaired": _sum(tally.counters, "chunks_repaired"),
            "bytes_repaired": repaired,
            "copy_overhead": round(repaired / max(1, owed_bytes), 2),
            "watch_errors": copies.get("watch_errors", [])[:3],
            "victim_bytes_put": stats.counters.get("bytes_put", 0),
            "victim_bytes_held": held,
            "victim_bytes_put_twice": stats.counters.get("bytes_put", 0) - held,
            "holes_found": _sum(tally.counters, "holes_found"),
            "hints": _sum(tally.counters, "hints"),
        }
    finally:
        stop.set()
        for p in procs:
            p.kill()


def _sum(counters: list[dict[str, dict[str, int]]], name: str) -> int:
    return sum(c.get(name, 0) for snapshot in counters for c in snapshot.values())


def _watch_copies(
    procs: list[Any],
    acked: list[_Prefix],
    replication: int,
    layers: int,
    back: float,
    deadline_s: float,
    out: dict[str, Any],
) -> None:
    """Poll until every acknowledged chunk is on each of its owners (``out["whole_s"]``: seconds
    after ``back``) or the deadline passes. Plain clients, replica by replica: they repair nothing."""
    members = tuple(sorted(p.target for p in procs))
    owned = {
        proc.target: [
            (p, [k for k in p.keys if proc.target in placement.owners(k, members, replication)])
            for p in acked
        ]
        for proc in procs
    }
    clients = [KVClient(proc.target) for proc in procs]
    try:
        while time.monotonic() - back < deadline_s:
            try:
                whole = all(
                    plain.lookup(p.ns, keys, layers) == len(keys)
                    for plain, proc in zip(clients, procs, strict=True)
                    for p, keys in owned[proc.target]
                    if keys
                )
            except TransferError as exc:  # recorded with which replicas were alive; polled again
                dead = [p.target for p in procs if p.proc.poll() is not None]
                out.setdefault("watch_errors", []).append(f"{exc} (exited: {dead or 'none'})")
                continue
            if whole:
                out["whole_s"] = round(time.monotonic() - back, 2)
                return
            time.sleep(0.1)  # a poll interval (the deadline bounds it), leaving the CPUs to the repairs
    finally:
        for c in clients:
            c.close()


def _load(role: str, target: str, replication: int, tally: _Tally, stop: threading.Event, seed: int) -> None:
    """One blocking cluster client reading (Lookup, then Get of what it found) or writing prefixes."""
    rng = random.Random(seed)
    try:
        with _cluster(connect(target, replication=replication)) as client:
            while not stop.is_set():
                if role == "write":
                    p = _Prefix(NAMESPACE, rng, 4, tally.layers, tally.blob_bytes)
                    if client.put(p.ns, p.items()).num_stored == len(p.keys) * p.layers:
                        with tally.lock:
                            tally.acked.append(p)
                    tally.add(puts=1)
                    continue
                with tally.lock:
                    p = rng.choice(tally.acked)
                n = client.lookup(p.ns, p.keys, p.layers)
                wrong = 0
                if n:
                    for layer, blobs in client.get_layers(p.ns, p.keys[:n], 0, p.layers):
                        wrong += p.wrong(layer, blobs)
                tally.add(reads=1, short_lookups=int(n < len(p.keys)), wrong_blobs=wrong)
            with tally.lock:
                tally.counters.append(client.replica_counters())
    except Exception as exc:  # noqa: BLE001 - every exception out of a client call is a caller error
        with tally.lock:
            tally.errors.append(f"{role}: {type(exc).__name__}: {exc}")


def _aio_load(
    role: str, target: str, replication: int, tally: _Tally, stop: threading.Event, seed: int
) -> None:
    """:func:`_load` with an :class:`transfer.replicas.aio_client.AsyncClusterKVClient` on its own loop."""

    async def main() -> None:
        rng = random.Random(seed)
        client = await connect_async(target, replication=replication)
        assert isinstance(client, AsyncClusterKVClient), "a member list gives the cluster client"
        async with client:
            while not stop.is_set():
                if role == "write":
                    p = _Prefix(NAMESPACE, rng, 4, tally.layers, tally.blob_bytes)
                    if (await client.put(p.ns, p.items())).num_stored == len(p.keys) * p.layers:
                        with tally.lock:
                            tally.acked.append(p)
                    tally.add(puts=1)
                    continue
                with tally.lock:
                    p = rng.choice(tally.acked)
                n = await client.lookup(p.ns, p.keys, p.layers)
                wrong = 0
                if n:
                    async for layer, blobs in client.get_layers(p.ns, p.keys[:n], 0, p.layers):
                        wrong += p.wrong(layer, blobs)
                tally.add(reads=1, short_lookups=int(n < len(p.keys)), wrong_blobs=wrong)
            with tally.lock:
                tally.counters.append(client.replica_counters())

    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - every exception out of a client call is a caller error
        with tally.lock:
            tally.errors.append(f"{role}: {type(exc).__name__}: {exc}")


def _cluster(client: KVClient | ClusterKVClient) -> ClusterKVClient:
    """A member list gives the cluster client (the one with per-replica counters)."""
    assert isinstance(client, ClusterKVClient), "a member list gives the cluster client"
    return client
