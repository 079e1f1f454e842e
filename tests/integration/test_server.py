"""The kvstore gRPC server over a real loopback socket: every RPC, health,
reflection, metrics, and the ``kvstore serve`` / ``kvstore stats`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvstore.keys import Namespace, chunk_keys
from kvstore.server import SERVICE_NAME, ServerHandle, serve
from kvstore.testing.services import free_port
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc
from tests.fixtures.store import REPO_ROOT, committed, make_blob, start_server_process, store_config

NS = "acme/smollm2-L30/fp16"
MiB = 1 << 20
LAYERS = 4


@pytest.fixture
def stub(kvstore_server: ServerHandle) -> Iterator[kvstore_pb2_grpc.KVStoreStub]:
    with grpc.insecure_channel(kvstore_server.target) as channel:
        yield kvstore_pb2_grpc.KVStoreStub(channel)


def put_chunks(
    stub: kvstore_pb2_grpc.KVStoreStub,
    keys: list[bytes],
    layers: range | list[int],
    num_layers: int = LAYERS,
    size: int = 1000,
    ns: str = NS,
) -> dict[tuple[int, int], bytes]:
    blobs = {(i, layer): make_blob(size + i * 10 + layer) for i in range(len(keys)) for layer in layers}
    reply = stub.Put(
        committed(
            [
                pb.PutRequest(namespace=ns, key=keys[i], layer=layer, num_layers=num_layers, blob=b)
                for (i, layer), b in blobs.items()
            ]
        )
    )
    assert reply.num_stored == len(blobs)
    assert reply.bytes_stored == sum(len(b) for b in blobs.values())
    return blobs


def keys_for(n: int, salt: int = 0) -> list[bytes]:
    return chunk_keys(list(range(salt, salt + n * 256)), Namespace.parse(NS))


def test_put_then_get_round_trips_bytes_exactly(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_for(2)
    blobs = put_chunks(stub, keys, range(LAYERS), size=300_000)
    got = {
        (r.key_index, r.layer): r.blob
        for r in stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=LAYERS))
    }
    assert got == blobs


def test_get_streams_in_layer_order(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_for(3)
    put_chunks(stub, keys, range(LAYERS))
    order = [
        (r.key_index, r.layer)
        for r in stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=1, layer_end=LAYERS))
    ]
    assert order == [(k, layer) for layer in range(1, LAYERS) for k in range(3)]


def test_packed_get_sends_the_same_blobs_in_fewer_messages(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_for(5)
    blobs = put_chunks(stub, keys, range(LAYERS))  # 1,000-1,070 bytes each

    def get(pack_bytes: int, **kw: int) -> list[pb.GetResponse]:
        return list(
            stub.Get(
                pb.GetRequest(
                    namespace=NS, keys=keys, layer_start=0, layer_end=LAYERS, pack_bytes=pack_bytes
                ),
                **kw,
            )
        )

    one_by_one = get(0)
    assert len(one_by_one) == 5 * LAYERS and all(not r.blobs for r in one_by_one)
    for pack_bytes, per_layer in ((1 << 20, [5]), (2200, [2, 2, 1]), (1, [1] * 5)):
        messages = get(pack_bytes)
        assert [len(r.blobs) for r in messages] == per_layer * LAYERS  # packs close at every layer
        got = {(r.key_index + i, r.layer): b for r in messages for i, b in enumerate(r.blobs)}
        assert got == blobs and all(not r.blob for r in messages)


def test_packed_get_never_exceeds_the_servers_message_limit(tmp_path: Path) -> None:
    server = start_server_process(
        ["--no-disk", "--max-blob-bytes", "1MiB", "--max-message-bytes", "2MiB"], workdir=tmp_path
    )
    try:
        keys = keys_for(6)
        with grpc.insecure_channel(
            server.target,
            options=[("grpc.max_receive_message_length", 2 << 20), ("grpc.max_send_message_length", 2 << 20)],
        ) as ch:
            stub = kvstore_pb2_grpc.KVStoreStub(ch)
            for key in keys:  # one Put per key: 2 x 900 KiB would not fit one 2 MiB Put message limit anyway
                put_chunks(stub, [key], [0], num_layers=1, size=900 * 1024)
            messages = list(
                stub.Get(
                    pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=1, pack_bytes=2**32 - 1)
                )
            )  # asks for everything in one
        assert [len(r.blobs) for r in messages] == [2, 2, 2]  # 2 MiB - 64 KiB holds two 900 KiB blobs
        assert all(r.ByteSize() <= 2 << 20 for r in messages)
    finally:
        server.kill()


def test_packed_get_ends_with_not_found_after_the_complete_layers(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_for(3, salt=77)
    put_chunks(stub, keys, range(2))
    put_chunks(stub, keys[:2], [2])  # layer 2 lacks keys[2]
    call = stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=3, pack_bytes=1 << 20))
    layers = []
    with pytest.raises(grpc.RpcError) as info:
        for r in call:
            layers.append((r.layer, len(r.blobs)))
    assert layers == [(0, 3), (1, 3)]
    assert info.value.code() is grpc.StatusCode.NOT_FOUND and "keys[2] layer 2" in info.value.details()


def test_lookup_counts_the_leading_chunks_with_all_layers(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_for(4)
    put_chunks(stub, keys[:2], range(LAYERS))
    put_chunks(stub, [keys[2]], range(LAYERS - 1))  # chunk 2 lacks its last layer; chunk 3 absent

    def lookup(ks: list[bytes], num_layers: int) -> pb.LookupResponse:
        return stub.Lookup(pb.LookupRequest(namespace=NS, keys=ks, num_layers=num_layers))

    full = lookup(keys, LAYERS)
    assert full.num_present == 2
    assert list(full.tiers) == [pb.TIER_MEMORY, pb.TIER_MEMORY]
    assert lookup(keys, LAYERS - 1).num_present == 3  # fewer layers asked: chunk 2 counts
    assert lookup(keys[1:], LAYERS).num_present == 1
    assert lookup([keys[3], *keys[:2]], LAYERS).num_present == 0  # a prefix, not a set
    assert lookup(keys, LAYERS).num_present == 2
    assert (
        stub.Lookup(
            pb.LookupRequest(namespace="acme/other-model/fp16", keys=keys, num_layers=LAYERS)
        ).num_present
        == 0
    )
    assert lookup([], LAYERS).num_present == 0


def test_delete_removes_every_layer_and_only_those_keys(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_for(2, salt=7)
    blobs = put_chunks(stub, keys, range(LAYERS))
    assert stub.Delete(pb.DeleteRequest(namespace=NS, keys=[keys[0]])).num_deleted == 1
    assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=keys, num_layers=LAYERS)).num_present == 0
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=1)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    rest = [
        r.blob for r in stub.Get(pb.GetRequest(namespace=NS, keys=[keys[1]], layer_start=0, layer_end=LAYERS))
    ]
    assert rest == [blobs[(1, layer)] for layer in range(LAYERS)]
    assert stub.Delete(pb.DeleteRequest(namespace=NS, keys=[keys[0]])).num_deleted == 0  # idempotent


def test_delete_with_num_layers_deletes_those_layers_by_address(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_for(3, salt=11)
    blobs = put_chunks(stub, keys, range(LAYERS))

    def counters() -> dict[str, int]:
        return dict(stub.Stats(pb.StatsRequest()).counters)

    before = counters()
    reply = stub.Delete(pb.DeleteRequest(namespace=NS, keys=[keys[0]], num_layers=LAYERS))
    assert reply.num_deleted == 1
    assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=keys[:1], num_layers=1)).num_present == 0
    assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=keys[1:], num_layers=LAYERS)).num_present == 2
    # Layers [0, 2) only: the rest of the chunk stays, on RAM and disk alike.
    assert stub.Delete(pb.DeleteRequest(namespace=NS, keys=[keys[1]], num_layers=2)).num_deleted == 1
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Get(pb.GetRequest(namespace=NS, keys=[keys[1]], layer_start=1, layer_end=2)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    rest = [
        r.blob for r in stub.Get(pb.GetRequest(namespace=NS, keys=[keys[1]], layer_start=2, layer_end=LAYERS))
    ]
    assert rest == [blobs[(1, 2)], blobs[(1, 3)]]
    after = counters()
    assert after["deletes"] - before.get("deletes", 0) == 2
    assert after.get("deletes_scanned", 0) == before.get("deletes_scanned", 0)  # no tier was listed
    # num_layers 0 (an older client): the server searches the tiers and deletes what is left.
    assert stub.Delete(pb.DeleteRequest(namespace=NS, keys=[keys[1]])).num_deleted == 1
    assert counters()["deletes_scanned"] == before.get("deletes_scanned", 0) + 1
    assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=keys[2:], num_layers=LAYERS)).num_present == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.Delete(pb.DeleteRequest(namespace=NS, keys=[keys[2]], num_layers=1 << 30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_layers" in err.value.details()
    assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=keys[2:], num_layers=LAYERS)).num_present == 1


def test_reads_fall_back_to_disk_when_ram_forgets(
    kvstore_server: ServerHandle, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    keys = keys_for(1, salt=3)
    blobs = put_chunks(stub, keys, range(LAYERS))
    kvstore_server.store.tier("memory").close()  # drop everything held in RAM
    got = [r.blob for r in stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=LAYERS))]
    assert got == [blobs[(0, layer)] for layer in range(LAYERS)]
    reply = stub.Lookup(pb.LookupRequest(namespace=NS, keys=keys, num_layers=LAYERS))
    assert reply.num_present == 1 and list(reply.tiers) == [pb.TIER_MEMORY]  # promoted on the read


def test_stats_report_tiers_and_counters(stub: kvstore_pb2_grpc.KVStoreStub) -> None:
    put_chunks(stub, keys_for(1), range(LAYERS))
    stats = stub.Stats(pb.StatsRequest())
    tiers = {t.name: t for t in stats.tiers}
    assert list(tiers) == ["memory", "disk"]
    assert tiers["memory"].objects == LAYERS and tiers["memory"].bytes > 0 and tiers["memory"].healthy
    assert tiers["disk"].objects == LAYERS
    assert stats.counters["blobs_put"] == LAYERS
    assert stats.version


def test_health_reports_serving(kvstore_server: ServerHandle) -> None:
    with grpc.insecure_channel(kvstore_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(kvstore_server: ServerHandle) -> None:
    with grpc.insecure_channel(kvstore_server.target) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            refl.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
                    ]
                )
            )
        )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # clients can discover the schema


def test_metrics_count_requests_bytes_and_tiers(
    kvstore_server: ServerHandle, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    keys = keys_for(1)
    blobs = put_chunks(stub, keys, range(LAYERS))
    list(stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=LAYERS)))
    with pytest.raises(grpc.RpcError):
        stub.Lookup(pb.LookupRequest(namespace="bad", keys=keys, num_layers=1))
    text = kvstore_server.metrics.render().decode()
    total = sum(len(b) for b in blobs.values())
    assert 'kvstore_requests_total{code="OK",method="Put"} 1.0' in text
    assert 'kvstore_requests_total{code="INVALID_ARGUMENT",method="Lookup"} 1.0' in text
    assert f'kvstore_blob_bytes_total{{direction="in"}} {float(total)}' in text
    assert f'kvstore_blob_bytes_total{{direction="out"}} {float(total)}' in text
    assert 'kvstore_request_duration_seconds_count{method="Get"} 1.0' in text
    assert f'kvstore_tier_objects{{tier="memory"}} {float(LAYERS)}' in text
    assert f'kvstore_tier_hits_total{{tier="memory"}} {float(LAYERS)}' in text
    for name in (
        "kvstore_tier_misses_total",
        "kvstore_tier_bytes",
        "kvstore_tier_evictions_total",
        "kvstore_tier_errors_total",
        "kvstore_integrity_failures_total",
    ):
        assert f'{name}{{tier="disk"}}' in text


def test_metrics_endpoint_serves_prometheus_text(tmp_path: Path) -> None:
    handle = serve(store_config(tmp_path, **{"metrics.port": free_port(), "metrics.host": "127.0.0.1"}))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics.port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert 'kvstore_tier_bytes{tier="memory"}' in body
    finally:
        handle.stop(grace=0)


def test_a_taken_port_is_an_error_not_a_shared_port(kvstore_server: ServerHandle, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{kvstore_server.port}"):
        serve(store_config(tmp_path / "second", **{"server.port": kvstore_server.port}))
    with grpc.insecure_channel(kvstore_server.target) as channel:  # the first one is unaffected
        assert kvstore_pb2_grpc.KVStoreStub(channel).Stats(pb.StatsRequest()).version


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )


def test_serve_subprocess_stats_cli_and_graceful_restart(tmp_path: Path) -> None:
    disk = str(tmp_path / "disk")
    server = start_server_process(["--disk-path", disk, "--memory-bytes", "64MiB"], workdir=tmp_path)
    try:
        keys = keys_for(2)
        with grpc.insecure_channel(server.target) as channel:
            blobs = put_chunks(kvstore_pb2_grpc.KVStoreStub(channel), keys, range(LAYERS))
        table = run_cli("stats", "--target", server.target)
        assert table.returncode == 0, table.stderr
        assert "memory" in table.stdout and "disk" in table.stdout and "blobs_put" in table.stdout
        data = json.loads(run_cli("stats", "--target", server.target, "--json").stdout)
        assert [t["name"] for t in data["tiers"]] == ["memory", "disk"]
        assert data["tiers"][1]["objects"] == 2 * LAYERS and data["counters"]["blobs_put"] == 2 * LAYERS
        port = server.port
        assert server.stop() == 0  # SIGTERM drains and exits cleanly
    finally:
        server.kill()
    # Same port and disk dir: the data written before the restart is served from disk.
    again = start_server_process(["--disk-path", disk, "--port", str(port)], workdir=tmp_path)
    try:
        with grpc.insecure_channel(again.target) as channel:
            got = {
                (r.key_index, r.layer): r.blob
                for r in kvstore_pb2_grpc.KVStoreStub(channel).Get(
                    pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=LAYERS)
                )
            }
        assert got == blobs
    finally:
        again.kill()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_prefault_maps_the_budget_before_serving(tmp_path: Path) -> None:
    plain = start_server_process(["--no-disk", "--memory-bytes", "256MiB"], workdir=tmp_path)
    prefaulted = start_server_process(
        ["--no-disk", "--memory-bytes", "256MiB", "--memory-prefault"], workdir=tmp_path
    )
    try:
        # Ready means prefaulted: the whole budget is resident before the first RPC (a plain server is not).
        assert _rss_bytes(prefaulted.proc.pid) - _rss_bytes(plain.proc.pid) >= 200 * MiB
        keys = keys_for(2)
        with grpc.insecure_channel(prefaulted.target) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            blobs = put_chunks(stub, keys, range(LAYERS), size=MiB)
            got = {
                (r.key_index, r.layer): r.blob
                for r in stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=LAYERS))
            }
        assert got == blobs
    finally:
        plain.kill()
        prefaulted.kill()


def test_stats_cli_reports_an_unreachable_server() -> None:
    result = run_cli("stats", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_serve_rejects_bad_config_with_the_field_name() -> None:
    result = run_cli("serve", "--port", "99999")
    assert result.returncode == 2
    assert "server.port must be a TCP port" in result.stderr


def test_help_has_examples() -> None:
    for command in ("serve", "stats", "bench"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "examples:" in result.stdout, command


def test_a_malformed_put_message_fails_the_rpc_and_nothing_else(
    kvstore_server: ServerHandle, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    keys = keys_for(1)
    blobs = put_chunks(stub, keys, range(LAYERS))
    with grpc.insecure_channel(kvstore_server.target) as channel:
        raw_put = channel.stream_unary(
            "/kvstore.v1.KVStore/Put",
            request_serializer=lambda b: b,
            response_deserializer=pb.PutResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            raw_put(iter([b"\x2a\xff\xff\x03abc"]))  # blob field claiming 65535 bytes, 3 present
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the caller's bytes, not a server fault
    got = [r.blob for r in stub.Get(pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=LAYERS))]
    assert got == [blobs[(0, layer)] for layer in range(LAYERS)]
