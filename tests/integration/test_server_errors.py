"""Every bad input gets its exact status code and an actionable message; the
server keeps serving afterwards and what was stored before stays intact."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import integrity
from kvstore.auth import bearer_metadata
from kvstore.backends.base import BlobKey
from kvstore.backends.disk import DiskBackend
from kvstore.backends.tiered import TieredStore
from kvstore.config import KiB
from kvstore.server import ServerHandle, serve
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc
from tests.fixtures.store import committed, make_blob, store_config

NS = "acme/model-x/fp16"
LAYERS = 4
KEY = bytes(range(32))
CANARY = bytes(range(100, 132))

Stub = kvstore_pb2_grpc.KVStoreStub


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerHandle, Stub, dict[int, bytes]]]:
    """A server with small limits and a canary chunk stored before any bad request."""
    config = store_config(
        tmp_path_factory.mktemp("errors"),
        **{
            "server.max_blob_bytes": 256 * KiB,
            "server.max_message_bytes": 512 * KiB,
            "server.max_layers": 16,
            "server.max_keys_per_request": 8,
            "server.max_put_stream_bytes": 1024 * KiB,
        },
    )
    handle = serve(config)
    channel = grpc.insecure_channel(handle.target)
    stub = kvstore_pb2_grpc.KVStoreStub(channel)
    canary = {layer: make_blob(5000 + layer) for layer in range(LAYERS)}
    stub.Put(committed([put(CANARY, layer, blob) for layer, blob in canary.items()]))
    yield handle, stub, canary
    channel.close()
    handle.stop(grace=0)


def put(key: bytes, layer: int, blob: bytes, num_layers: int = LAYERS, ns: str = NS) -> pb.PutRequest:
    return pb.PutRequest(namespace=ns, key=key, layer=layer, num_layers=num_layers, blob=blob)


def get_all(
    stub: Stub,
    keys: list[bytes],
    start: int = 0,
    end: int = LAYERS,
    ns: str = NS,
    metadata: list[tuple[str, str]] | None = None,
) -> list[pb.GetResponse]:
    return list(
        stub.Get(pb.GetRequest(namespace=ns, keys=keys, layer_start=start, layer_end=end), metadata=metadata)
    )


def corrupt(blob: bytes) -> bytes:
    return bytes([blob[0] ^ 0xFF]) + blob[1:]


def assert_still_serving(stub: Stub, canary: dict[int, bytes]) -> None:
    assert [r.blob for r in get_all(stub, [CANARY])] == [canary[layer] for layer in range(LAYERS)]
    assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=[CANARY], num_layers=LAYERS)).num_present == 1


CASES: list[tuple[str, Callable[[Stub], object], grpc.StatusCode, str]] = [
    (
        "short key in Lookup",
        lambda s: s.Lookup(pb.LookupRequest(namespace=NS, keys=[KEY, KEY, KEY[:31]], num_layers=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "keys[2] is 31 bytes; chunk keys must be exactly 32 bytes",
    ),
    (
        "long key in Get",
        lambda s: get_all(s, [KEY + b"x"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "keys[0] is 33 bytes",
    ),
    (
        "short key in Put",
        lambda s: s.Put(committed([put(KEY, 0, make_blob(10)), put(KEY[:8], 0, make_blob(10))])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "put item 1: key is 8 bytes",
    ),
    (
        "bad namespace",
        lambda s: s.Lookup(pb.LookupRequest(namespace="acme/model", keys=[KEY], num_layers=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid namespace 'acme/model'",
    ),
    (
        "bad namespace in Put",
        lambda s: s.Put(committed([put(KEY, 0, make_blob(10), ns="a b/c/d")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "put item 0: invalid namespace",
    ),
    (
        "bad namespace in Delete",
        lambda s: s.Delete(pb.DeleteRequest(namespace="", keys=[KEY])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid namespace",
    ),
    (
        "layer >= num_layers",
        lambda s: s.Put(committed([put(KEY, 4, make_blob(10))])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layer 4 is out of range for num_layers 4",
    ),
    (
        "num_layers > max_layers in Put",
        lambda s: s.Put(committed([put(KEY, 0, make_blob(10), num_layers=17)])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "num_layers 17 exceeds server.max_layers (16)",
    ),
    (
        "num_layers > max_layers in Lookup",
        lambda s: s.Lookup(pb.LookupRequest(namespace=NS, keys=[KEY], num_layers=17)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "num_layers 17 exceeds server.max_layers (16)",
    ),
    (
        "num_layers 0 in Lookup",
        lambda s: s.Lookup(pb.LookupRequest(namespace=NS, keys=[KEY])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "num_layers must be >= 1",
    ),
    (
        "layer_end > max_layers",
        lambda s: get_all(s, [CANARY], 0, 17),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layer_end 17 exceeds server.max_layers (16)",
    ),
    (
        "empty layer range",
        lambda s: get_all(s, [CANARY], 2, 2),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty layer range [2, 2)",
    ),
    ("Get without keys", lambda s: get_all(s, []), grpc.StatusCode.INVALID_ARGUMENT, "at least one key"),
    (
        "empty Put stream",
        lambda s: s.Put(committed([])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty Put stream",
    ),
    (
        "too many keys",
        lambda s: s.Lookup(pb.LookupRequest(namespace=NS, keys=[KEY] * 9, num_layers=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "too many keys: 9 > server.max_keys_per_request (8)",
    ),
    (
        "blob over max_blob_bytes",
        lambda s: s.Put(committed([put(KEY, 0, make_blob(300 * KiB))])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "exceeds server.max_blob_bytes (262144)",
    ),
    (
        "message over grpc's limit",
        lambda s: s.Put(committed([put(KEY, 0, make_blob(600 * KiB))])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    (
        "Put stream over max_put_stream_bytes",
        lambda s: s.Put(committed([put(KEY, layer % LAYERS, make_blob(200 * KiB)) for layer in range(6)])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "exceeds server.max_put_stream_bytes",
    ),
    (
        "corrupt blob",
        lambda s: s.Put(committed([put(KEY, 0, corrupt(make_blob(1000)))])),
        grpc.StatusCode.DATA_LOSS,
        "checksum mismatch on put (put item 0, layer 0",
    ),
    (
        "blob shorter than its trailer",
        lambda s: s.Put(committed([put(KEY, 0, b"abc")])),
        grpc.StatusCode.DATA_LOSS,
        "re-encode and retry",
    ),
    (
        "missing blob",
        lambda s: get_all(s, [CANARY, KEY], 0, LAYERS),
        grpc.StatusCode.NOT_FOUND,
        "no blob for keys[1] layer 0",
    ),
    (
        "missing layer",
        lambda s: get_all(s, [CANARY], 0, LAYERS + 1),
        grpc.StatusCode.NOT_FOUND,
        f"no blob for keys[0] layer {LAYERS}",
    ),
]


@pytest.mark.parametrize(("call", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(
    limited: tuple[ServerHandle, Stub, dict[int, bytes]],
    call: Callable[[Stub], object],
    code: grpc.StatusCode,
    message: str,
) -> None:
    handle, stub, canary = limited
    with pytest.raises(grpc.RpcError) as err:
        call(stub)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    assert_still_serving(stub, canary)
    assert (
        stub.Lookup(pb.LookupRequest(namespace=NS, keys=[KEY], num_layers=1)).num_present == 0
    )  # nothing leaked
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or "larger than max" not in message:
        assert f'code="{code.name}"' in handle.metrics.render().decode()


def test_put_is_all_or_nothing_per_stream(limited: tuple[ServerHandle, Stub, dict[int, bytes]]) -> None:
    _, stub, canary = limited
    good = [put(KEY, layer, make_blob(100)) for layer in range(LAYERS)]
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(committed([*good[:3], put(KEY, 3, corrupt(make_blob(100)))]))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "put item 3" in err.value.details()
    with pytest.raises(grpc.RpcError):
        get_all(stub, [KEY], 0, 1)  # the three good items before the bad one were not stored
    assert stub.Put(committed(good)).num_stored == LAYERS  # a clean retry goes through
    assert len(get_all(stub, [KEY])) == LAYERS
    stub.Delete(pb.DeleteRequest(namespace=NS, keys=[KEY]))
    assert_still_serving(stub, canary)


def test_corrupt_copies_are_data_loss_or_repaired(
    limited: tuple[ServerHandle, Stub, dict[int, bytes]],
) -> None:
    handle, stub, canary = limited
    key = bytes(range(200, 232))
    good = make_blob(2000)
    stub.Put(committed([put(key, 0, good, num_layers=1)]))
    # Bit rot in RAM only: the disk copy is intact and is served instead.
    handle.store.tier("memory").put(BlobKey(NS, key, 0), corrupt(good))
    assert [r.blob for r in get_all(stub, [key], 0, 1)] == [good]
    # Bit rot in every tier: nothing intact to serve.
    for tier in ("memory", "disk"):
        handle.store.tier(tier).put(BlobKey(NS, key, 0), corrupt(good))
    with pytest.raises(grpc.RpcError) as err:
        get_all(stub, [key], 0, 1)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "failed their checksum" in err.value.details()
    assert_still_serving(stub, canary)


def test_no_tier_taking_a_write_is_unavailable(tmp_path: Path) -> None:
    disk = DiskBackend(path=str(tmp_path / "disk"), max_bytes=1 << 30, fsync="never", segment_bytes=1 << 20)
    handle = serve(store_config(tmp_path), store=TieredStore([disk]))
    try:
        with grpc.insecure_channel(handle.target) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            stub.Put(committed([put(KEY, 0, make_blob(100), num_layers=1)]))
            disk.close()  # the only tier is gone
            with pytest.raises(grpc.RpcError) as err:
                stub.Put(committed([put(CANARY, 0, make_blob(100), num_layers=1)]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no tier accepted the write" in err.value.details()
            assert stub.Stats(pb.StatsRequest()).tiers[0].errors >= 1  # still answering
    finally:
        handle.stop(grace=0)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Stub, ServerHandle]]:
    config = store_config(
        tmp_path,
        **{"auth.tokens": {"tok-acme": "acme", "tok-beta": "beta"}, "quotas.per_tenant": {"acme": 20 * KiB}},
    )
    handle = serve(config)
    with grpc.insecure_channel(handle.target) as channel:
        yield kvstore_pb2_grpc.KVStoreStub(channel), handle
    handle.stop(grace=0)


def test_auth_codes(secured: tuple[Stub, ServerHandle]) -> None:
    stub, _ = secured
    acme, beta = bearer_metadata("tok-acme"), bearer_metadata("tok-beta")
    request = pb.LookupRequest(namespace=NS, keys=[KEY], num_layers=1)
    for metadata, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (bearer_metadata("wrong"), grpc.StatusCode.UNAUTHENTICATED),
        (beta, grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(request, metadata=metadata)
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(committed([put(KEY, 0, make_blob(10))]), metadata=beta)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "tenant 'beta'" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Stats(pb.StatsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Stats(pb.StatsRequest(), metadata=beta).version  # server-wide: any authenticated caller
    assert stub.Put(committed([put(KEY, 0, make_blob(10))]), metadata=acme).num_stored == 1
    assert (
        stub.Lookup(pb.LookupRequest(namespace=NS, keys=[KEY], num_layers=1), metadata=acme).num_present == 1
    )
    with pytest.raises(grpc.RpcError) as err:
        get_all(
            stub, [KEY], 0, 1, ns="beta/model-x/fp16", metadata=acme
        )  # own token, someone else's namespace
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_quota_is_resource_exhausted_and_released_by_delete(secured: tuple[Stub, ServerHandle]) -> None:
    stub, handle = secured
    acme = bearer_metadata("tok-acme")
    stub.Put(committed([put(KEY, layer, make_blob(4 * KiB)) for layer in range(LAYERS)]), metadata=acme)
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(
            committed([put(CANARY, layer, make_blob(4 * KiB)) for layer in range(LAYERS)]), metadata=acme
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its storage quota" in err.value.details()
    assert (
        stub.Lookup(pb.LookupRequest(namespace=NS, keys=[CANARY], num_layers=1), metadata=acme).num_present
        == 0
    )  # refused stream stored nothing
    assert len(get_all(stub, [KEY], metadata=acme)) == LAYERS  # earlier data intact
    assert stub.Delete(pb.DeleteRequest(namespace=NS, keys=[KEY]), metadata=acme).num_deleted == 1
    assert handle.service.quotas.usage("acme") == 0
    stub.Put(committed([put(CANARY, layer, make_blob(4 * KiB)) for layer in range(LAYERS)]), metadata=acme)


def test_integrity_helper_agrees_with_the_server() -> None:
    blob = make_blob(64)
    assert integrity.is_intact(blob) and not integrity.is_intact(corrupt(blob))


def test_a_put_abandoned_midway_stores_nothing(limited: tuple[ServerHandle, Stub, dict[int, bytes]]) -> None:
    handle, stub, canary = limited

    def dying_client() -> Iterator[pb.PutRequest]:
        yield put(KEY, 0, make_blob(1000))
        yield put(KEY, 1, make_blob(1000))
        raise ConnectionError("client crashed mid-stream")

    with pytest.raises(grpc.RpcError) as err:
        stub.Put(dying_client())
    assert err.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
    # The server sees the cancel, or a stream that ended without its commit message (gRPC may hand
    # it the cancel as a clean end of stream): either way it stores nothing, deterministically.
    deadline = time.monotonic() + 10
    while not any(
        f'code="{code}",method="Put"' in handle.metrics.render().decode() for code in ("CANCELLED", "ABORTED")
    ):
        assert time.monotonic() < deadline, "server did not record the abandoned Put as CANCELLED or ABORTED"
        time.sleep(0.02)
    assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=[KEY], num_layers=1)).num_present == 0
    assert_still_serving(stub, canary)


@pytest.mark.parametrize(
    "method,kind",
    [
        ("Lookup", "unary_unary"),
        ("Delete", "unary_unary"),
        ("Stats", "unary_unary"),
        ("Get", "unary_stream"),
        ("Put", "stream_unary"),
    ],
)
def test_bytes_that_are_no_message_are_invalid_argument(
    limited: tuple[ServerHandle, Stub, dict[int, bytes]], method: str, kind: str
) -> None:
    """A request that does not even parse is the caller's fault, not INTERNAL."""
    handle, stub, canary = limited
    garbage = b"\x0a\xff\xff\xff\xff\x0f" + b"junk"  # field 1, length far past the end
    with grpc.insecure_channel(handle.target) as channel:
        path = f"/kvstore.v1.KVStore/{method}"
        call = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            if kind == "unary_unary":
                call(garbage, timeout=5)
            elif kind == "unary_stream":
                list(call(garbage, timeout=5))
            else:
                call(iter([garbage]), timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"malformed {method}Request" in (err.value.details() or "")
    assert_still_serving(stub, canary)
