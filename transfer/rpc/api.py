"""The public API of the clients, written once for the blocking and once for the asyncio ones.

A client is a set of :class:`Operations` (:class:`transfer.rpc.ops.ServerOps` for
one server, :class:`transfer.replicas.ops.ClusterOps` for replicas, each bound at
construction to the state its operations take) and a way to carry their effects
out (``_run``/``_drive``). The methods below only pick the operation;
:class:`transfer.rpc.client.KVClient` and :class:`transfer.replicas.client.ClusterKVClient`
inherit :class:`BlockingApi`, their asyncio front-ends :class:`AsyncApi`. So
the four clients cannot differ in signature, validation or meaning.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from kvstore.keys import Namespace
from kvstore.wire import Blob
from transfer.rpc.core import ClientCore, PutItem, PutResult, StoreStats
from transfer.rpc.ops import Emit, get_args

T = TypeVar("T")
#: The effects a client's operations yield and its driver performs (besides Emit).
E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)


class Operations(Protocol[E_co]):
    """The operations behind the public methods, each a generator of effects (``E`` or
    :class:`transfer.rpc.ops.Emit`) that a driver carries out. Arguments are validated by the
    operation when it starts, except :meth:`get_layers`' (:func:`transfer.rpc.ops.get_args`, at once)."""

    def lookup(
        self, namespace: Namespace | str, keys: Any, num_layers: int, timeout_s: float | None
    ) -> Generator[E_co | Emit, Any, int]: ...

    def put(
        self, namespace: Namespace | str, source: Any, ack: str | None, timeout_s: float | None
    ) -> Generator[E_co | Emit, Any, PutResult]: ...

    def get_layers(
        self, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
    ) -> Generator[E_co | Emit, Any, None]: ...

    def delete(
        self, namespace: Namespace | str, keys: Any, num_layers: int | None, timeout_s: float | None
    ) -> Generator[E_co | Emit, Any, int]: ...

    def stats(self, timeout_s: float | None) -> Generator[E_co | Emit, Any, StoreStats]: ...


class _Operations(Generic[E]):
    """What both API bases need from a front-end."""

    #: Bound to the client's state at construction (ServerOps or ClusterOps).
    _ops: Operations[E]

    @property
    def core(self) -> ClientCore:
        """Options, validation and request building (of each member, for a cluster)."""
        raise NotImplementedError


class BlockingApi(_Operations[E]):
    """``lookup``, ``put``, ``get_layers``, ``delete``, ``stats`` of a blocking client."""

    def _run(self, op: Generator[E | Emit, Any, T]) -> T:
        raise NotImplementedError

    def _drive(self, op: Generator[E | Emit, Any, None]) -> Iterator[Any]:
        raise NotImplementedError

    def lookup(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        num_layers: int,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """Number of leading ``keys`` whose layers ``[0, num_layers)`` are all stored (for a
        cluster: each on some owner; never more than is there)."""
        return self._run(self._ops.lookup(namespace, keys, num_layers, timeout_s))

    def put(
        self,
        namespace: Namespace | str,
        items: Iterable[PutItem | tuple[Any, ...]],
        *,
        timeout_s: float | None = None,
        ack: str | None = None,
    ) -> PutResult:
        """Store every item, pulling them lazily, a batch of ``put_batch_bytes`` at a time.

        Each Put stream ends with a commit message; the server stores a stream
        only once it has read it. ``ack="durable"`` asks the server to answer OK
        only once a persistent tier holds the blobs (UNAVAILABLE otherwise);
        ``"memory"`` accepts RAM; None uses the client's ``ack`` option, then the
        server's ``server.ack``. A cluster sends each item to its owners;
        ``num_stored`` counts items stored at least once, ``durable`` and
        ``tiers`` hold for every acknowledged copy.
        """
        return self._run(self._ops.put(namespace, iter(items), ack, timeout_s))

    def get_layers(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        layer_start: int,
        layer_end: int,
        *,
        timeout_s: float | None = None,
    ) -> Iterator[tuple[int, list[Blob]]]:
        """Yield ``(layer, [blob per key])`` for each layer in order, as soon as it is complete.

        Arguments are validated at once; every blob's trailer is verified on
        receipt. Stopping the iteration early cancels the stream. A cluster
        reads each key from its first healthy owner and, where one fails or
        misses mid-stream, from the next from that layer on (:class:`NotFound`
        only when no candidate has it).
        """
        ns, keys = get_args(self.core, namespace, keys, layer_start, layer_end)
        return self._drive(self._ops.get_layers(ns, keys, layer_start, layer_end, timeout_s))

    def delete(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        *,
        num_layers: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Delete layers ``[0, num_layers)`` of each key from every tier (of every replica that may
        hold it); returns the chunks (copies) deleted.

        Pass ``num_layers`` (the model's layer count): without it the server finds
        the layers by listing the namespace on every tier, which is slow on remote
        tiers (S3: a listing and an index read per stored chunk), and deletes every
        layer it finds.
        """
        return self._run(self._ops.delete(namespace, keys, num_layers, timeout_s))

    def stats(self, *, timeout_s: float | None = None) -> StoreStats:
        """The store's tiers and counters (a cluster's reachable replicas summed)."""
        return self._run(self._ops.stats(timeout_s))


class AsyncApi(_Operations[E]):
    """The asyncio form of :class:`BlockingApi`: same methods, same meaning, awaited."""

    async def _run(self, op: Generator[E | Emit, Any, T]) -> T:
        raise NotImplementedError

    def _drive(self, op: Generator[E | Emit, Any, None]) -> AsyncIterator[Any]:
        raise NotImplementedError

    async def lookup(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        num_layers: int,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """See :meth:`BlockingApi.lookup`."""
        return await self._run(self._ops.lookup(namespace, keys, num_layers, timeout_s))

    async def put(
        self,
        namespace: Namespace | str,
        items: Iterable[PutItem | tuple[Any, ...]] | AsyncIterable[Any],
        *,
        timeout_s: float | None = None,
        ack: str | None = None,
    ) -> PutResult:
        """See :meth:`BlockingApi.put`. ``items`` may also be an async iterable; a plain one is pulled
        on the event loop, so a producer that encodes on the CPU should be an async generator that
        hands encoding to a thread (``asyncio.to_thread``) if the loop must stay live."""
        source: Any = aiter(items) if isinstance(items, AsyncIterable) else iter(items)
        return await self._run(self._ops.put(namespace, source, ack, timeout_s))

    def get_layers(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        layer_start: int,
        layer_end: int,
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[tuple[int, list[Blob]]]:
        """Async iterator of ``(layer, [blob per key])``; see :meth:`BlockingApi.get_layers`."""
        ns, keys = get_args(self.core, namespace, keys, layer_start, layer_end)
        return self._drive(self._ops.get_layers(ns, keys, layer_start, layer_end, timeout_s))

    async def delete(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        *,
        num_layers: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """See :meth:`BlockingApi.delete` (pass ``num_layers``: without it every tier is searched)."""
        return await self._run(self._ops.delete(namespace, keys, num_layers, timeout_s))

    async def stats(self, *, timeout_s: float | None = None) -> StoreStats:
        """See :meth:`BlockingApi.stats`."""
        return await self._run(self._ops.stats(timeout_s))
