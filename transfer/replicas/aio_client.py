"""The asyncio twin of :class:`transfer.replicas.client.ClusterKVClient`.

Same promises, same operations (:mod:`transfer.replicas.ops`), same decisions
(:class:`transfer.replicas.routing.ClusterCore`); this module only awaits (one
:class:`transfer.rpc.aio_client.AsyncKVClient` per member, calls side by side as
tasks). Create it inside the event loop that uses it, normally
through :func:`connect_async`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from transfer.errors import TransferError, Unavailable
from transfer.replicas import ops as cops
from transfer.replicas.client import (
    DEFAULT_PROBE_TIMEOUT_S,
    make_membership,
    retired,
    verify_members,
)
from transfer.replicas.membership import (
    DEFAULT_GRACE_S,
    DEFAULT_REFRESH_S,
    Membership,
    Resolver,
    View,
    parse_target,
)
from transfer.replicas.routing import (
    DEFAULT_DOWN_S,
    DEFAULT_REPLICATION,
    DEFAULT_WRITE_ACK,
    ClusterCore,
    member_options,
)
from transfer.rpc.aio_client import AsyncKVClient
from transfer.rpc.api import AsyncApi
from transfer.rpc.core import ClientCore, StoreStats
from transfer.rpc.ops import END, AsyncLoop, assert_never

T = TypeVar("T")


class AsyncClusterKVClient(AsyncApi[cops.ClusterAction]):
    """Non-blocking client of a replicated store; the methods of
    :class:`transfer.rpc.aio_client.AsyncKVClient` (:class:`transfer.rpc.api.AsyncApi`) and a few of its own.

    The operations are those of :mod:`transfer.replicas.ops`; this class awaits
    their effects (member calls side by side as tasks).
    """

    def __init__(
        self,
        membership: Membership,
        *,
        token: str | None = None,
        replication: int = DEFAULT_REPLICATION,
        write_ack: str = DEFAULT_WRITE_ACK,
        down_s: float = DEFAULT_DOWN_S,
        **client_options: Any,
    ) -> None:
        self._options = member_options({"token": token, **client_options})
        self._cluster = ClusterCore(
            membership,
            replication=replication,
            write_ack=write_ack,
            down_s=down_s,
            check=ClientCore("cluster", **self._options),
        )
        self._ops = cops.ClusterOps(self._cluster)
        self._clients: dict[str, AsyncKVClient] = {}
        self._retired: dict[str, float] = {}
        self._pending: set[asyncio.Task[Any]] = set()  # background copies of write_ack="one"
        self._repairing: set[asyncio.Task[Any]] = set()  # repair workers (transfer.replicas.repair)

    @property
    def cluster(self) -> ClusterCore:
        return self._cluster

    @property
    def core(self) -> ClientCore:
        return self._cluster.check

    async def __aenter__(self) -> AsyncClusterKVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def members(self) -> tuple[str, ...]:
        return self._cluster.view().members

    def replica_counters(self) -> dict[str, dict[str, int]]:
        return self._cluster.counters()

    def _client(self, member: str) -> AsyncKVClient:
        client = self._clients.get(member)
        if client is None:
            client = self._clients[member] = AsyncKVClient(member, **self._options)
        self._retired.pop(member, None)
        return client

    async def _view(self) -> View:
        """The current view; clients of members gone for longer than any call can last are closed."""
        view = self._cluster.view()
        gone = retired(self._clients, self._retired, view, time.monotonic(), self.core.stream_timeout_s)
        for member in gone:
            await self._clients.pop(member).close()
        return view

    async def close(self) -> None:
        await self.drain()
        self._cluster.repairs.clear()
        for task in self._repairing:  # best effort: what is left is found again by the next reader
            task.cancel()
        await asyncio.gather(*self._repairing, return_exceptions=True)
        self._cluster.membership.close()
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients))

    # -- the effects of transfer.replicas.ops, awaited ------------------------------------------------

    async def _run(self, op: cops.ClusterOp[T]) -> T:
        return await AsyncLoop(self._perform, cops.map_error, _aclose).run(op)

    def _drive(self, op: cops.ClusterOp[None]) -> AsyncIterator[Any]:
        return AsyncLoop(self._perform, cops.map_error, _aclose).drive(op)

    async def _perform(self, effect: cops.ClusterAction) -> Any:
        match effect:
            case cops.Next():
                if isinstance(effect.source, AsyncIterator):
                    return await anext(effect.source, END)
                return next(effect.source, END)
            case cops.MemberLookup(member, ns, keys, num_layers, timeout_s):
                return await self._client(member).lookup(ns, keys, num_layers, timeout_s=timeout_s)
            case cops.MemberPut(member, ns, items, ack, timeout_s):
                return await self._client(member).put(ns, items, ack=ack, timeout_s=timeout_s)
            case cops.MemberDelete(member, ns, keys, num_layers, timeout_s):
                return await self._client(member).delete(ns, keys, num_layers=num_layers, timeout_s=timeout_s)
            case cops.MemberStats(member, timeout_s):
                return await self._client(member).stats(timeout_s=timeout_s)
            case cops.MemberReady(member, timeout_s):
                return await self._client(member).wait_ready(timeout_s)
            case cops.Fan():
                return await self._fan(effect.ops)
            case cops.CurrentView():
                return await self._view()
            case cops.OpenLayers(member, ns, keys, start, end, timeout_s):
                return self._client(member).get_layers(ns, keys, start, end, timeout_s=timeout_s)
            case cops.Close():
                return await _aclose(effect.source)
            case cops.Spawn():
                return asyncio.ensure_future(self._run(effect.op))
            case cops.WaitAny():
                done, pending = await asyncio.wait(effect.tasks, return_when=asyncio.FIRST_COMPLETED)
                return [(t, _outcome(t)) for t in done], frozenset(pending)
            case cops.Detach():
                self._pending |= effect.tasks
                return None
            case cops.Abandon():
                for t in effect.tasks:
                    t.cancel()
                self._pending |= effect.tasks  # drain waits until they have stopped
                return None
            case cops.Drain():
                return await self.drain()
            case cops.Background():
                task = asyncio.ensure_future(self._background(effect.op))
                self._repairing.add(task)
                task.add_done_callback(self._repairing.discard)
                return None
            case cops.Copy():
                return await self._copy(effect)
            case _:
                assert_never(effect)

    async def _background(self, op: cops.ClusterOp[None]) -> None:
        try:
            await self._run(op)
        except Exception as exc:
            cops.background_failed(exc)

    async def _fan(self, ops: tuple[cops.ClusterOp[Any], ...]) -> list[Any]:
        """Every sub-operation run to its end, side by side; their results, or the first error in
        their order (as :meth:`transfer.replicas.client.ClusterKVClient._fan`)."""
        settled = await asyncio.gather(*(self._settle(op) for op in ops))
        for error, _ in settled:
            if error is not None:
                raise error
        return [value for _, value in settled]

    async def _settle(self, op: cops.ClusterOp[Any]) -> tuple[Exception | None, Any]:
        try:
            return None, await self._run(op)
        except Exception as exc:
            return exc, None

    async def _copy(self, effect: cops.Copy) -> int:
        """One member's Get streamed into another's Put: no more than a Put batch in memory."""
        keys, n = effect.keys, effect.num_layers
        layers = self._client(effect.source).get_layers(effect.namespace, list(keys), 0, n)

        async def items() -> AsyncIterator[tuple[bytes, int, int, Any]]:
            async for layer, blobs in layers:
                for k, b in zip(keys, blobs, strict=True):
                    yield k, layer, n, b

        try:
            return (await self._client(effect.target).put(effect.namespace, items())).bytes_stored
        finally:
            await _aclose(layers)

    async def drain(self) -> None:
        """Wait for the background copies of ``write_ack="one"`` puts (their failures were counted)."""
        pending, self._pending = self._pending, set()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def drain_repairs(self, timeout_s: float | None = None) -> bool:
        """See :meth:`transfer.replicas.client.ClusterKVClient.drain_repairs`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._repairing:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(set(self._repairing), timeout=left)
        return True

    # -- the API -------------------------------------------------------------------------------------

    async def wait_ready(self, timeout_s: float = 10.0, *, members: Sequence[str] | None = None) -> None:
        await self._run(cops.wait_ready(self._cluster, timeout_s, members))

    async def replica_stats(self, *, timeout_s: float | None = None) -> dict[str, StoreStats | TransferError]:
        return await self._run(cops.replica_stats(self._cluster, timeout_s))


