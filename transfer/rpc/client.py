"""The transfer client: lookup, streaming put and layer-ordered get over gRPC.

Lifecycle: a :class:`KVClient` opens one channel in its constructor and reuses
it for every call until :meth:`KVClient.close` (or the ``with`` block ends).
Every call carries a deadline and, when configured, the bearer token.

What the client promises on top of the wire:

* **Integrity end to end.** The encoder seals each blob (its XXH3 trailer is
  computed once, there); the server verifies every trailer once on Put, before
  storing anything of the stream, and a bad blob fails the whole Put with
  :class:`InvalidArgument` naming the item (the client does not hash it again on
  the way out: that pass cost ~0.02 CPU s per GB, see docs/benchmarks.md).
  After a Get the client verifies every blob (one damaged in transit raises
  :class:`BlobIntegrityError`, never reaches the decoder).
* **Bounded memory.** :meth:`put` pulls items from an iterator and sends them in
  Put streams of at most ``put_batch_bytes``; only the current batch is kept
  (so it can be replayed on a retry). :meth:`get_layers` yields each layer as
  soon as all its blobs arrived, so a consumer holds one layer, not a context.
* **Retries only where they are safe.** :class:`RetryPolicy` decides, by error
  class, what is worth another attempt (by default only :class:`Unavailable`);
  a Put batch is replayed whole (puts are idempotent), a Get resumes at the
  first layer it has not yet yielded. ``INVALID_ARGUMENT`` and friends are
  raised at once.
* **Errors as exceptions.** gRPC status codes become the classes of
  :mod:`transfer.errors`, with the server's message.

How it is built: what the client does is decided once, without I/O, in
:mod:`transfer.rpc.core` (options, validation, request building, checks) and
:mod:`transfer.rpc.ops` (retry, windowing, Put batching, Get assembly, as
generators of effects). :class:`KVClient` only carries those effects out with
blocking gRPC calls; :class:`transfer.rpc.aio_client.AsyncKVClient` is the asyncio
front-end of the same operations, so the two cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

import grpc

from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from transfer.errors import TransferError, Unavailable
from transfer.rpc import ops
from transfer.rpc.api import BlockingApi
from transfer.rpc.core import (
    ACKS,
    DEFAULT_GET_PACK_BYTES,
    DEFAULT_MAX_KEYS_PER_REQUEST,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PUT_BATCH_BYTES,
    MAX_LAYERS,
    NO_RETRY,
    ClientCore,
    LayerAssembler,
    PutBatch,
    PutItem,
    PutResult,
    RetryPolicy,
    StoreStats,
    TierStats,
)

__all__ = [
    "ACKS",
    "DEFAULT_GET_PACK_BYTES",
    "DEFAULT_MAX_KEYS_PER_REQUEST",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PUT_BATCH_BYTES",
    "MAX_LAYERS",
    "NO_RETRY",
    "ClientCore",
    "KVClient",
    "LayerAssembler",
    "PutBatch",
    "PutItem",
    "PutResult",
    "RetryPolicy",
    "StoreStats",
    "TierStats",
]


T = TypeVar("T")


class KVClient(BlockingApi[ops.Action]):
    """Blocking client of a kvstore server; see the module docstring for its promises, and
    :class:`transfer.rpc.api.BlockingApi` for its methods (``lookup``, ``put``, ``get_layers``,
    ``delete``, ``stats``)."""

    def __init__(self, target: str, **options: Any) -> None:
        self._core = ClientCore(target, **options)
        self._ops = ops.ServerOps(self._core)
        core = self._core
        if core.credentials is not None:
            self._channel = grpc.secure_channel(target, core.credentials, options=core.options)
        else:
            self._channel = grpc.insecure_channel(target, options=core.options)
        self._raw_channel = self._channel
        if core.interceptors:
            self._channel = grpc.intercept_channel(self._channel, *core.interceptors)
        self._unary = unary_methods(pb_grpc.KVStoreStub(self._channel))
        self._put, self._get = core.bulk_methods(self._channel)

    @property
    def core(self) -> ClientCore:
        return self._core

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._raw_channel.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel is connected, or raise :class:`Unavailable` at the deadline."""
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"{self._core.target} not reachable within {timeout_s} s") from None

    # -- the effects of transfer.rpc.ops, carried out with blocking calls ------------------------------

    def _perform(self, effect: ops.Action) -> Any:
        match effect:
            case ops.Receive():
                return next(effect.stream, ops.END)
            case ops.Call():
                return self._unary[effect.rpc](
                    effect.request, timeout=effect.timeout, metadata=self._core.metadata
                )
            case ops.OpenGet():
                return self._get(effect.request, timeout=effect.timeout, metadata=self._core.metadata)
            case ops.Cancel():
                return effect.stream.cancel()
            case ops.FirstItem():
                return effect.batch.step(0)
            case ops.SendBatch():
                return self._put(effect.batch.attempt(), timeout=effect.timeout, metadata=self._core.metadata)
            case ops.Sleep():
                return time.sleep(effect.seconds)
            case _:
                ops.assert_never(effect)

    def _error(self, effect: ops.Action, exc: BaseException) -> BaseException | None:
        return rpc_error(self._core, effect, exc) if isinstance(exc, grpc.RpcError) else None

    def _run(self, op: ops.Op[T]) -> T:
        return ops.Loop(self._perform, self._error).run(op)

    def _drive(self, op: ops.Op[None]) -> Iterator[Any]:
        return ops.Loop(self._perform, self._error).drive(op)


def unary_methods(stub: pb_grpc.KVStoreStub) -> dict[ops.Unary, Any]:
    """The stub's method for each :data:`transfer.rpc.ops.Unary` name, bound once (sync or asyncio)."""
    return {"Lookup": stub.Lookup, "Delete": stub.Delete, "Stats": stub.Stats}


def rpc_error(core: ClientCore, effect: ops.Action, exc: grpc.RpcError) -> TransferError | None:
    """The error a failed RPC effect throws into its operation (None: not an RPC effect)."""
    match effect:
        case ops.Call() | ops.SendBatch() | ops.Receive():
            return core.error(exc, effect.rpc)
        case _:
            return None
