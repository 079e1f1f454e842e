"""One error hierarchy for server and client, one status-code table both directions use."""

from __future__ import annotations

import grpc
import pytest

from kvstore import errors
from kvstore.errors import STATUS_OF, KVStoreError, error_for, status_of
from transfer import errors as client_errors
from transfer.errors import BlobIntegrityError, from_rpc_error

C = grpc.StatusCode

#: The server's answers before the two hierarchies were merged: they must not change.
SERVER_ANSWERS = [
    (errors.InvalidRequest, C.INVALID_ARGUMENT),
    (errors.IntegrityError, C.DATA_LOSS),
    (errors.BlobTooLarge, C.RESOURCE_EXHAUSTED),
    (errors.QuotaExceeded, C.RESOURCE_EXHAUSTED),
    (errors.StreamLimitExceeded, C.RESOURCE_EXHAUSTED),
    (errors.StreamTimeout, C.DEADLINE_EXCEEDED),
    (errors.StreamNotCommitted, C.ABORTED),
    (errors.NotFound, C.NOT_FOUND),
    (errors.Unauthenticated, C.UNAUTHENTICATED),
    (errors.PermissionDenied, C.PERMISSION_DENIED),
    (errors.BackendUnavailable, C.UNAVAILABLE),
]

#: The client's classes per status before the merge.
CLIENT_CLASSES = [
    ("NotFound", C.NOT_FOUND),
    ("InvalidArgument", C.INVALID_ARGUMENT),
    ("DataLoss", C.DATA_LOSS),
    ("ResourceExhausted", C.RESOURCE_EXHAUSTED),
    ("Unauthenticated", C.UNAUTHENTICATED),
    ("PermissionDenied", C.PERMISSION_DENIED),
    ("Unavailable", C.UNAVAILABLE),
    ("DeadlineExceeded", C.DEADLINE_EXCEEDED),
]


class _Failed(grpc.RpcError):
    """What grpc raises for a failed call: an RpcError exposing code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("cls", "code"), SERVER_ANSWERS)
def test_server_status_codes_unchanged(cls: type[KVStoreError], code: grpc.StatusCode) -> None:
    assert status_of(cls("what to fix")) is code


def test_anything_else_is_internal() -> None:
    assert status_of(KVStoreError("a bug")) is C.INTERNAL
    assert status_of(ValueError("a bug")) is C.INTERNAL


def test_one_table_both_directions() -> None:
    codes = [code for _, code in STATUS_OF]
    assert len(codes) == len(set(codes)), "a status code with two categories could not be mapped back"
    for cls, code in STATUS_OF:
        assert error_for(code) is cls and status_of(cls("x")) is code and cls.code is code
        # No category is a subclass of another, so the table's order cannot change an answer.
        assert not any(issubclass(cls, other) for other, _ in STATUS_OF if other is not cls)
    assert error_for(C.UNKNOWN) is KVStoreError


@pytest.mark.parametrize(("name", "code"), CLIENT_CLASSES)
def test_client_names_are_the_shared_classes(name: str, code: grpc.StatusCode) -> None:
    cls = getattr(client_errors, name)
    assert cls is getattr(errors, name)
    err = from_rpc_error(_Failed(code, "key must be 32 bytes"), rpc="Get")
    assert type(err) is cls and err.code is code
    assert err.details == "key must be 32 bytes" and str(err) == f"Get: {code.name}: key must be 32 bytes"


def test_old_names_are_aliases_not_copies() -> None:
    assert client_errors.TransferError is KVStoreError
    assert errors.InvalidRequest is errors.InvalidArgument
    assert errors.IntegrityError is errors.DataLoss
    # A server-side precise error is caught by the category a client catches.
    assert issubclass(errors.QuotaExceeded, client_errors.ResourceExhausted)
    assert issubclass(errors.BackendUnavailable, client_errors.Unavailable)
    assert issubclass(BlobIntegrityError, errors.DataLoss)


def test_uncategorised_status_keeps_its_code() -> None:
    err = from_rpc_error(_Failed(C.FAILED_PRECONDITION, ""), rpc="Put")
    assert (
        type(err) is KVStoreError
        and err.code is C.FAILED_PRECONDITION
        and str(err) == "Put: FAILED_PRECONDITION"
    )


def test_blob_integrity_error_names_the_blob() -> None:
    err = BlobIntegrityError("ns/m/p", bytes(range(32)), 3, 4096)
    assert err.code is C.DATA_LOSS and "layer 3" in str(err) and "4096 bytes" in str(err)
