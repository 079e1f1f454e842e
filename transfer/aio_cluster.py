"""The asyncio twin of :class:`transfer.cluster.ClusterKVClient`.

Same promises, same decisions: owners, health, plans and counters come from
:class:`transfer.routing.ClusterCore`; this module only awaits (one
:class:`transfer.aio_client.AsyncKVClient` per member, calls side by side with
``asyncio.gather``). Create it inside the event loop that uses it, normally
through :func:`connect_async`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

from kvstore.keys import Namespace
from kvstore.wire import Blob, PutRequestView
from transfer.aio_client import AsyncKVClient
from transfer.client import ClientCore, PutItem, PutResult, StoreStats
from transfer.cluster import DEFAULT_PROBE_TIMEOUT_S, make_membership, verify_members
from transfer.errors import InvalidArgument, NotFound, TransferError, Unavailable
from transfer.membership import DEFAULT_GRACE_S, DEFAULT_REFRESH_S, Membership, Resolver, View, parse_target
from transfer.routing import (
    DEFAULT_DOWN_S,
    DEFAULT_REPLICATION,
    DEFAULT_WRITE_ACK,
    ClusterCore,
    GetShare,
    acknowledged,
    member_options,
)


class AsyncClusterKVClient:
    """Non-blocking client of a replicated store; API of :class:`transfer.aio_client.AsyncKVClient`."""

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
        self._clients: dict[str, AsyncKVClient] = {}
        self._retired: dict[str, float] = {}
        self._pending: set[asyncio.Task[bool]] = set()  # background copies of write_ack="one"

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
        now, linger = time.monotonic(), self._cluster.check.stream_timeout_s
        for member in list(self._clients):
            if member in view.everyone:
                self._retired.pop(member, None)
            elif now - self._retired.setdefault(member, now) > linger:
                await self._clients.pop(member).close()
                del self._retired[member]
        return view

    async def close(self) -> None:
        await self._drain()
        self._cluster.membership.close()
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients))

    async def wait_ready(self, timeout_s: float = 10.0, *, members: Sequence[str] | None = None) -> None:
        members = (await self._view()).members if members is None else tuple(members)
        results = await asyncio.gather(
            *(self._client(m).wait_ready(timeout_s) for m in members), return_exceptions=True
        )
        down = [m for m, r in zip(members, results, strict=True) if isinstance(r, BaseException)]
        if down:
            raise Unavailable(
                f"replicas not reachable within {timeout_s} s: {', '.join(down)} "
                f"({len(members) - len(down)} of {len(members)} ready)"
            )

    # -- lookup -----------------------------------------------------------------------------------

    async def lookup(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        num_layers: int,
        *,
        timeout_s: float | None = None,
    ) -> int:
        ns = self.core.namespace(namespace)
        keys = self.core.check_keys(keys)
        if num_layers < 1:
            raise InvalidArgument(f"num_layers must be >= 1, got {num_layers}")
        if not keys:
            return 0
        view = await self._view()
        state = self._cluster.start_lookup(keys, view)
        plan = state.first_plan()
        while plan:
            state.absorb(plan, await self._ask(plan, ns, keys, num_layers, timeout_s))
            plan = state.next_plan()
        return state.result()

    async def _ask(
        self, plan: dict[str, list[int]], ns: str, keys: list[bytes], num_layers: int, timeout_s: float | None
    ) -> dict[str, int | None]:
        results = await asyncio.gather(
            *(
                self._lookup_one(m, ns, [keys[i] for i in pos], num_layers, timeout_s)
                for m, pos in plan.items()
            )
        )
        return dict(zip(plan, results, strict=True))

    async def _lookup_one(
        self, member: str, ns: str, keys: list[bytes], num_layers: int, timeout_s: float | None
    ) -> int | None:
        try:
            n = await self._client(member).lookup(ns, keys, num_layers, timeout_s=timeout_s)
        except TransferError as exc:
            self._cluster.failed(member, exc)
            return None
        self._cluster.succeeded(member)
        self._cluster.count(member, lookups=1, lookup_keys=len(keys), lookup_present=n)
        return n

    # -- put --------------------------------------------------------------------------------------

    async def put(
        self,
        namespace: Namespace | str,
        items: Iterable[PutItem | tuple] | AsyncIterable[Any],
        *,
        timeout_s: float | None = None,
        ack: str | None = None,
    ) -> PutResult:
        """See :meth:`transfer.cluster.ClusterKVClient.put`."""
        ns = self.core.namespace(namespace)
        stored = nbytes = requests = 0
        results: list[PutResult] = []
        async for batch in self._batches(ns, items):
            await self._drain()
            acked, sent, answers = await self._put_batch(ns, batch, timeout_s, ack)
            stored += len(acked)
            nbytes += sum(len(batch[i].blob) for i in acked)
            requests += sent
            results += answers
        if self._cluster.write_ack == "all":
            await self._drain()
        return acknowledged(stored, nbytes, requests, results)

    async def _batches(
        self, ns: str, items: Iterable[Any] | AsyncIterable[Any]
    ) -> AsyncIterator[list[PutRequestView]]:
        """Like :meth:`ClusterCore.split_batches`, from a plain or an async iterable."""
        if not isinstance(items, AsyncIterable):
            for batch in self._cluster.split_batches(ns, iter(items)):
                yield batch
            return
        batch: list[PutRequestView] = []
        size = 0
        async for item in items:
            batch.append(self.core.put_request(ns, item))
            size += len(batch[-1].blob)
            if size >= self.core.put_batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    async def _put_batch(
        self, ns: str, batch: list[PutRequestView], timeout_s: float | None, ack: str | None
    ) -> tuple[set[int], int, list[PutResult]]:
        plan = self._cluster.plan_put(batch, await self._view())
        tasks = {
            asyncio.ensure_future(self._put_one(m, ns, batch, idx, timeout_s, ack)): idx
            for m, idx in plan.items()
        }
        owners_left = [0] * len(batch)
        for idx in plan.values():
            for i in idx:
                owners_left[i] += 1
        acked: set[int] = set()
        answers: list[PutResult] = []
        pending: set[asyncio.Task[PutResult | None]] = set(tasks)
        need_all = self._cluster.write_ack == "all"
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    ok = t.result()
                    if ok is not None:
                        answers.append(ok)
                    for i in tasks[t]:
                        owners_left[i] -= 1
                        if ok is not None:
                            acked.add(i)
                if not need_all and all(i in acked or owners_left[i] == 0 for i in range(len(batch))):
                    break
        except BaseException:
            for t in pending:
                t.cancel()
            raise
        self._pending |= pending
        return acked, len(tasks), answers

    async def _put_one(
        self,
        member: str,
        ns: str,
        batch: list[PutRequestView],
        indices: list[int],
        timeout_s: float | None,
        ack: str | None,
    ) -> PutResult | None:
        try:
            result = await self._client(member).put(
                ns, self._cluster.items(batch, indices), timeout_s=timeout_s, ack=ack
            )
        except TransferError as exc:
            self._cluster.failed(member, exc)
            self._cluster.count(member, puts_dropped=len(indices))
            return None
        self._cluster.put_done(member, batch, indices)
        return result

    async def _drain(self) -> None:
        pending, self._pending = self._pending, set()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # -- get --------------------------------------------------------------------------------------

    def get_layers(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        layer_start: int,
        layer_end: int,
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[tuple[int, list[Blob]]]:
        """Async iterator of ``(layer, [blob per key])``; see :meth:`ClusterKVClient.get_layers`."""
        ns = self.core.namespace(namespace)
        keys = self.core.check_keys(keys)
        self.core.check_layer_range(layer_start, layer_end)
        return self._get(ns, keys, layer_start, layer_end, timeout_s)

    def _open(
        self,
        ns: str,
        keys: list[bytes],
        member: str,
        positions: list[int],
        layer: int,
        end: int,
        timeout_s: float | None,
        fallback: bool,
    ) -> GetShare:
        source = self._client(member).get_layers(
            ns, [keys[i] for i in positions], layer, end, timeout_s=timeout_s
        )
        self._cluster.count(member, gets=1, fallbacks=int(fallback))
        return GetShare(member, positions, source, fallback)

    async def _get(
        self, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
    ) -> AsyncIterator[tuple[int, list[Blob]]]:
        if not keys:
            return
        view = await self._view()
        tried: dict[int, set[str]] = {}
        streams = [
            self._open(ns, keys, m, pos, start, end, timeout_s, False)
            for m, pos in self._cluster.plan_get(keys, range(len(keys)), view, tried).items()
        ]
        try:
            for layer in range(start, end):
                blobs: list[Blob | None] = [None] * len(keys)
                queue, streams = list(streams), []
                while queue:
                    stream = queue.pop(0)
                    try:
                        got, part = await anext(stream.source)
                        if got != layer:
                            raise NotFound(f"Get: {stream.member} sent layer {got}, expected {layer}")
                    except (TransferError, StopAsyncIteration) as exc:
                        await stream.source.aclose()
                        err = exc if isinstance(exc, TransferError) else NotFound("Get: stream ended early")
                        self._cluster.failed(stream.member, err)
                        for i in stream.positions:
                            tried.setdefault(i, set()).add(stream.member)
                        plan = self._cluster.plan_get(keys, stream.positions, view, tried)
                        queue += [
                            self._open(ns, keys, m, pos, layer, end, timeout_s, True)
                            for m, pos in plan.items()
                        ]
                        continue
                    self._cluster.count(
                        stream.member, blobs_got=len(part), bytes_got=sum(len(b) for b in part)
                    )
                    for i, blob in zip(stream.positions, part, strict=True):
                        blobs[i] = blob
                    streams.append(stream)
                yield layer, blobs  # type: ignore[misc]
        finally:
            for stream in streams:
                await stream.source.aclose()

    # -- delete, stats ------------------------------------------------------------------------------

    async def delete(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        *,
        num_layers: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Like :meth:`transfer.cluster.ClusterKVClient.delete` (pass ``num_layers``)."""
        ns = self.core.namespace(namespace)
        keys = self.core.check_keys(keys)
        self.core.delete_layers(num_layers)
        return sum(
            await asyncio.gather(
                *(self._delete_one(m, ns, keys, num_layers, timeout_s) for m in (await self._view()).everyone)
            )
        )

    async def _delete_one(
        self, member: str, ns: str, keys: list[bytes], num_layers: int | None, timeout_s: float | None
    ) -> int:
        try:
            return await self._client(member).delete(ns, keys, num_layers=num_layers, timeout_s=timeout_s)
        except TransferError as exc:
            self._cluster.failed(member, exc)
            return 0

    async def replica_stats(self, *, timeout_s: float | None = None) -> dict[str, StoreStats | TransferError]:
        members = (await self._view()).members
        results = await asyncio.gather(
            *(self._client(m).stats(timeout_s=timeout_s) for m in members), return_exceptions=True
        )
        out: dict[str, StoreStats | TransferError] = {}
        for m, r in zip(members, results, strict=True):
            if isinstance(r, BaseException) and not isinstance(r, TransferError):
                raise r
            out[m] = r  # type: ignore[assignment]
        return out

    async def stats(self, *, timeout_s: float | None = None) -> StoreStats:
        answered = {
            m: s
            for m, s in (await self.replica_stats(timeout_s=timeout_s)).items()
            if isinstance(s, StoreStats)
        }
        if not answered:
            raise Unavailable(f"Stats: no replica answered ({', '.join(self.members())})")
        return ClusterCore.merge_stats(answered)


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
    """:func:`transfer.cluster.connect` for asyncio (same grammar, same checks; the probes and the
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
