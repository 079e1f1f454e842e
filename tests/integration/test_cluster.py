"""The cluster client over real ``kvstore serve`` processes on loopback: one keyspace, replicas that
die and come back, a replica added, bad membership input, the asyncio twin and cluster stats."""

from __future__ import annotations

import asyncio
import http.server
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvstore.cli import main as cli_main
from kvstore.keys import chunk_keys
from tests.fixtures.store import ServerProcess, make_blob, start_server_process
from transfer.errors import NotFound, Unavailable
from transfer.replicas import placement
from transfer.replicas.aio_client import AsyncClusterKVClient, connect_async
from transfer.replicas.client import ClusterKVClient, ReplicaMetrics, connect
from transfer.replicas.membership import DnsMembership, InvalidTarget, NotAKVStore
from transfer.rpc.client import KVClient
from transfer.testing import run_replica_repair

LAYERS = 4
CHUNK = 16
SERVE_ARGS = ["--no-disk", "--memory-bytes", "64MiB", "--log-level", "WARNING", "--workers", "8"]


def start(tmp_path: Path, port: int = 0) -> ServerProcess:
    return start_server_process([*SERVE_ARGS, "--port", str(port)], workdir=tmp_path)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    procs = [start(tmp_path) for _ in range(3)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


def target_of(procs: list[ServerProcess]) -> str:
    return ",".join(p.target for p in procs)


class Prefix:
    """A prompt of ``chunks`` chunks, its keys and sealed blobs (the bytes a reader must get back)."""

    def __init__(self, ns: str, seed: int, chunks: int, blob_bytes: int = 1024) -> None:
        rng = random.Random(seed)
        tokens = [rng.randrange(50000) for _ in range(chunks * CHUNK)]
        self.ns = ns
        self.keys = chunk_keys(tokens, ns, CHUNK)
        self.blobs = {(k, layer): make_blob(blob_bytes) for k in self.keys for layer in range(LAYERS)}

    def items(self) -> list[tuple[bytes, int, int, bytes]]:
        return [(k, layer, LAYERS, self.blobs[k, layer]) for k in self.keys for layer in range(LAYERS)]

    def wrong_blobs(self, client: object, count: int) -> int:
        """Read the first ``count`` chunks back; the number of blobs that differ from what was put."""
        wrong = 0
        for layer, blobs in client.get_layers(self.ns, self.keys[:count], 0, LAYERS):  # type: ignore[attr-defined]
            wrong += sum(bytes(b) != self.blobs[k, layer] for k, b in zip(self.keys, blobs, strict=False))
        return wrong


def holders(procs: list[ServerProcess], ns: str, key: bytes) -> set[str]:
    """Which replicas hold ``key``, asked one by one with a plain client."""
    out = set()
    for p in procs:
        with KVClient(p.target) as c:
            if c.lookup(ns, [key], LAYERS) == 1:
                out.add(p.target)
    return out


def test_prefix_put_through_one_client_is_found_whole_by_another(replicas: list[ServerProcess]) -> None:
    prefix = Prefix("t/m/lossless", seed=1, chunks=24)
    with connect(target_of(replicas)) as writer:
        assert isinstance(writer, ClusterKVClient)
        result = writer.put(prefix.ns, prefix.items())
        assert result.num_stored == 24 * LAYERS
    reverse = ",".join(p.target for p in reversed(replicas))  # same set, other order
    with connect(reverse) as reader:
        assert reader.lookup(prefix.ns, prefix.keys, LAYERS) == 24
        assert prefix.wrong_blobs(reader, 24) == 0
        counters = reader.replica_counters()
        assert sum(c["blobs_got"] for c in counters.values()) == 24 * LAYERS
        assert sum(1 for c in counters.values() if c["blobs_got"]) >= 2  # the prefix is spread, not pinned
        registry = CollectorRegistry()
        registry.register(ReplicaMetrics(reader))
        text = generate_latest(registry).decode()
        for member, c in counters.items():
            assert (
                f'kvstore_client_replica_blobs_got_total{{replica="{member}"}} {float(c["blobs_got"])}'
                in text
            )
    members = [p.target for p in replicas]
    for key in prefix.keys:  # each chunk on exactly its two owners
        assert holders(replicas, prefix.ns, key) == set(placement.owners(key, members, 2))
    with connect(target_of(replicas)) as client:
        assert client.delete(prefix.ns, prefix.keys[:1]) >= 2  # both copies
        assert client.lookup(prefix.ns, prefix.keys, LAYERS) == 0
        assert holders(replicas, prefix.ns, prefix.keys[0]) == set()
        assert client.delete(prefix.ns, prefix.keys[1:2], num_layers=LAYERS) >= 2  # by address, both copies
        assert holders(replicas, prefix.ns, prefix.keys[1]) == set()


def test_dns_target_resolves_localhost(replicas: list[ServerProcess]) -> None:
    prefix = Prefix("t/m/dns", seed=2, chunks=6)
    with connect(f"dns:///localhost:{replicas[0].port}", replication=1, refresh_s=0.2) as client:
        assert isinstance(client, ClusterKVClient)
        assert client.members() == (replicas[0].target,)
        client.put(prefix.ns, prefix.items())
        assert client.lookup(prefix.ns, prefix.keys, LAYERS) == 6
        assert prefix.wrong_blobs(client, 6) == 0
    with KVClient(replicas[0].target) as plain:
        assert plain.lookup(prefix.ns, prefix.keys, LAYERS) == 6


def test_endpoints_that_are_not_kvstore_are_refused(replicas: list[ServerProcess]) -> None:
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        good = replicas[0].target
        with pytest.raises(
            NotAKVStore, match=f"127.0.0.1:{web.server_address[1]} is not a kvstore server.*gRPC"
        ):
            connect(f"{good},127.0.0.1:{web.server_address[1]}")
        with pytest.raises(NotAKVStore, match="did not answer"):
            connect(f"{good},127.0.0.1:{silent.getsockname()[1]}", probe_timeout_s=0.5)
    finally:
        web.shutdown()
        silent.close()
    # a replica that is not up yet is no error: it costs misses until it answers
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    down = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    prefix = Prefix("t/m/down", seed=3, chunks=8)
    with connect(f"{replicas[0].target},{down}") as client:
        with pytest.raises(Unavailable, match=f"{down}.*1 of 2 ready"):
            client.wait_ready(timeout_s=0.5)
        client.put(prefix.ns, prefix.items())
        assert client.lookup(prefix.ns, prefix.keys, LAYERS) == 8
        assert prefix.wrong_blobs(client, 8) == 0
        assert client.replica_counters()[down]["failures"] >= 1


def test_sigkill_a_replica_under_mixed_load(replicas: list[ServerProcess], tmp_path: Path) -> None:
    target = target_of(replicas)
    victim = replicas[1]
    stored = [Prefix("t/m/r2", seed=100 + i, chunks=8) for i in range(24)]
    single = [Prefix("t/m/r1", seed=200 + i, chunks=8) for i in range(24)]
    with connect(target) as c2, connect(target, replication=1) as c1:
        for p in stored:
            c2.put(p.ns, p.items())
        for p in single:
            c1.put(p.ns, p.items())
    stop = threading.Event()
    errors: list[BaseException] = []
    tally = {"wrong": 0, "reads": 0, "r2_short": 0, "r1_short": 0, "puts": 0}
    written: list[Prefix] = []
    lock = threading.Lock()

    def reader(prefixes: list[Prefix], replication: int, short: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            with connect(target, replication=replication) as client:
                while not stop.is_set():
                    p = rng.choice(prefixes)
                    n = client.lookup(p.ns, p.keys, LAYERS)
                    try:
                        wrong = p.wrong_blobs(client, n) if n else 0
                    except NotFound:
                        # R=1 only: the one owner died between Lookup and Get. The chunk is a miss
                        # the worker recomputes (workers.prefill does); with R=2 this must not happen.
                        if replication != 1:
                            raise
                        wrong, n = 0, -1
                    with lock:
                        tally["reads"] += 1
                        tally["wrong"] += wrong
                        tally[short] += n < len(p.keys)
        except BaseException as exc:  # any exception is an error surfaced to a worker
            errors.append(exc)

    def writer() -> None:
        try:
            with connect(target) as client:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    p = Prefix("t/m/new", seed=1000 + i, chunks=4)
                    client.put(p.ns, p.items())
                    with lock:
                        tally["puts"] += 1
                        written.append(p)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=reader, args=(stored, 2, "r2_short", 1)),
        threading.Thread(target=reader, args=(single, 1, "r1_short", 2)),
        threading.Thread(target=writer),
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)  # load before the crash
    victim.kill()
    time.sleep(2.5)  # load while it is down
    port = victim.port
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert tally["wrong"] == 0, tally
    assert tally["reads"] > 20 and tally["puts"] > 5, tally
    assert tally["r2_short"] == 0, tally  # R=2: every chunk had a live owner
    assert tally["r1_short"] > 0, tally  # R=1: the victim's chunks were misses (not errors)

    with connect(target) as client:  # data with R=2 still served, whole, with one replica gone
        for p in stored + written:
            assert client.lookup(p.ns, p.keys, LAYERS) == len(p.keys)
            assert p.wrong_blobs(client, len(p.keys)) == 0
        assert client.replica_counters()[victim.target]["failures"] >= 1

    replicas[1] = start(tmp_path, port)  # restart (empty: RAM only) on the same port: it rejoins
    with connect(target) as client:
        fresh = Prefix("t/m/after", seed=5, chunks=16)
        client.put(fresh.ns, fresh.items())
        owned = [k for k in fresh.keys if replicas[1].target in placement.owners(k, client.members(), 2)]
        assert owned
        for k in owned:
            assert replicas[1].target in holders(replicas, fresh.ns, k)
        assert client.lookup(fresh.ns, fresh.keys, LAYERS) == 16
        assert client.replica_counters()[replicas[1].target]["blobs_put"] == len(owned) * LAYERS


