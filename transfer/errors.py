"""The client's errors: the shared hierarchy of :mod:`kvstore.errors`, plus the mapping back.

The server translates its exceptions to status codes with the one table
(:data:`kvstore.errors.STATUS_OF`); the client translates codes back with the same
table, in one place (:func:`from_rpc_error`), so code above the client catches
Python exceptions and never inspects ``grpc.StatusCode``. Every error keeps the
server's message, which is written for a person to act on.

The classes are the shared ones, not copies: ``transfer.errors.NotFound`` *is*
``kvstore.errors.NotFound``, and :data:`TransferError` is the common root
:class:`~kvstore.errors.KVStoreError`. Errors the client finds on its own (a
malformed argument before anything is sent, a blob whose trailer does not match
after it arrived) use the same classes, so ``except InvalidArgument`` covers both
sides of the wire.
"""

from __future__ import annotations

import grpc

from kvstore.errors import (
    Aborted,
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    KVStoreError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_for,
)

#: The client's former name for the root; the same class as :class:`kvstore.errors.KVStoreError`.
TransferError = KVStoreError

__all__ = [
    "Aborted",
    "BlobIntegrityError",
    "DataLoss",
    "DeadlineExceeded",
    "InvalidArgument",
    "KVStoreError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TransferError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class BlobIntegrityError(DataLoss):
    """A blob arrived at the client with a trailer that does not match its payload.

    The server verified it before sending, so the bytes were damaged in transit
    (or by something between the client and the server). Names the exact blob.
    """

    def __init__(self, namespace: str, key: bytes, layer: int, size: int) -> None:
        self.namespace = namespace
        self.key = key
        self.layer = layer
        self.size = size
        super().__init__(
            f"blob {namespace}/{key.hex()[:16]}… layer {layer} ({size} bytes) failed its integrity "
            "check after receipt: damaged in transit; it was not used"
        )


def from_rpc_error(err: grpc.RpcError, *, rpc: str = "") -> KVStoreError:
    """The error category for a failed call (:func:`kvstore.errors.error_for`), keeping the server's message.

    Works for both ``grpc`` and ``grpc.aio`` errors (both expose ``code()`` and
    ``details()``); a status with no category becomes a plain :data:`TransferError`
    that still carries the code.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else "") or ""
    cls = error_for(code)
    where = f"{rpc}: " if rpc else ""
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{where}{name}: {details}" if details else f"{where}{name}", code=code, details=details)
