"""The asyncio front-end of :class:`transfer.rpc.client.KVClient` (``grpc.aio``).

Same constructor options, same methods (:class:`transfer.rpc.api.AsyncApi`), same
errors, same retry rules: the operations are those of :mod:`transfer.rpc.ops`
(validation, retry, windowing, Put batching, Get assembly) over
:class:`transfer.rpc.core.ClientCore`; this module only awaits their effects. Use
it from an event loop that serves many requests (a decode worker running several
sequences); use :class:`KVClient` everywhere else.

``put`` takes a plain or an async iterable. A plain one is pulled on the event
loop, so a producer that encodes on the CPU should be an async generator that
hands encoding to a thread (``asyncio.to_thread``) if the loop must stay live.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
import grpc.aio

from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from transfer.errors import TransferError, Unavailable
from transfer.rpc import ops
from transfer.rpc.api import AsyncApi
from transfer.rpc.client import rpc_error, unary_methods
from transfer.rpc.core import ClientCore

T = TypeVar("T")


class AsyncKVClient(AsyncApi[ops.Action]):
    """Non-blocking client of a kvstore server; create it inside the event loop that uses it.
    Its methods are those of :class:`transfer.rpc.api.AsyncApi`."""

    def __init__(self, target: str, **options: Any) -> None:
        self._core = ClientCore(target, **options)
        self._ops = ops.ServerOps(self._core)
        core = self._core
        if core.credentials is not None:
            self._channel = grpc.aio.secure_channel(
                target, core.credentials, options=core.options, interceptors=core.interceptors or None
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                target, options=core.options, interceptors=core.interceptors or None
            )
        self._unary = unary_methods(pb_grpc.KVStoreStub(self._channel))
        self._put, self._get = core.bulk_methods(self._channel)

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

    # -- the effects of transfer.rpc.ops, awaited --------------------------------------------------------

    async def _perform(self, effect: ops.Action) -> Any:
        match effect:
            case ops.Receive():
                resp = await effect.stream.read()
                return ops.END if resp is grpc.aio.EOF else resp
            case ops.Call():
                return await self._unary[effect.rpc](
                    effect.request, timeout=effect.timeout, metadata=self._core.metadata
                )
            case ops.OpenGet():
                return self._get(effect.request, timeout=effect.timeout, metadata=self._core.metadata)
            case ops.Cancel():
                return effect.stream.cancel()
            case ops.FirstItem():
                return await effect.batch.astep(0)
            case ops.SendBatch():
                return await self._put(
                    effect.batch.aattempt(), timeout=effect.timeout, metadata=self._core.metadata
                )
            case ops.Sleep():
                return await asyncio.sleep(effect.seconds)
            case _:
                ops.assert_never(effect)

    def _error(self, effect: ops.Action, exc: BaseException) -> BaseException | None:
        if isinstance(effect, ops.SendBatch) and effect.batch.error is not None:
            # A failing request iterator cancels the call (CancelledError here): the operation
            # raises the iterator's own error instead.
            return TransferError("Put: the items' iterator failed")
        return rpc_error(self._core, effect, exc) if isinstance(exc, grpc.aio.AioRpcError) else None

    async def _run(self, op: ops.Op[T]) -> T:
        return await ops.AsyncLoop(self._perform, self._error).run(op)

    def _drive(self, op: ops.Op[None]) -> AsyncIterator[Any]:
        return ops.AsyncLoop(self._perform, self._error).drive(op)
