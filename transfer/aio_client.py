"""The asyncio twin of :class:`transfer.client.KVClient` (``grpc.aio``).

Same constructor options, same methods, same errors, same retry rules: request
building, validation, trailer checks and error mapping all live in
:class:`transfer.client.ClientCore`; this module only does the awaiting. Use it
from an event loop that serves many requests (a decode worker running several
sequences); use :class:`KVClient` everywhere else.

``put`` takes a plain or an async iterable. A plain one is pulled on the event
loop, so a producer that encodes on the CPU should be an async generator that
hands encoding to a thread (``asyncio.to_thread``) if the loop must stay live.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from kvstore.keys import Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire import Blob, PutRequestView
from transfer.client import (
    ClientCore,
    LayerAssembler,
    PutBatch,
    PutItem,
    PutResult,
    StoreStats,
)
from transfer.errors import InvalidArgument, Unavailable

_END = object()


class _AsyncPutBatch(PutBatch):
    """:class:`PutBatch` fed by an async (or plain) iterator; attempts share it under an asyncio lock."""

    def __init__(self, core: ClientCore, namespace: str, source: Any, ack: int = 0) -> None:
        super().__init__(core, namespace, iter(()), ack)
        self._asource = source
        self._alock = asyncio.Lock()

    async def _pull(self) -> Any:
        if isinstance(self._asource, AsyncIterator):
            return await anext(self._asource, _END)
        return next(self._asource, _END)

    async def astep(self, index: int) -> PutRequestView | None:
        async with self._alock:
            if index < len(self._sent):
                return self._sent[index]
            if self._closed:
                return None
            try:
                item = await self._pull()
            except BaseException as exc:
                return self._abort(exc)
            if item is _END:
                self.exhausted = self._closed = True
                return None
            return self._add(item)

    async def aattempt(self) -> AsyncIterator[PutRequestView]:
        index = 0
        while (req := await self.astep(index)) is not None:
            yield req
            index += 1
        if (end := self.commit()) is not None:
            yield end


class AsyncKVClient:
    """Non-blocking client of a kvstore server; create it inside the event loop that uses it."""

    def __init__(self, target: str, **options: Any) -> None:
        self._core = ClientCore(target, **options)
        core = self._core
        if core.credentials is not None:
            self._channel = grpc.aio.secure_channel(
                target, core.credentials, options=core.options, interceptors=core.interceptors or None
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                target, options=core.options, interceptors=core.interceptors or None
            )
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._put, self._get = core.bulk_methods(self._channel)
        self._sleep = asyncio.sleep

    @property
    def core(self) -> ClientCore:
        return self._core

    async def __aenter__(self) -> AsyncKVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable(f"{self._core.target} not reachable within {timeout_s} s") from None

    async def _unary(self, rpc: str, request: Any, timeout_s: float | None) -> Any:
        method = getattr(self._stub, rpc)
        failures = 0
        while True:
            try:
                return await method(
                    request, timeout=self._core.timeout(timeout_s), metadata=self._core.metadata
                )
            except grpc.aio.AioRpcError as exc:
                err = self._core.error(exc, rpc)
                failures += 1
                if not self._core.retry.should_retry(err, failures):
                    raise err from None
                await self._sleep(self._core.retry.delay(failures))

    async def lookup(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        num_layers: int,
        *,
        timeout_s: float | None = None,
    ) -> int:
        ns = self._core.namespace(namespace)
        keys = self._core.check_keys(keys)
        if num_layers < 1:
            raise InvalidArgument(f"num_layers must be >= 1, got {num_layers}")
        total = 0
        for _, window in self._core.windows(keys):
            if not window:
                break
            resp = await self._unary(
                "Lookup", pb.LookupRequest(namespace=ns, keys=window, num_layers=num_layers), timeout_s
            )
            total += resp.num_present
            if resp.num_present < len(window):
                break
        return total

    async def put(
        self,
        namespace: Namespace | str,
        items: Iterable[PutItem | tuple] | AsyncIterable[Any],
        *,
        timeout_s: float | None = None,
        ack: str | None = None,
    ) -> PutResult:
        """See :meth:`KVClient.put` (commit message per stream, ``ack``)."""
        ns = self._core.namespace(namespace)
        ack_value = self._core.ack_value(ack) if ack is not None else self._core.ack
        source: Any = aiter(items) if isinstance(items, AsyncIterable) else iter(items)
        responses: list[pb.PutResponse] = []
        while True:
            batch = _AsyncPutBatch(self._core, ns, source, ack_value)
            if await batch.astep(0) is None:
                if batch.error is not None:  # the very first item failed: nothing to send
                    raise batch.error
                break
            responses.append(await self._put_batch(batch, timeout_s))
            if batch.exhausted:
                break
        return self._core.put_result(responses)

    async def _put_batch(self, batch: _AsyncPutBatch, timeout_s: float | None) -> pb.PutResponse:
        failures = 0
        while True:
            try:
                return await self._put(
                    batch.aattempt(),
                    timeout=self._core.timeout(timeout_s, stream=True),
                    metadata=self._core.metadata,
                )
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                # A failing request iterator cancels the call; report the iterator's error instead.
                if batch.error is not None:
                    raise batch.error from None
                if isinstance(exc, asyncio.CancelledError):
                    raise
                err = self._core.error(exc, "Put")
                failures += 1
                if not self._core.retry.should_retry(err, failures):
                    raise err from None
                await self._sleep(self._core.retry.delay(failures))

    def get_layers(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        layer_start: int,
        layer_end: int,
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[tuple[int, list[Blob]]]:
        """Async iterator of ``(layer, [blob per key])`` in layer order; see :meth:`KVClient.get_layers`."""
        ns = self._core.namespace(namespace)
        keys = self._core.check_keys(keys)
        self._core.check_layer_range(layer_start, layer_end)
        if len(keys) <= self._core.max_keys_per_request:
            return self._get_range(ns, keys, layer_start, layer_end, timeout_s)
        return self._get_windowed(ns, keys, layer_start, layer_end, timeout_s)

    async def _get_windowed(
        self, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
    ) -> AsyncIterator[tuple[int, list[Blob]]]:
        for layer in range(start, end):
            blobs: list[Blob] = []
            for _, window in self._core.windows(keys):
                async for _, part in self._get_range(ns, window, layer, layer + 1, timeout_s):
                    blobs.extend(part)
            yield layer, blobs

    async def _get_range(
        self, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
    ) -> AsyncIterator[tuple[int, list[Blob]]]:
        if not keys:
            return
        failures = 0
        next_layer = start
        while next_layer < end:
            assembler = LayerAssembler(self._core, ns, keys, next_layer, end)
            call = self._get(
                self._core.get_request(ns, keys, next_layer, end),
                timeout=self._core.timeout(timeout_s, stream=True),
                metadata=self._core.metadata,
            )
            try:
                async for resp in call:
                    done = assembler.feed(resp)
                    if done is not None:
                        next_layer = done[0] + 1
                        failures = 0
                        yield done
                assembler.finish()
                return
            except grpc.aio.AioRpcError as exc:
                err = self._core.error(exc, "Get")
                failures += 1
                if not self._core.retry.should_retry(err, failures):
                    raise err from None
                await self._sleep(self._core.retry.delay(failures))
            finally:
                call.cancel()

    async def delete(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        *,
        num_layers: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Like :meth:`transfer.client.KVClient.delete` (pass ``num_layers``: without it every tier
        is searched)."""
        ns = self._core.namespace(namespace)
        keys = self._core.check_keys(keys)
        layers = self._core.delete_layers(num_layers)
        total = 0
        for _, window in self._core.windows(keys):
            if window:
                resp = await self._unary(
                    "Delete", pb.DeleteRequest(namespace=ns, keys=window, num_layers=layers), timeout_s
                )
                total += resp.num_deleted
        return total

    async def stats(self, *, timeout_s: float | None = None) -> StoreStats:
        return self._core.stats_result(await self._unary("Stats", pb.StatsRequest(), timeout_s))
