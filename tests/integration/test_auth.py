"""Bearer tokens, tenant isolation and TLS over real gRPC.

A tenant reaches only its own namespaces, and cannot even learn whether another
tenant's prefix exists: every answer about a foreign namespace (Lookup, Get,
Delete, Put) is the same PERMISSION_DENIED, byte for byte, whether or not data
is stored there. TLS and mTLS use certificates generated per test run
(kvstore.testing.certs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import integrity
from kvstore.auth import Authenticator, bearer_metadata, channel_credentials, server_credentials
from kvstore.errors import PermissionDenied, Unauthenticated
from kvstore.keys import Namespace
from kvstore.server import ServerHandle, serve
from kvstore.testing.certs import TestPKI, generate_test_pki
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.fixtures.store import committed, store_config, wait_serving
from transfer.errors import PermissionDenied as ClientPermissionDenied
from transfer.errors import Unauthenticated as ClientUnauthenticated
from transfer.errors import Unavailable
from transfer.rpc.client import KVClient

TOKENS = {"token-alice": "alice", "token-bob": "bob"}
NS_A = "alice/m/p"
NS_B = "bob/m/p"
C = grpc.StatusCode


def _code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
        return C.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def _put(
    stub: pb_grpc.KVStoreStub, ns: str, key: bytes, token: str | None, blob: bytes | None = None
) -> None:
    blob = blob or integrity.seal(os.urandom(256))
    stub.Put(
        committed([pb.PutRequest(namespace=ns, key=key, layer=0, num_layers=1, blob=blob)]),
        timeout=10,
        metadata=bearer_metadata(token) if token else None,
    )


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[ServerHandle]:
    handle = serve(store_config(tmp_path, **{"auth.tokens": TOKENS}))
    try:
        yield handle
    finally:
        handle.stop(grace=0)


@pytest.fixture
def stub(auth_server: ServerHandle) -> Iterator[pb_grpc.KVStoreStub]:
    with grpc.insecure_channel(auth_server.target) as channel:
        yield pb_grpc.KVStoreStub(channel)


# ---------------------------------------------------------------- unit: the Authenticator itself


def test_authenticator_maps_tokens_to_tenants_and_says_what_to_send() -> None:
    auth = Authenticator(TOKENS)
    assert auth.enabled
    assert auth.tenant_of([("authorization", "Bearer token-alice")]) == "alice"
    assert auth.tenant_of([("authorization", b"bearer token-bob")]) == "bob"
    for metadata in (
        [],
        [("authorization", "Bearer nope")],
        [("authorization", "Basic token-alice")],
        [("authorization", "Bearer")],
        [("x-token", "token-alice")],
    ):
        with pytest.raises(Unauthenticated, match="authorization: Bearer <token>"):
            auth.tenant_of(metadata)
    auth.authorize("alice", Namespace.parse(NS_A))
    with pytest.raises(PermissionDenied, match="another tenant"):
        auth.authorize("alice", Namespace.parse(NS_B))
    off = Authenticator({})
    assert not off.enabled and off.tenant_of([]) is None
    off.authorize(None, Namespace.parse(NS_B))


def test_authenticator_rejects_unusable_config() -> None:
    with pytest.raises(ValueError):
        Authenticator({"has space": "alice"})
    with pytest.raises(ValueError):
        Authenticator({"tok": "not/a/tenant"})


# ---------------------------------------------------------------- tokens over gRPC


def test_missing_or_unknown_token_is_unauthenticated_on_every_rpc(stub: pb_grpc.KVStoreStub) -> None:
    key = os.urandom(32)
    calls = {
        "Lookup": lambda md: stub.Lookup(
            pb.LookupRequest(namespace=NS_A, keys=[key], num_layers=1), metadata=md
        ),
        "Put": lambda md: stub.Put(
            committed(
                [pb.PutRequest(namespace=NS_A, key=key, layer=0, num_layers=1, blob=integrity.seal(b"x"))]
            ),
            metadata=md,
        ),
        "Get": lambda md: list(
            stub.Get(pb.GetRequest(namespace=NS_A, keys=[key], layer_start=0, layer_end=1), metadata=md)
        ),
        "Delete": lambda md: stub.Delete(pb.DeleteRequest(namespace=NS_A, keys=[key]), metadata=md),
        "Stats": lambda md: stub.Stats(pb.StatsRequest(), metadata=md),
    }
    for name, call in calls.items():
        for md in (None, bearer_metadata("token-mallory"), [("authorization", "token-alice")]):
            code, details = _code(lambda c=call, m=md: c(m))
            assert code is C.UNAUTHENTICATED, (name, md, code, details)
            assert "Bearer" in details, details
    # And the valid token works for the same calls.
    _put(stub, NS_A, key, "token-alice")
    assert (
        stub.Lookup(
            pb.LookupRequest(namespace=NS_A, keys=[key], num_layers=1),
            metadata=bearer_metadata("token-alice"),
        ).num_present
        == 1
    )


def test_tenant_cannot_touch_or_probe_another_tenants_namespace(stub: pb_grpc.KVStoreStub) -> None:
    present, absent = os.urandom(32), os.urandom(32)
    blob = integrity.seal(os.urandom(512))
    _put(stub, NS_B, present, "token-bob", blob)
    alice = bearer_metadata("token-alice")

    def answers(key: bytes) -> list[tuple[grpc.StatusCode, str]]:
        return [
            _code(
                lambda: stub.Lookup(
                    pb.LookupRequest(namespace=NS_B, keys=[key], num_layers=1), metadata=alice
                )
            ),
            _code(
                lambda: list(
                    stub.Get(
                        pb.GetRequest(namespace=NS_B, keys=[key], layer_start=0, layer_end=1), metadata=alice
                    )
                )
            ),
            _code(lambda: stub.Delete(pb.DeleteRequest(namespace=NS_B, keys=[key]), metadata=alice)),
            _code(lambda: _put(stub, NS_B, key, "token-alice")),
        ]

    with_data, without_data = answers(present), answers(absent)
    assert all(code is C.PERMISSION_DENIED for code, _ in with_data), with_data
    # No existence oracle: identical status and message whether bob's prefix exists or not.
    assert with_data == without_data
    # A namespace nobody ever used answers the same too.
    _, never_used = _code(
        lambda: stub.Lookup(
            pb.LookupRequest(namespace="carol/m/p", keys=[present], num_layers=1), metadata=alice
        )
    )
    assert never_used.replace("carol", "bob") == with_data[0][1]
    # Bob's data is untouched by alice's attempts (her Put and Delete were refused).
    got = list(
        stub.Get(
            pb.GetRequest(namespace=NS_B, keys=[present], layer_start=0, layer_end=1),
            metadata=bearer_metadata("token-bob"),
        )
    )
    assert got[0].blob == blob


def test_client_library_carries_the_token(auth_server: ServerHandle) -> None:
    key = os.urandom(32)
    blob = integrity.seal(os.urandom(300))
    with KVClient(auth_server.target, token="token-alice") as alice:
        alice.put(NS_A, [(key, 0, 1, blob)])
        assert alice.lookup(NS_A, [key], 1) == 1
        assert [b for _, part in alice.get_layers(NS_A, [key], 0, 1) for b in part] == [blob]
        with pytest.raises(ClientPermissionDenied):
            alice.lookup(NS_B, [key], 1)
    with KVClient(auth_server.target) as anonymous, pytest.raises(ClientUnauthenticated):
        anonymous.lookup(NS_A, [key], 1)


def test_token_comparison_is_constant_work_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured token is compared on every call (no early exit on a match)."""
    import hmac

    calls: list[int] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return original(a, b)

    auth = Authenticator({f"tok-{i}": f"t{i}" for i in range(10)})
    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token in ("tok-0", "tok-9", "nope"):
        calls.clear()
        with contextlib.suppress(Unauthenticated):
            auth.tenant_of([("authorization", f"Bearer {token}")])
        assert len(calls) == 10