def test_restarted_replica_rejoins_a_long_lived_client(replicas: list[ServerProcess], tmp_path: Path) -> None:
    with connect(target_of(replicas), replication=1) as client:
        victim = replicas[2]
        victim.kill()
        p = Prefix("t/m/rejoin", seed=7, chunks=48)
        client.put(p.ns, p.items())  # the victim's chunks are dropped: no error
        lost = [k for k in p.keys if placement.owners(k, client.members(), 1) == [victim.target]]
        assert lost  # ~1/3 of 48 chunks; none would take a 1e-8 chance
        assert client.replica_counters()[victim.target]["puts_dropped"] >= len(lost) * LAYERS
        replicas[2] = start(tmp_path, victim.port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # after down_s the client tries it again
            client.put(p.ns, p.items())
            if client.lookup(p.ns, p.keys, LAYERS) == len(p.keys):
                break
            time.sleep(0.2)
        assert client.lookup(p.ns, p.keys, LAYERS) == len(p.keys)
        assert p.wrong_blobs(client, len(p.keys)) == 0


def _hit_rate(client: ClusterKVClient, prefixes: list[Prefix]) -> float:
    return sum(client.lookup(p.ns, p.keys, LAYERS) for p in prefixes) / sum(len(p.keys) for p in prefixes)


def test_adding_a_replica_keeps_the_hit_rate_in_the_grace_window(
    replicas: list[ServerProcess], tmp_path: Path
) -> None:
    listed = [p.target for p in replicas]

    def resolver(host: str, port: int) -> list[str]:
        return list(listed)

    with_grace = DnsMembership("svc", 1, resolver=resolver, grace_s=60, background=False)
    no_grace = DnsMembership("svc", 1, resolver=resolver, grace_s=0, background=False)
    prefixes = [Prefix("t/m/grow", seed=300 + i, chunks=8) for i in range(30)]
    with (
        ClusterKVClient(with_grace, replication=1) as client,
        ClusterKVClient(no_grace, replication=1) as bare,
    ):
        client.wait_ready()
        bare.wait_ready()
        for p in prefixes:
            client.put(p.ns, p.items())
        before = _hit_rate(client, prefixes)
        assert before == 1.0
        replicas.append(start(tmp_path))
        listed.append(replicas[-1].target)
        assert with_grace.refresh() and no_grace.refresh()
        assert len(client.members()) == 4
        client.wait_ready()
        bare.wait_ready()
        without = _hit_rate(bare, prefixes)  # first: the grace client's reads repair the new owner
        after = _hit_rate(client, prefixes)
        assert before - after <= 0.05, (before, after)
        assert before - without > 0.05, (before, without)  # the grace window is what keeps the hits
        assert sum(p.wrong_blobs(client, len(p.keys)) for p in prefixes) == 0
        # the chunks read in the grace window were copied to their new owner: hits without it too
        assert client.drain_repairs(timeout_s=30)
        assert _hit_rate(bare, prefixes) == 1.0
        assert client.replica_counters()[listed[-1]]["chunks_repaired"] > 0
        # new writes fill the new replica
        p = Prefix("t/m/grow", seed=999, chunks=64)
        client.put(p.ns, p.items())
        owned = [k for k in p.keys if placement.owners(k, client.members(), 1) == [listed[-1]]]
        assert owned  # ~1/4 of 64; none would take a 1e-8 chance
        assert client.replica_counters()[listed[-1]]["blobs_put"] == len(owned) * LAYERS


def test_membership_change_keeps_in_flight_calls(replicas: list[ServerProcess]) -> None:
    listed = [p.target for p in replicas]
    membership = DnsMembership(
        "svc", 1, resolver=lambda host, port: list(listed), grace_s=60, background=False
    )
    prefix = Prefix("t/m/inflight", seed=21, chunks=24)
    with ClusterKVClient(membership, replication=2, write_ack="one") as client:
        client.wait_ready()
        client.put(prefix.ns, prefix.items())
        client.drain()  # write_ack="one": wait for the second copies before reading them back
        stream = client.get_layers(prefix.ns, prefix.keys, 0, LAYERS)
        layer, first = next(stream)
        listed.remove(replicas[2].target)  # the Service drops a pod while a Get is in flight
        assert membership.refresh() and len(client.members()) == 2
        got = {layer: first, **dict(stream)}
        assert sorted(got) == list(range(LAYERS))
        assert all(
            bytes(b) == prefix.blobs[k, layer]
            for layer, blobs in got.items()
            for k, b in zip(prefix.keys, blobs, strict=True)
        )
        # in the grace window the previous owners (the dropped pod included) still answer
        assert client.lookup(prefix.ns, prefix.keys, LAYERS) == 24


def test_async_cluster_client(replicas: list[ServerProcess]) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    down = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    target = f"{target_of(replicas)},{down}"
    prefix = Prefix("t/m/aio", seed=9, chunks=20)

    async def items() -> object:
        for item in prefix.items():
            yield item

    async def run() -> dict[str, dict[str, int]]:
        client = await connect_async(target, write_ack="one")
        assert isinstance(client, AsyncClusterKVClient)
        async with client:
            result = await client.put(prefix.ns, items())
            assert result.num_stored == 20 * LAYERS
            await client.drain()  # the second copies (write_ack="one") have landed
            assert await client.lookup(prefix.ns, prefix.keys, LAYERS) == 20
            wrong = 0
            async for layer, blobs in client.get_layers(prefix.ns, prefix.keys, 0, LAYERS):
                wrong += sum(
                    bytes(b) != prefix.blobs[k, layer] for k, b in zip(prefix.keys, blobs, strict=True)
                )
            assert wrong == 0
            assert (await client.stats()).tiers[0].objects >= 20 * LAYERS
            deleted = await client.delete(prefix.ns, prefix.keys[:1])  # the server searches its tiers
            deleted += await client.delete(prefix.ns, prefix.keys[1:2], num_layers=LAYERS)  # by address
            assert deleted >= 2
            assert await client.lookup(prefix.ns, prefix.keys, LAYERS) == 0
            return client.replica_counters()

    counters = asyncio.run(run())
    assert counters[down]["failures"] >= 1
    with connect(target) as sync_client:  # the same keyspace for the blocking client
        assert sync_client.lookup(prefix.ns, prefix.keys[2:], LAYERS) == 18


def test_async_client_serves_through_a_killed_replica(replicas: list[ServerProcess]) -> None:
    prefix = Prefix("t/m/aio-kill", seed=13, chunks=24)
    target = target_of(replicas)

    async def run() -> tuple[str, int, int, dict[str, dict[str, int]]]:
        client = await connect_async(target)
        async with client:
            await client.put(prefix.ns, prefix.items())
            # kill a replica the Get would read from: one replica gone, with R=2 every chunk still
            # has a live owner, and the client must find it
            plan = client.cluster.plan_get(prefix.keys, range(24), client.cluster.view(), {})
            victim = next(p for p in replicas if p.target in plan)
            victim.kill()
            present = await client.lookup(prefix.ns, prefix.keys, LAYERS)
            wrong = 0
            async for layer, blobs in client.get_layers(prefix.ns, prefix.keys, 0, LAYERS):
                wrong += sum(
                    bytes(b) != prefix.blobs[k, layer] for k, b in zip(prefix.keys, blobs, strict=True)
                )
            return victim.target, present, wrong, client.replica_counters()

    victim, present, wrong, counters = asyncio.run(run())
    assert (present, wrong) == (24, 0)
    assert counters[victim]["failures"] >= 1 and counters[victim]["blobs_got"] == 0
    assert sum(c["blobs_got"] for c in counters.values()) == 24 * LAYERS


def test_cluster_stats_cli(replicas: list[ServerProcess], capsys: pytest.CaptureFixture[str]) -> None:
    prefix = Prefix("t/m/stats", seed=11, chunks=10)
    target = target_of(replicas)
    with connect(target) as client:
        client.put(prefix.ns, prefix.items())
    assert cli_main(["stats", "--target", target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(r["target"] for r in data["replicas"]) == sorted(p.target for p in replicas)
    objects = [sum(t["objects"] for t in r["tiers"] if t["name"] == "memory") for r in data["replicas"]]
    assert sum(objects) == 2 * 10 * LAYERS  # R=2 copies, spread over the three
    assert all(o > 0 for o in objects)
    assert data["totals"]["tiers"][0]["objects"] == sum(objects)
    assert cli_main(["stats", "--target", target]) == 0
    table = capsys.readouterr().out
    assert "totals" in table and all(p.target in table for p in replicas)
    assert cli_main(["stats", "--target", f"dns:///localhost:{replicas[1].port}", "--json"]) == 0
    assert [r["target"] for r in json.loads(capsys.readouterr().out)["replicas"]] == [replicas[1].target]
    assert cli_main(["stats", "--target", f"{target},{replicas[0].target}"]) == 2
    assert "more than once" in capsys.readouterr().err


def test_durable_ack_is_asked_of_every_owner(replicas: list[ServerProcess]) -> None:
    # RAM-only replicas: every owner refuses a durable Put (UNAVAILABLE, nothing stored), so the cluster
    # put reports nothing stored and nothing durable; the same items with ack="memory" are stored.
    prefix = Prefix("t/m/durable", seed=7, chunks=3)
    with connect(target_of(replicas)) as client:
        refused = client.put(prefix.ns, prefix.items(), ack="durable")
        assert (refused.num_stored, refused.durable) == (0, False)
        assert all(holders(replicas, prefix.ns, k) == set() for k in prefix.keys)
        stored = client.put(prefix.ns, prefix.items(), ack="memory")
        assert stored.num_stored == 3 * LAYERS and not stored.durable and stored.tiers == ("memory",)
        assert prefix.wrong_blobs(client, 3) == 0


@pytest.mark.parametrize("aio", [False, True], ids=["blocking", "asyncio"])
def test_a_replica_killed_under_load_and_back_empty_gets_its_copies_back(tmp_path: Path, aio: bool) -> None:
    # Issue 24 (4): before, a replica back empty answered "absent" for its chunks and Lookup stopped
    # there (prefixes looked up short, through any client, for good). Now a fresh client finds every
    # acknowledged prefix whole, and the clients' repairs put every copy back, within 30 s.
    out = run_replica_repair(lambda port: start(tmp_path, port), aio=aio, seed=3 if aio else 4)
    assert out["caller_errors"] == 0, out["errors"]
    assert out["wrong_blobs"] == 0, out
    assert out["reads"] > 10 and out["puts"] > 3, out
    # through a fresh client, from its first pass on (it starts as the replica is back), within 30 s
    assert out["fresh_client_short_per_pass"][0] == 0, out
    assert out["lookup_whole_after_return_s"] is not None and out["lookup_whole_after_return_s"] <= 30, out
    assert out["copies_whole_after_return_s"] is not None, out  # R copies of every acked chunk (60 s)
    assert out["chunks_owed"] > 0 and out["chunks_repaired"] >= out["chunks_owed"], out
    assert out["bytes_repaired"] >= out["bytes_owed"], out


def test_one_server_under_two_spellings_is_refused(replicas: list[ServerProcess]) -> None:
    port = replicas[0].port
    with pytest.raises(InvalidTarget, match=f"127.0.0.1:{port} and localhost:{port} are the same server"):
        connect(f"127.0.0.1:{port},localhost:{port},{replicas[1].target}")
    assert cli_main(["stats", "--target", f"127.0.0.1:{port},localhost:{port}"]) == 2
