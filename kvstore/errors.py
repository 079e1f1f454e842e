"""One error hierarchy for both sides of the wire, mapped to gRPC status codes in one table.

One root (:class:`KVStoreError`) and one *category* per gRPC status a caller acts
on (:class:`InvalidArgument`, :class:`NotFound`, :class:`DataLoss`,
:class:`ResourceExhausted`, ...), as redis-py's ``redis/exceptions.py`` does.
The server raises a category or one of its precise subclasses
(:class:`QuotaExceeded` is a :class:`ResourceExhausted`); :data:`STATUS_OF` turns it
into a status code (kvstore/server.py); the client turns the code back into the
same category (:func:`error_for`, used by ``transfer.errors.from_rpc_error``). So
``except NotFound`` means the same thing in a backend, in the server and in code
above the client, and errors the client finds on its own (a malformed argument
before anything is sent, a blob damaged in transit) use the same classes.

Old names stay importable as aliases of the same classes: ``InvalidRequest`` is
:class:`InvalidArgument`, ``IntegrityError`` is :class:`DataLoss`, and
``transfer.errors.TransferError`` is :class:`KVStoreError`.

This module is part of the shared core: it imports nothing of the server or the
client (only grpc, for the status codes).
"""

from __future__ import annotations

import grpc


class KVStoreError(Exception):
    """Root of every error kvstore (server or client) raises on purpose.

    ``code`` is the gRPC status of the error's category (``None`` for the root: the
    server answers INTERNAL). An error built from a server's answer carries the code
    the server sent and ``details``, the server's message, written for a person to act on.
    """

    code: grpc.StatusCode | None = None

    def __init__(self, message: str = "", *, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details = details or message


# ---------------------------------------------------------------- categories (one per status code)


class InvalidArgument(KVStoreError):
    """The caller sent something malformed: bad namespace, key length, layer range (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KVStoreError):
    """A requested blob is in no tier of the store (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class DataLoss(KVStoreError):
    """A blob failed its checksum and no intact copy exists (DATA_LOSS)."""

    code = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(KVStoreError):
    """A size limit, a tenant quota or a stream limit was hit (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(KVStoreError):
    """The call's deadline passed, or a stream went idle too long (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(KVStoreError):
    """The operation was abandoned and left nothing behind (ABORTED)."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(KVStoreError):
    """No bearer token, or one the server does not know (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KVStoreError):
    """The token's tenant may not use this namespace (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(KVStoreError):
    """The server or a tier could not be reached or cannot serve right now (UNAVAILABLE); worth a retry."""

    code = grpc.StatusCode.UNAVAILABLE


#: The one mapping between error categories and wire status codes, used by the server
#: (exception -> status, first ``isinstance`` match) and the clients (status -> class).
#: No category subclasses another, so the order does not change any answer.
STATUS_OF: tuple[tuple[type[KVStoreError], grpc.StatusCode], ...] = tuple(
    (cls, cls.code)
    for cls in (
        InvalidArgument,
        NotFound,
        DataLoss,
        ResourceExhausted,
        DeadlineExceeded,
        Aborted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
    )
)

_CLASS_OF: dict[grpc.StatusCode, type[KVStoreError]] = {code: cls for cls, code in STATUS_OF}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code the server answers for ``exc``: its category's, else INTERNAL."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode) -> type[KVStoreError]:
    """The category a client raises for a status code; the root for a code with no category."""
    return _CLASS_OF.get(code, KVStoreError)


# ---------------------------------------------------------------- precise server-side errors


class BlobTooLarge(ResourceExhausted):
    """A blob exceeds a configured size limit."""


class QuotaExceeded(ResourceExhausted):
    """A tenant's byte quota would be exceeded."""


class StreamLimitExceeded(ResourceExhausted):
    """A tenant or a connection has too many Put/Get streams open."""


class StreamTimeout(DeadlineExceeded):
    """A Put stream stopped sending or a Get stream stopped reading."""


class StreamNotCommitted(Aborted):
    """A Put stream ended without its commit message, so nothing was stored."""


#: Words in the message of a Get answered UNAVAILABLE by a live server because a tier it could not
#: read may hold the blob: the server is up, so a cluster client must not mark it down.
TIER_SKIPPED = "could not be read and may hold them"


class BackendUnavailable(Unavailable):
    """A tier could not be reached (connection refused, timeout).

    The tiered store turns this into a miss plus an error metric; it reaches a
    caller only when no tier at all can take a write.
    """


# ---------------------------------------------------------------- old names, same classes

#: The server's former name for :class:`InvalidArgument`.
InvalidRequest = InvalidArgument
#: The server's former name for :class:`DataLoss`.
IntegrityError = DataLoss
