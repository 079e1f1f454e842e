"""The transfer client against a real kvstore server over loopback gRPC.

Covers: round trip of real SmolLM2 KV (lossless profile, bit-exact), lazily
batched Put streams, layer-ordered Get, status-code mapping (NOT_FOUND,
INVALID_ARGUMENT from both sides of the wire, DATA_LOSS from the server and
from bytes damaged in transit), auth, retries only for UNAVAILABLE, and parity
of the asyncio client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from kvstore import integrity
from kvstore.backends.base import BlobKey
from kvstore.keys import chunk_keys, model_fingerprint
from kvstore.retry import Backoff
from kvstore.server import serve
from tests.fixtures.store import make_blob, store_config
from transfer import errors
from transfer.rpc.aio_client import AsyncKVClient
from transfer.rpc.client import KVClient, RetryPolicy

NS = "tenant-a/test-model/raw"


class CountingBackoff(Backoff):
    """Counts how often a retry was scheduled; optionally runs a hook before the first one."""

    def __init__(self, on_first: Any = None, delay_s: float = 0.01) -> None:
        self.calls = 0
        self._on_first = on_first
        self._delay_s = delay_s

    def compute(self, failures: int) -> float:
        self.calls += 1
        if self.calls == 1 and self._on_first is not None:
            self._on_first()
        return self._delay_s


def _keys(n: int, salt: int = 0) -> list[bytes]:
    return list(chunk_keys(list(range(salt, salt + n * 4)), NS, 4))


def _items(keys: list[bytes], num_layers: int, size: int = 2000) -> Iterator[tuple[bytes, int, int, bytes]]:
    for i, key in enumerate(keys):
        for layer in range(num_layers):
            yield key, layer, num_layers, make_blob(bytes([i, layer]) + bytes(size))


@pytest.fixture
def client(kvstore_server: Any) -> Iterator[KVClient]:
    with KVClient(kvstore_server.target, retry=RetryPolicy(backoff=CountingBackoff(), max_attempts=2)) as c:
        c.wait_ready(10)
        yield c


def test_put_is_lazy_and_batched_get_is_layer_ordered(kvstore_server: Any) -> None:
    keys = _keys(5)
    pulled = []

    def items() -> Iterator[tuple[bytes, int, int, bytes]]:
        for item in _items(keys, 4):
            pulled.append(item[:2])
            yield item

    with KVClient(kvstore_server.target, put_batch_bytes=6000) as c:
        result = c.put(NS, items())
        assert result.num_stored == 20 and len(pulled) == 20
        assert result.num_requests == 7  # 3 blobs of ~2 KB per 6 KB batch
        assert c.lookup(NS, keys, 4) == 5
        assert c.lookup(NS, keys, 5) == 0  # layer 4 stored for none
        layers = list(c.get_layers(NS, keys, 1, 4))
    assert [layer for layer, _ in layers] == [1, 2, 3]
    for layer, blobs in layers:
        assert [integrity.payload_of(b)[:2].tobytes() for b in blobs] == [bytes([i, layer]) for i in range(5)]


def test_packed_and_one_blob_gets_hand_out_the_same_layers(kvstore_server: Any) -> None:
    keys = _keys(6, salt=150)
    with KVClient(kvstore_server.target) as c:
        c.put(NS, _items(keys, 3))
        packed = [(layer, [bytes(b) for b in blobs]) for layer, blobs in c.get_layers(NS, keys, 0, 3)]
    for pack_bytes in (0, 5000):  # one blob per message; two (of ~2 KB) per message
        with KVClient(kvstore_server.target, get_pack_bytes=pack_bytes) as c:
            got = list(c.get_layers(NS, keys, 0, 3))
        assert [(layer, [bytes(b) for b in blobs]) for layer, blobs in got] == packed
        # A blob alone in its message is a view of it (no copy); blobs of a packed message are copied
        # out, so keeping one does not keep the whole message alive.
        assert all(isinstance(b, memoryview if pack_bytes == 0 else bytes) for _, blobs in got for b in blobs)
    assert [len(blobs) for _, blobs in packed] == [6, 6, 6]
    with pytest.raises(ValueError, match="get_pack_bytes"):
        KVClient(kvstore_server.target, get_pack_bytes=-1)
    small = KVClient(kvstore_server.target, max_message_bytes=1 << 20, get_pack_bytes=64 << 20)
    assert small.core.get_pack_bytes == (1 << 20) - (64 << 10)  # never more than it accepts itself
    small.close()


def test_many_keys_are_split_into_windows(kvstore_server: Any) -> None:
    keys = _keys(7, salt=100)
    with KVClient(kvstore_server.target, max_keys_per_request=3) as c:
        c.put(NS, _items(keys[:5], 2))
        assert c.lookup(NS, keys, 2) == 5
        got = list(c.get_layers(NS, keys[:5], 0, 2))
        assert [(layer, len(blobs)) for layer, blobs in got] == [(0, 5), (1, 5)]
        assert got[1][1][4][:2] == bytes([4, 1])
        assert c.delete(NS, keys[:5]) == 5
        assert c.lookup(NS, keys, 2) == 0
        c.put(NS, _items(keys[:5], 2))
        assert c.delete(NS, keys[:4], num_layers=2) == 4  # by address, windowed like the rest
        assert c.lookup(NS, keys[4:], 2) == 1 and c.lookup(NS, keys, 2) == 0
        with pytest.raises(errors.InvalidArgument, match="num_layers"):
            c.delete(NS, keys, num_layers=0)


def test_missing_blob_is_not_found(client: KVClient) -> None:
    keys = _keys(2, salt=200)
    client.put(NS, _items(keys[:1], 2))
    with pytest.raises(errors.NotFound) as info:
        list(client.get_layers(NS, keys, 0, 2))
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert "keys[1] layer 0" in info.value.details  # the server's own message
    assert client.core.retry.backoff.calls == 0


def test_invalid_arguments_are_refused_on_both_sides_and_never_retried(client: KVClient) -> None:
    keys = _keys(1, salt=300)
    with pytest.raises(errors.InvalidArgument, match="32 bytes"):
        client.lookup(NS, [b"short"], 2)  # caught before sending
    with pytest.raises(errors.InvalidArgument, match="namespace"):
        client.get_layers("no-slashes", keys, 0, 1)
    with pytest.raises(errors.InvalidArgument) as info:
        client.lookup(NS, keys, 100_000)  # only the server knows its max_layers
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and "max_layers" in info.value.details
    with pytest.raises(errors.InvalidArgument, match="integrity trailer"):
        client.put(NS, [(keys[0], 0, 1, b"not sealed at all")])
    assert client.lookup(NS, keys, 1) == 0
    assert client.core.retry.backoff.calls == 0


def test_failing_producer_mid_batch_stores_nothing_of_that_batch(client: KVClient) -> None:
    keys = _keys(4, salt=350)

    def items() -> Iterator[tuple[bytes, int, int, bytes]]:
        good = list(_items(keys, 1))
        yield good[0]
        yield good[1]
        yield keys[2], 0, 1, b"unsealed bytes"  # pulled by gRPC's sender thread, not ours

    with pytest.raises(errors.InvalidArgument, match="integrity trailer"):
        client.put(NS, items())
    assert client.lookup(NS, keys, 1) == 0  # the server's Put is all-or-nothing per stream

    def broken() -> Iterator[tuple[bytes, int, int, bytes]]:
        yield from list(_items(keys, 1))[:2]
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        client.put(NS, broken())
    assert client.lookup(NS, keys, 1) == 0

    def broken_at_once() -> Iterator[tuple[bytes, int, int, bytes]]:
        raise RuntimeError("no first item")
        yield  # pragma: no cover - makes this a generator

    with pytest.raises(RuntimeError, match="no first item"):
        client.put(NS, broken_at_once())


def test_async_failing_producer_stores_nothing(kvstore_server: Any) -> None:
    keys = _keys(4, salt=360)

    async def broken() -> Any:
        for item in list(_items(keys, 1))[:3]:
            yield item
        raise RuntimeError("async encoder crashed")

    async def run() -> int:
        async with AsyncKVClient(kvstore_server.target) as c:
            with pytest.raises(RuntimeError, match="async encoder crashed"):
                await c.put(NS, broken())
            return await c.lookup(NS, keys, 1)

    for _ in range(5):  # the abort is deterministic, not a race with gRPC's cancel
        assert asyncio.run(run()) == 0


def test_corrupt_blob_in_every_tier_is_data_loss(kvstore_server: Any, client: KVClient) -> None:
    keys = _keys(1, salt=400)
    client.put(NS, _items(keys, 1))
    bad = bytearray(make_blob(b"payload" * 100))
    bad[3] ^= 0xFF
    for tier in kvstore_server.store.tiers:  # bypass the server's Put check, as bit rot would
        tier.put(BlobKey(NS, keys[0], 0), bytes(bad))
    with pytest.raises(errors.DataLoss) as info:
        list(client.get_layers(NS, keys, 0, 1))
    assert info.value.code is grpc.StatusCode.DATA_LOSS
    assert "checksum" in info.value.details


class _FlipByte(grpc.UnaryStreamClientInterceptor):
    """Damages the blob of one Get message after the server sent it intact."""

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return _Tampered(continuation(details, request), self.layer)


class _Tampered:
    def __init__(self, call: Any, layer: int) -> None:
        self._call = call
        self._layer = layer

    def __iter__(self) -> _Tampered:
        return self

    def __next__(self) -> Any:
        msg = next(self._call)
        if msg.layer == self._layer:
            blob = bytearray(msg.blobs[0] if msg.blobs else msg.blob)  # a packed message: its first blob
            blob[len(blob) // 2] ^= 0x01
            if msg.blobs:
                msg.blobs[0] = bytes(blob)
            else:
                msg.blob = bytes(blob)
        return msg

    def cancel(self) -> bool:
        return self._call.cancel()


@pytest.mark.parametrize("pack_bytes", [0, 1 << 20], ids=["one-blob-messages", "packed"])
def test_blob_damaged_in_transit_is_caught_by_the_client(kvstore_server: Any, pack_bytes: int) -> None:
    keys = _keys(2, salt=500 + pack_bytes % 7)
    with KVClient(kvstore_server.target) as c:
        c.put(NS, _items(keys, 3))
    received = []
    tampering = KVClient(kvstore_server.target, interceptors=[_FlipByte(layer=1)], get_pack_bytes=pack_bytes)
    with tampering as c, pytest.raises(errors.BlobIntegrityError) as info:
        for layer, _ in c.get_layers(NS, keys, 0, 3):
            received.append(layer)
    assert received == [0]  # layer 0 was good; nothing of layer 1 was handed out
    assert info.value.layer == 1 and info.value.key == keys[0]
    assert isinstance(info.value, errors.DataLoss) and info.value.code is grpc.StatusCode.DATA_LOSS


class _Unavailable(grpc.RpcError):
    """What a dropped connection looks like to the client."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (injected)"