def _outcome(task: asyncio.Future[Any]) -> Any:
    """A finished task's result, or the exception it raised (as a value)."""
    if task.cancelled():
        return asyncio.CancelledError()
    exc = task.exception()
    return exc if exc is not None else task.result()


async def _aclose(source: Any) -> None:
    if isinstance(source, AsyncIterator):
        await source.aclose()  # type: ignore[attr-defined]
    else:
        source.close()


async def connect_async(
    target: str,
    *,
    token: str | None = None,
    replication: int = DEFAULT_REPLICATION,
    write_ack: str = DEFAULT_WRITE_ACK,
    refresh_s: float = DEFAULT_REFRESH_S,
    grace_s: float = DEFAULT_GRACE_S,
    verify: bool = True,
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    resolver: Resolver | None = None,
    **client_options: Any,
) -> AsyncKVClient | AsyncClusterKVClient:
    """:func:`transfer.replicas.client.connect` for asyncio (same grammar, same checks; the probes and the
    first DNS resolution run on a thread so the loop stays live)."""
    parsed = parse_target(target)
    if parsed.kind == "single":
        return AsyncKVClient(parsed.members[0], token=token, **client_options)
    membership = await asyncio.to_thread(
        make_membership, target, refresh_s=refresh_s, grace_s=grace_s, resolver=resolver
    )
    try:
        client = AsyncClusterKVClient(
            membership, token=token, replication=replication, write_ack=write_ack, **client_options
        )
    except BaseException:
        membership.close()
        raise
    if verify:
        try:
            down = await asyncio.to_thread(
                verify_members,
                client.members(),
                token=token,
                timeout_s=probe_timeout_s,
                credentials=client.core.credentials,
            )
            # connect the answering members' channels before the first call
            await client.wait_ready(probe_timeout_s, members=[m for m in client.members() if m not in down])
        except Unavailable:
            pass  # named in the log by verify_members; such members cost misses until they answer
        except BaseException:
            await client.close()
            raise
    return client
