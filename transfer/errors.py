"""Client-side errors: one root, one class per gRPC status a caller acts on.

The server translates its own exceptions to status codes in one place
(kvstore/server.py); the client translates them back here, also in one place
(:func:`from_rpc_error`), so code above the client catches Python exceptions and
never inspects ``grpc.StatusCode``. Every error keeps the server's message,
which is written for a person to act on.

Errors the client finds on its own (a malformed argument before anything is
sent, a blob whose trailer does not match after it arrived) use the same
classes, so ``except InvalidArgument`` covers both sides of the wire.
"""

from __future__ import annotations

import grpc


class TransferError(Exception):
    """Root of every error the transfer client raises on purpose.

    ``code`` is the gRPC status the server answered with, or ``None`` when the
    client detected the problem itself; ``details`` is the server's message.
    """

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details = details or message


class NotFound(TransferError):
    """A requested blob is in no tier of the store (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(TransferError):
    """The request was malformed: bad namespace, key length, layer range (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DataLoss(TransferError):
    """A blob failed its integrity check and no intact copy exists (DATA_LOSS)."""

    code = grpc.StatusCode.DATA_LOSS


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


class ResourceExhausted(TransferError):
    """A size limit or a tenant quota was hit (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(TransferError):
    """No bearer token, or one the server does not know (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TransferError):
    """The token's tenant may not use this namespace (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(TransferError):
    """The server could not be reached or cannot serve right now (UNAVAILABLE); worth a retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TransferError):
    """The call's deadline passed before it completed (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[TransferError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        InvalidArgument,
        DataLoss,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
    )
}


def from_rpc_error(err: grpc.RpcError, *, rpc: str = "") -> TransferError:
    """The :class:`TransferError` for a failed call, keeping the server's message.

    Works for both ``grpc`` and ``grpc.aio`` errors (both expose ``code()`` and
    ``details()``); a status with no dedicated class becomes a plain
    :class:`TransferError` that still carries the code.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else "") or ""
    cls = _BY_CODE.get(code, TransferError)
    where = f"{rpc}: " if rpc else ""
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{where}{name}: {details}" if details else f"{where}{name}", code=code, details=details)