class _DropGetAfterFirstLayer(grpc.UnaryStreamClientInterceptor):
    """The first Get stream breaks with UNAVAILABLE once layer 0 was delivered."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.requests.append(request)
        call = continuation(details, request)
        return _BreakAt(call, layer=1) if len(self.requests) == 1 else call


class _BreakAt(_Tampered):
    def __next__(self) -> Any:
        msg = next(self._call)
        if msg.layer == self._layer:
            self._call.cancel()
            raise _Unavailable()
        return msg


def test_get_resumes_at_the_first_missing_layer_after_unavailable(kvstore_server: Any) -> None:
    keys = _keys(3, salt=520)
    dropper = _DropGetAfterFirstLayer()
    with KVClient(
        kvstore_server.target,
        interceptors=[dropper],
        retry=RetryPolicy(backoff=CountingBackoff(), max_attempts=2),
    ) as c:
        c.put(NS, _items(keys, 4))
        got = list(c.get_layers(NS, keys, 0, 4))
    assert [layer for layer, _ in got] == [0, 1, 2, 3]
    assert [b[:2] for b in got[2][1]] == [bytes([i, 2]) for i in range(3)]
    assert [(r.layer_start, r.layer_end) for r in dropper.requests] == [(0, 4), (1, 4)]


class _DropFirstPut(grpc.StreamUnaryClientInterceptor):
    """The first Put stream dies with UNAVAILABLE after two requests left the client."""

    def __init__(self) -> None:
        self.attempts = 0

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        self.attempts += 1
        if self.attempts == 1:
            next(request_iterator), next(request_iterator)
            raise _Unavailable()
        return continuation(details, request_iterator)


def test_put_batch_is_replayed_whole_after_unavailable(kvstore_server: Any) -> None:
    keys = _keys(3, salt=540)
    pulled = []

    def items() -> Iterator[tuple[bytes, int, int, bytes]]:
        for item in _items(keys, 2):
            pulled.append(item[:2])
            yield item

    dropper = _DropFirstPut()
    with KVClient(
        kvstore_server.target,
        interceptors=[dropper],
        retry=RetryPolicy(backoff=CountingBackoff(), max_attempts=2),
    ) as c:
        result = c.put(NS, items())
        assert c.lookup(NS, keys, 2) == 3
    assert dropper.attempts == 2 and result.num_stored == 6
    assert len(pulled) == 6  # replayed from the batch, not pulled twice from the source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unavailable_is_retried_with_backoff_then_raised() -> None:
    backoff = CountingBackoff()
    dead = KVClient(
        f"127.0.0.1:{_free_port()}", timeout_s=2, retry=RetryPolicy(backoff=backoff, max_attempts=3)
    )
    with dead as c, pytest.raises(errors.Unavailable):
        c.lookup(NS, _keys(1), 1)
    assert backoff.calls == 2


def test_retry_succeeds_once_the_server_is_up(tmp_path: Any) -> None:
    port = _free_port()
    handles = []
    backoff = CountingBackoff(
        on_first=lambda: handles.append(serve(store_config(tmp_path, **{"server.port": port}))), delay_s=0.2
    )
    keys = _keys(3, salt=600)
    try:
        with KVClient(
            f"127.0.0.1:{port}", timeout_s=5, retry=RetryPolicy(backoff=backoff, max_attempts=5)
        ) as c:
            result = c.put(NS, _items(keys, 2))  # the first Put stream fails: no server yet
            assert result.num_stored == 6 and backoff.calls >= 1
            assert c.lookup(NS, keys, 2) == 3
    finally:
        for h in handles:
            h.stop(grace=0)


def test_bearer_token_and_tenant_are_enforced(tmp_path: Any) -> None:
    handle = serve(
        store_config(tmp_path, **{"auth.tokens": {"secret-a": "tenant-a", "secret-b": "tenant-b"}})
    )
    keys = _keys(1, salt=700)
    try:
        with KVClient(handle.target, token="secret-a") as c:
            assert c.put(NS, _items(keys, 1)).num_stored == 1
            assert c.lookup(NS, keys, 1) == 1
        with KVClient(handle.target) as c, pytest.raises(errors.Unauthenticated):
            c.lookup(NS, keys, 1)
        with KVClient(handle.target, token="wrong") as c, pytest.raises(errors.Unauthenticated):
            c.lookup(NS, keys, 1)
        with KVClient(handle.target, token="secret-b") as c, pytest.raises(errors.PermissionDenied) as info:
            list(c.get_layers(NS, keys, 0, 1))
        assert info.value.details
    finally:
        handle.stop(grace=0)


def test_mutual_tls_with_bearer_token(tmp_path: Any) -> None:
    from kvstore.testing.certs import generate_test_pki

    pki = generate_test_pki(tmp_path / "pki")
    handle = serve(
        store_config(
            tmp_path,
            **{
                "auth.tls_cert": pki.server_cert,
                "auth.tls_key": pki.server_key,
                "auth.tls_client_ca": pki.ca_cert,
                "auth.tokens": {"secret-a": "tenant-a"},
            },
        )
    )
    target = f"localhost:{handle.port}"
    keys = _keys(2, salt=750)
    try:
        with KVClient(
            target,
            token="secret-a",
            tls_root_cert=pki.ca_cert,
            tls_client_cert=pki.client_cert,
            tls_client_key=pki.client_key,
        ) as c:
            assert c.put(NS, _items(keys, 2)).num_stored == 4
            assert [layer for layer, _ in c.get_layers(NS, keys, 0, 2)] == [0, 1]
        rogue = KVClient(
            target,
            token="secret-a",
            tls_root_cert=pki.ca_cert,
            timeout_s=3,
            tls_client_cert=pki.rogue_client_cert,
            tls_client_key=pki.rogue_client_key,
            retry=RetryPolicy(max_attempts=1),
        )
        with rogue as c, pytest.raises(errors.Unavailable):  # handshake refused: no RPC ever ran
            c.lookup(NS, keys, 2)
    finally:
        handle.stop(grace=0)


def test_async_client_matches_the_sync_client(kvstore_server: Any) -> None:
    keys = _keys(4, salt=800)

    async def agen() -> Any:
        for item in _items(keys, 3):
            yield item

    async def run() -> dict[str, Any]:
        async with AsyncKVClient(kvstore_server.target, put_batch_bytes=5000) as c:
            await c.wait_ready(10)
            out: dict[str, Any] = {"put": await c.put(NS, agen())}
            out["lookup"] = await c.lookup(NS, keys, 3)
            out["layers"] = [(layer, blobs) async for layer, blobs in c.get_layers(NS, keys, 0, 3)]
            out["stats"] = await c.stats()
            with pytest.raises(errors.NotFound):
                async for _ in c.get_layers(NS, keys, 0, 4):
                    pass
            with pytest.raises(errors.InvalidArgument, match="max_layers"):
                await c.lookup(NS, keys, 100_000)

            async def bad() -> Any:
                yield keys[0], 9, 10, make_blob(10)
                yield keys[0], 8, 10, b"unsealed"

            with pytest.raises(errors.InvalidArgument, match="integrity trailer"):
                await c.put(NS, bad())
            assert await c.lookup(NS, keys, 10) == 0
            out["deleted"] = await c.delete(NS, keys[2:3]) + await c.delete(NS, keys[3:], num_layers=3)
            out["after"] = await c.lookup(NS, keys, 3)
            return out

    got = asyncio.run(run())
    assert got["put"].num_stored == 12 and got["put"].num_requests > 1
    assert got["lookup"] == 4
    assert [layer for layer, _ in got["layers"]] == [0, 1, 2]
    for layer, blobs in got["layers"]:
        assert [b[:2] for b in blobs] == [bytes([i, layer]) for i in range(4)]
    with KVClient(kvstore_server.target) as c:
        assert c.lookup(NS, keys, 3) == 2
        assert list(c.get_layers(NS, keys[:2], 0, 3)) == [(layer, b[:2]) for layer, b in got["layers"]]
        assert c.stats().version == got["stats"].version
    assert got["deleted"] == 2 and got["after"] == 2


@pytest.mark.slow
def test_smollm2_kv_round_trips_bit_exact(kvstore_server: Any, smollm2: Any) -> None:
    from transfer.engines.kvio import fetch_prefix, put_context
    from workers.model import cache_to_layers, kv_shape

    model, tokenizer = smollm2
    shape = kv_shape(model)
    ns = f"tenant-a/{model_fingerprint('llama', shape.num_layers, shape.num_kv_heads, shape.head_dim, 'f32')}/lossless"
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :150]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    layers = cache_to_layers(out.cache)
    token_ids = ids[0].tolist()
    with KVClient(kvstore_server.target) as c:
        keys, result = put_context(c, ns, token_ids, layers, "lossless", chunk_tokens=64)
        assert len(keys) == 2 and result.num_stored == 2 * shape.num_layers
        assert c.lookup(ns, keys, shape.num_layers) == 2
        prefix = fetch_prefix(c, ns, token_ids, shape.num_layers, chunk_tokens=64)
    assert prefix.num_chunks == 2 and prefix.num_tokens == 128 and len(prefix.layers) == shape.num_layers
    for (k, v), (k2, v2) in zip(layers, prefix.layers, strict=True):
        assert k2.dtype == k.dtype and torch.equal(k2, k[:, :128]) and torch.equal(v2, v[:, :128])