# ---------------------------------------------------------------- TLS and mTLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return generate_test_pki(tmp_path_factory.mktemp("pki"))


def _tls_server(tmp_path: Path, pki: TestPKI, mtls: bool) -> ServerHandle:
    overrides = {
        "server.host": "127.0.0.1",
        "auth.tokens": TOKENS,
        "auth.tls_cert": pki.server_cert,
        "auth.tls_key": pki.server_key,
    }
    if mtls:
        overrides["auth.tls_client_ca"] = pki.ca_cert
    return serve(store_config(tmp_path, **overrides))


def _stats_code(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
        if credentials
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = pb_grpc.KVStoreStub(channel)
        code, _ = _code(
            lambda: stub.Stats(pb.StatsRequest(), timeout=5, metadata=bearer_metadata("token-alice"))
        )
        return code


def test_tls_server_serves_tls_clients_only(tmp_path: Path, pki: TestPKI) -> None:
    handle = _tls_server(tmp_path, pki, mtls=False)
    try:
        wait_serving(handle.target, credentials=channel_credentials(pki.ca_cert))
        assert _stats_code(handle.target, channel_credentials(pki.ca_cert)) is C.OK
        assert _stats_code(handle.target, None) is C.UNAVAILABLE  # plaintext cannot talk to it
        assert _stats_code(handle.target, channel_credentials(pki.rogue_ca_cert)) is C.UNAVAILABLE  # wrong CA
        with KVClient(
            handle.target, token="token-alice", tls_root_cert=pki.ca_cert, tls_server_name="localhost"
        ) as client:
            key, blob = os.urandom(32), integrity.seal(b"over tls")
            client.put(NS_A, [(key, 0, 1, blob)])
            assert client.lookup(NS_A, [key], 1) == 1
    finally:
        handle.stop(grace=0)


def test_mtls_requires_a_client_certificate_from_the_ca(tmp_path: Path, pki: TestPKI) -> None:
    handle = _tls_server(tmp_path, pki, mtls=True)
    try:
        good = channel_credentials(pki.ca_cert, pki.client_cert, pki.client_key)
        wait_serving(handle.target, credentials=good)
        assert _stats_code(handle.target, good) is C.OK
        assert _stats_code(handle.target, channel_credentials(pki.ca_cert)) is C.UNAVAILABLE  # no cert
        rogue = channel_credentials(pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key)
        assert _stats_code(handle.target, rogue) is C.UNAVAILABLE  # cert from another CA
        with KVClient(
            handle.target,
            token="token-alice",
            tls_root_cert=pki.ca_cert,
            tls_client_cert=pki.client_cert,
            tls_client_key=pki.client_key,
            tls_server_name="localhost",
        ) as client:
            assert client.lookup(NS_A, [os.urandom(32)], 1) == 0
        with (
            KVClient(
                handle.target,
                token="token-alice",
                tls_root_cert=pki.ca_cert,
                tls_server_name="localhost",
                timeout_s=3.0,
            ) as no_cert,
            pytest.raises(Unavailable),
        ):
            no_cert.lookup(NS_A, [os.urandom(32)], 1)
    finally:
        handle.stop(grace=0)


def test_tls_config_errors_are_caught_at_startup(pki: TestPKI) -> None:
    from types import SimpleNamespace

    assert server_credentials(SimpleNamespace(tls_cert=None, tls_key=None, tls_client_ca=None)) is None
    with pytest.raises(ValueError, match="together"):
        server_credentials(SimpleNamespace(tls_cert=pki.server_cert, tls_key=None, tls_client_ca=None))
    with pytest.raises(ValueError, match="mTLS"):
        server_credentials(SimpleNamespace(tls_cert=None, tls_key=None, tls_client_ca=pki.ca_cert))
    with pytest.raises(ValueError, match="cannot read"):
        server_credentials(
            SimpleNamespace(tls_cert="/nonexistent.pem", tls_key=pki.server_key, tls_client_ca=None)
        )
    with pytest.raises(ValueError, match="together"):
        channel_credentials(pki.ca_cert, client_cert=pki.client_cert)
