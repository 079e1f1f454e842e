"""Who is calling, and may they touch this namespace.

Three independent layers, each optional, configured in ``StoreConfig.auth``:

- **Bearer tokens** map a secret to a tenant. With at least one token configured
  every RPC must carry ``authorization: Bearer <token>`` metadata; a missing or
  unknown token is UNAUTHENTICATED. With none configured, auth is off and every
  caller may use every namespace (a single-tenant or trusted-network deployment).
- **Tenants** are the first part of a namespace (``tenant/model/profile``). An
  authenticated caller may only use namespaces whose tenant part is its own; any
  other is PERMISSION_DENIED *before* any backend is consulted, so the answer is
  the same whether or not the other tenant has data (no existence oracle).
- **TLS** (server certificate) protects tokens and blobs on the wire; **mTLS**
  (a client CA) additionally requires every client to present a certificate
  signed by that CA before any RPC reaches the server code.

The server maps :class:`kvstore.errors.Unauthenticated` and
:class:`kvstore.errors.PermissionDenied` to status codes in one place
(kvstore/server.py); this module never imports grpc status handling.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from kvstore.errors import PermissionDenied, Unauthenticated
from kvstore.keys import Namespace

#: gRPC metadata keys are lower-case on the wire.
AUTHORIZATION_HEADER = "authorization"
_SCHEME = "bearer"


def bearer_metadata(token: str) -> list[tuple[str, str]]:
    """Call metadata carrying ``token``; what clients pass as ``metadata=``."""
    return [(AUTHORIZATION_HEADER, f"Bearer {token}")]


def _digest(token: bytes) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the
    # configured tokens' lengths through its early length check.
    return hashlib.sha256(token).digest()


class Authenticator:
    """Maps bearer tokens to tenants and checks namespace ownership.

    ``tokens`` maps token -> tenant; several tokens may map to one tenant (to
    rotate a token, add the new one, move clients, remove the old one). An empty
    mapping turns auth off.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        entries: list[tuple[bytes, str]] = []
        for token, tenant in tokens.items():
            if not token or token != token.strip() or any(c.isspace() for c in token):
                raise ValueError("auth tokens must be non-empty and contain no whitespace")
            # Validate the tenant with the namespace rules, so a typo in the config
            # fails at startup instead of locking the tenant out at request time.
            try:
                Namespace(tenant, "m", "p")
            except ValueError:
                raise ValueError(f"auth tenant {tenant!r} is not a valid namespace tenant part") from None
            entries.append((_digest(token.encode()), tenant))
        self._entries = tuple(entries)
        self.enabled: bool = bool(entries)

    def tenant_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """The tenant the call's bearer token belongs to; None when auth is off.

        Raises Unauthenticated (enabled only) when the header is missing, malformed
        or names no configured token. Every configured token is compared, in
        constant time, so timing does not reveal how close a guess was.
        """
        if not self.enabled:
            return None
        value = _header(metadata or ())
        if value is None:
            raise Unauthenticated(
                "missing bearer token: send gRPC metadata 'authorization: Bearer <token>' "
                "with a token the operator issued for your tenant"
            )
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != _SCHEME or not token:
            raise Unauthenticated(
                "malformed authorization metadata: expected 'authorization: Bearer <token>'"
            )
        presented = _digest(token.encode("utf-8", "surrogateescape"))
        found: str | None = None
        for digest, tenant in self._entries:  # no early exit: constant work per call
            if hmac.compare_digest(digest, presented):
                found = tenant
        if found is None:
            raise Unauthenticated(
                "unknown bearer token: send 'authorization: Bearer <token>' with a token "
                "the operator issued for your tenant"
            )
        return found

    def authorize(self, tenant: str | None, namespace: Namespace) -> None:
        """Allow ``tenant`` to use ``namespace`` or raise PermissionDenied.

        The message depends only on the caller's tenant and the namespace it sent,
        never on stored data, so it cannot be used to probe another tenant.
        """
        if not self.enabled:
            return
        if tenant is None:
            raise Unauthenticated("missing bearer token: send gRPC metadata 'authorization: Bearer <token>'")
        if namespace.tenant != tenant:
            raise PermissionDenied(
                f"namespace {str(namespace)!r} belongs to another tenant; your token is for "
                f"tenant {tenant!r}: use namespaces of the form '{tenant}/<model>/<profile>'"
            )


def _header(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key.lower() != AUTHORIZATION_HEADER:
            continue
        if isinstance(value, bytes):
            return value.decode("utf-8", "surrogateescape")
        return value
    return None


def _read(path: str | Path | None) -> bytes | None:
    if path is None or path == "":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS file {str(path)!r}: {exc.strerror or exc}") from exc


def server_credentials(auth_config: Any) -> grpc.ServerCredentials | None:
    """Server TLS credentials from an AuthConfig-like object, or None for plaintext.

    ``auth_config.tls_cert``/``tls_key`` are PEM file paths (both or neither);
    ``tls_client_ca`` set means mutual TLS: clients must present a certificate
    signed by that CA or the handshake fails before any RPC runs.
    """
    cert = _read(getattr(auth_config, "tls_cert", None))
    key = _read(getattr(auth_config, "tls_key", None))
    client_ca = _read(getattr(auth_config, "tls_client_ca", None))
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("auth.tls_client_ca (mTLS) needs auth.tls_cert and auth.tls_key as well")
        return None
    if cert is None or key is None:
        raise ValueError("auth.tls_cert and auth.tls_key must be set together")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    root_ca: str | None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust ``root_ca`` (None: system roots), and present
    ``client_cert``/``client_key`` (both or neither) for mTLS."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key must be given together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(root_ca),
        private_key=_read(client_key),
        certificate_chain=_read(client_cert),
    )
