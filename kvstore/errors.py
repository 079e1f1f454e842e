"""One root exception with categories callers can catch.

Backends and the tiered store raise only these; the gRPC layer maps them to status
codes in one place (kvstore/server.py), so a new backend never decides wire codes.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Root of every error kvstore raises on purpose."""


class InvalidRequest(KVStoreError):
    """The caller sent something malformed; maps to INVALID_ARGUMENT."""


class IntegrityError(KVStoreError):
    """A blob failed its checksum and no intact copy exists; maps to DATA_LOSS."""


class BlobTooLarge(KVStoreError):
    """A blob exceeds a configured size limit; maps to RESOURCE_EXHAUSTED."""


class QuotaExceeded(KVStoreError):
    """A tenant's byte quota would be exceeded; maps to RESOURCE_EXHAUSTED."""


class BackendUnavailable(KVStoreError):
    """A tier could not be reached (connection refused, timeout).

    The tiered store turns this into a miss plus an error metric; it reaches a
    caller only when no tier at all can take a write.
    """


class NotFound(KVStoreError):
    """A requested blob is in no tier; maps to NOT_FOUND."""


class Unauthenticated(KVStoreError):
    """No or an unknown bearer token; maps to UNAUTHENTICATED."""


class PermissionDenied(KVStoreError):
    """The caller's tenant may not use this namespace; maps to PERMISSION_DENIED."""


class StreamLimitExceeded(KVStoreError):
    """A tenant or a connection has too many Put/Get streams open; maps to RESOURCE_EXHAUSTED."""


class StreamTimeout(KVStoreError):
    """A Put stream stopped sending or a Get stream stopped reading; maps to DEADLINE_EXCEEDED."""


class StreamNotCommitted(KVStoreError):
    """A Put stream ended without its commit message, so nothing was stored; maps to ABORTED."""
