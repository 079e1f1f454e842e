"""The client's operations as plain logic: generators that yield the I/O they need.

Each operation (Lookup with windowing, Put with batching and replay, Get with
layer assembly and resume, Delete, Stats, and the retry policy around every
call) is a generator. It yields an *effect* (``Call`` an RPC, ``Sleep``, open a
Get stream, ``Receive`` its next message, ...), and the front-end that drives it
carries the effect out and sends the result back in, or throws the mapped
:class:`transfer.errors.TransferError` in. Streaming operations hand finished
layers to their consumer with :class:`Emit`.

Why: the blocking :class:`transfer.rpc.client.KVClient` and the asyncio
:class:`transfer.rpc.aio_client.AsyncKVClient` differ only in *how* they wait, so
everything that decides *what* happens (how many attempts, where a Get resumes,
when a Put batch closes, what a partial answer means) lives here once; each
front-end is a dozen lines of "perform this effect". The same shape drives the
cluster client (:mod:`transfer.replicas.ops`). It also makes the logic testable
without a server: ``tests/unit/test_client_ops.py`` feeds operations scripted
results and failures.

Effects are typed: :data:`Action` is the union of what a one-server driver
performs (its ``_perform`` is one ``match`` over it, ending in
``assert_never``, so mypy reports an effect a driver forgot), :data:`Effect`
adds :class:`Emit`, and ``Op[T] = Generator[Effect, Any, T]``. A driver runs
each operation in a :class:`Loop` (or :class:`AsyncLoop`) over its ``perform``,
whose type then admits only operations yielding that driver's effects. The cluster's
effects are :data:`transfer.replicas.ops.ClusterAction`, driven by the same loops.

Front-end contract:

* :class:`Call`, :class:`SendBatch`, :class:`Receive` may fail: the driver throws
  ``core.error(rpc_error, effect.rpc)`` into the operation (outside its own
  ``except`` block, so the gRPC error does not ride along as context).
* :class:`OpenGet` returns a stream handle; the driver cancels every handle it
  opened when the operation ends or is abandoned, whatever happened
  (:class:`Cancel` releases one earlier).
* :class:`FirstItem` returns ``batch.step(0)`` (or ``await batch.astep(0)``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, NoReturn, TypeAlias, TypeVar

from kvstore.keys import Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import Blob
from transfer.errors import InvalidArgument, TransferError
from transfer.rpc.core import ClientCore, LayerAssembler, PutBatch, PutResult, StoreStats

if sys.version_info >= (3, 11):
    from typing import assert_never as assert_never
else:  # pragma: no cover - the project supports 3.10, where typing has no assert_never

    def assert_never(arg: NoReturn, /) -> NoReturn:
        raise AssertionError(f"unhandled effect {arg!r}")


T = TypeVar("T")
#: The effects one family of operations yields (besides :class:`Emit`).
E = TypeVar("E")

#: What :class:`Receive` returns once a stream has ended normally.
END: Any = object()

#: The unary RPCs an operation may :class:`Call` (the stub's method of that name).
Unary = Literal["Lookup", "Delete", "Stats"]


@dataclass(slots=True)
class Call:
    """One unary RPC (``rpc`` names the stub method) with its deadline."""

    rpc: Unary
    request: Any
    timeout: float


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class FirstItem:
    """Pull the first request of a Put batch from the caller's items (``None``: there is none)."""

    batch: PutBatch


@dataclass(slots=True)
class SendBatch:
    """One attempt of a Put stream: every request of ``batch``, then its commit."""

    rpc: ClassVar[str] = "Put"
    batch: PutBatch
    timeout: float


@dataclass(slots=True)
class OpenGet:
    """Start a Get stream; the result is a handle for :class:`Receive` and :class:`Cancel`."""

    #: The driver releases what this effect returns when the operation ends.
    opens: ClassVar[bool] = True
    request: pb.GetRequest
    timeout: float


@dataclass(slots=True)
class Receive:
    """The stream's next message, or :data:`END`."""

    rpc: ClassVar[str] = "Get"
    stream: Any


@dataclass(slots=True)
class Cancel:
    stream: Any


@dataclass(slots=True)
class Emit:
    """A result for the consumer of a streaming operation (one ``(layer, blobs)``); the drivers'
    loop hands it out, no driver performs it."""

    value: Any


#: What a one-server driver performs: its ``_perform`` matches every one of these.
Action: TypeAlias = Call | Sleep | FirstItem | SendBatch | OpenGet | Receive | Cancel
#: Everything a one-server operation yields.
Effect: TypeAlias = Action | Emit
Op = Generator[Effect, Any, T]


def advance(op: Generator[E, Any, Any], result: Any, error: BaseException | None) -> E:
    """The operation's next effect after ``result`` (or ``error``); StopIteration when it is done."""
    if error is not None:
        return op.throw(error)
    return op.send(result)


# -- retry ------------------------------------------------------------------------------------------


def retrying(
    core: ClientCore, effect: Call | SendBatch, before_retry: Callable[[TransferError], None] | None = None
) -> Op[Any]:
    """``effect``'s result, with another attempt after each failure the retry policy allows.

    ``before_retry`` sees each failure first and may raise something better
    (a Put whose source failed raises the source's own exception).
    """
    failures = 0
    while True:
        try:
            return (yield effect)
        except TransferError as err:
            if before_retry is not None:
                before_retry(err)
            failures += 1
            if not core.retry.should_retry(err, failures):
                raise
            yield Sleep(core.retry.delay(failures))


def unary(core: ClientCore, rpc: Unary, request: Any, timeout_s: float | None) -> Op[Any]:
    """One unary RPC under the retry policy (``retrying`` itself: one generator fewer per call)."""
    return retrying(core, Call(rpc, request, core.timeout(timeout_s)))


# -- the operations ---------------------------------------------------------------------------------


def lookup(
    core: ClientCore, namespace: Namespace | str, keys: Any, num_layers: int, timeout_s: float | None
) -> Op[int]:
    """Number of leading keys whose layers ``[0, num_layers)`` are all stored; one Lookup per
    window of ``max_keys_per_request`` keys, stopping at the first window not wholly present."""
    ns = core.namespace(namespace)
    keys = core.check_keys(keys)
    if num_layers < 1:
        raise InvalidArgument(f"num_layers must be >= 1, got {num_layers}")
    total = 0
    for _, window in core.windows(keys):
        if not window:
            break
        request = pb.LookupRequest(namespace=ns, keys=window, num_layers=num_layers)
        present = (yield from unary(core, "Lookup", request, timeout_s)).num_present
        total += present
        if present < len(window):
            break
    return total


def put(
    core: ClientCore, namespace: Namespace | str, source: Any, ack: str | None, timeout_s: float | None
) -> Op[PutResult]:
    """Every item of ``source`` stored, one Put stream per ``put_batch_bytes``, each replayed whole
    on a retry (puts are idempotent) and ended by its commit."""
    ns = core.namespace(namespace)
    ack_value = core.ack_value(ack) if ack is not None else core.ack
    responses: list[pb.PutResponse] = []
    while True:
        batch = PutBatch(core, ns, source, ack_value)
        if (yield FirstItem(batch)) is None:
            if batch.error is not None:  # the very first item failed: nothing to send
                raise batch.error
            break

        def source_failed(_: TransferError, batch: PutBatch = batch) -> None:
            # A failing source cancels the stream; the caller sees the source's error.
            if batch.error is not None:
                raise batch.error from None

        effect = SendBatch(batch, core.timeout(timeout_s, stream=True))
        responses.append((yield from retrying(core, effect, source_failed)))
        if batch.exhausted:
            break
    return core.put_result(responses)


def get_args(
    core: ClientCore, namespace: Namespace | str, keys: Any, layer_start: int, layer_end: int
) -> tuple[str, list[bytes]]:
    """Validated namespace and keys of a Get: checked when it is called, not at its first layer."""
    ns = core.namespace(namespace)
    keys = core.check_keys(keys)
    core.check_layer_range(layer_start, layer_end)
    return ns, keys


def get_layers(
    core: ClientCore, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
) -> Op[None]:
    """Emits ``(layer, [blob per key])`` in layer order (arguments from :func:`get_args`).

    More keys than one request may carry: one Get per (layer, window), still in
    layer order."""
    if not keys:
        return
    if len(keys) <= core.max_keys_per_request:
        yield from _get_range(core, ns, keys, start, end, timeout_s)
        return
    for layer in range(start, end):
        blobs: list[Blob] = []
        for _, window in core.windows(keys):
            for _, part in (yield from collect(_get_range(core, ns, window, layer, layer + 1, timeout_s))):
                blobs.extend(part)
        yield Emit((layer, blobs))


def _get_range(
    core: ClientCore, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
) -> Op[None]:
    """One Get stream over ``[start, end)``; after a failure the policy allows, a new stream resumes
    at the first layer not yet emitted. The retry budget is per stall, not per stream."""
    failures = 0
    next_layer = start
    while next_layer < end:
        assembler = LayerAssembler(core, ns, keys, next_layer, end)
        request = core.get_request(ns, keys, next_layer, end)
        stream = yield OpenGet(request, core.timeout(timeout_s, stream=True))
        error: TransferError | None = None
        while True:
            try:
                resp = yield Receive(stream)
            except TransferError as err:
                error = err
                break
            if resp is END:
                break
            done = assembler.feed(resp)  # a broken promise of the server raises; the driver cancels
            if done is not None:
                next_layer = done[0] + 1
                failures = 0
                yield Emit(done)
        yield Cancel(stream)
        if error is None:
            assembler.finish()
            return
        failures += 1
        if not core.retry.should_retry(error, failures):
            raise error
        yield Sleep(core.retry.delay(failures))


def collect(op: Op[Any]) -> Op[list[Any]]:
    """Run ``op`` inside another operation and return what it emitted, as a list."""
    out: list[Any] = []
    result: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                effect = advance(op, result, error)
            except StopIteration:
                return out
            result = error = None
            if isinstance(effect, Emit):
                out.append(effect.value)
                continue
            try:
                result = yield effect
            except Exception as exc:  # noqa: BLE001 - handed to op, which decides
                error = exc
    finally:
        op.close()


def delete(
    core: ClientCore, namespace: Namespace | str, keys: Any, num_layers: int | None, timeout_s: float | None
) -> Op[int]:
    ns = core.namespace(namespace)
    keys = core.check_keys(keys)
    layers = core.delete_layers(num_layers)
    total = 0
    for _, window in core.windows(keys):
        if window:
            request = pb.DeleteRequest(namespace=ns, keys=window, num_layers=layers)
            total += (yield from unary(core, "Delete", request, timeout_s)).num_deleted
    return total


def stats(core: ClientCore, timeout_s: float | None) -> Op[StoreStats]:
    return core.stats_result((yield from unary(core, "Stats", pb.StatsRequest(), timeout_s)))


# -- the operations as an object (what transfer.rpc.api calls) ------------------------------------------


class ServerOps:
    """The operations above bound to one server's :class:`ClientCore`: the
    :class:`transfer.rpc.api.Operations` of :class:`transfer.rpc.client.KVClient` and
    :class:`transfer.rpc.aio_client.AsyncKVClient`."""

    __slots__ = ("core",)

    def __init__(self, core: ClientCore) -> None:
        self.core = core

    def lookup(
        self, namespace: Namespace | str, keys: Any, num_layers: int, timeout_s: float | None
    ) -> Op[int]:
        return lookup(self.core, namespace, keys, num_layers, timeout_s)

    def put(
        self, namespace: Namespace | str, source: Any, ack: str | None, timeout_s: float | None
    ) -> Op[PutResult]:
        return put(self.core, namespace, source, ack, timeout_s)

    def get_layers(
        self, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
    ) -> Op[None]:
        return get_layers(self.core, ns, keys, start, end, timeout_s)

    def delete(
        self, namespace: Namespace | str, keys: Any, num_layers: int | None, timeout_s: float | None
    ) -> Op[int]:
        return delete(self.core, namespace, keys, num_layers, timeout_s)

    def stats(self, timeout_s: float | None) -> Op[StoreStats]:
        return stats(self.core, timeout_s)


# -- the drivers' loop --------------------------------------------------------------------------------


def _cancel(stream: Any) -> Any:
    return stream.cancel()


class _Done:
    """The operation returned (its value is in :attr:`Runner.value`)."""


DONE = _Done()


class Runner(Generic[E, T]):
    """One operation being driven: its next effect, what came back, and the handles to release.

    The blocking and asyncio drivers below differ only in whether they await.
    """

    __slots__ = ("op", "map_error", "result", "error", "handles", "value")

    def __init__(
        self, op: Generator[E | Emit, Any, T], map_error: Callable[[E, BaseException], BaseException | None]
    ) -> None:
        self.op = op
        self.map_error = map_error
        self.result: Any = None
        self.error: BaseException | None = None
        self.handles: list[Any] = []
        self.value: T | None = None

    def next(self) -> E | Emit | _Done:
        """The next effect, or :data:`DONE` (the operation's return value is then in ``value``)."""
        try:
            effect = advance(self.op, self.result, self.error)
        except StopIteration as stop:
            self.value = stop.value
            return DONE
        self.result = self.error = None
        return effect

    def answered(self, effect: E, result: Any) -> None:
        self.result = result
        if getattr(effect, "opens", False):
            self.handles.append(result)

    def failed(self, effect: E, exc: BaseException) -> None:
        """Keep the mapped error for the operation (thrown in by :meth:`next`, outside the driver's
        ``except`` block); re-raise what is not the operation's to handle."""
        error = self.map_error(effect, exc)
        if error is None:
            raise exc
        self.error = error


class Loop(Generic[E]):
    """The blocking drivers' loop, bound to one front-end's ``perform`` (whose type fixes the effects
    ``E`` its operations may yield: an operation yielding anything else does not type-check).

    ``map_error(effect, exc)`` turns an exception of ``perform`` into the error to
    throw into the operation, or returns None to let it propagate. What an
    effect marked ``opens`` returned (a stream) is handed to ``release`` when the
    operation ends, fails or its consumer stops early.
    """

    __slots__ = ("perform", "map_error", "release")

    def __init__(
        self,
        perform: Callable[[E], Any],
        map_error: Callable[[E, BaseException], BaseException | None],
        release: Callable[[Any], Any] = _cancel,
    ) -> None:
        self.perform = perform
        self.map_error = map_error
        self.release = release

    def drive(self, op: Generator[E | Emit, Any, T]) -> Generator[Any, None, T]:
        """Run ``op``; yields what it emits and returns its value."""
        runner = Runner(op, self.map_error)
        perform = self.perform
        try:
            while not isinstance(effect := runner.next(), _Done):
                if isinstance(effect, Emit):
                    yield effect.value
                    continue
                try:
                    runner.answered(effect, perform(effect))
                except Exception as exc:
                    runner.failed(effect, exc)
            return runner.value  # type: ignore[return-value]
        finally:
            op.close()
            for handle in runner.handles:
                self.release(handle)

    def run(self, op: Generator[E | Emit, Any, T]) -> T:
        """:meth:`drive` for an operation that emits nothing: its return value (the same loop without
        a generator around it: unary calls are the hot path)."""
        runner = Runner(op, self.map_error)
        perform = self.perform
        try:
            while not isinstance(effect := runner.next(), _Done):
                if isinstance(effect, Emit):
                    raise TypeError(
                        f"operation emitted {effect.value!r}; use drive() for streaming operations"
                    )
                try:
                    runner.answered(effect, perform(effect))
                except Exception as exc:
                    runner.failed(effect, exc)
            return runner.value  # type: ignore[return-value]
        finally:
            op.close()
            for handle in runner.handles:
                self.release(handle)


class AsyncLoop(Generic[E]):
    """:class:`Loop` for the asyncio front-ends: ``perform`` (and ``release``, where it returns an
    awaitable) is awaited; ``map_error`` also sees ``asyncio.CancelledError``."""

    __slots__ = ("perform", "map_error", "release")

    def __init__(
        self,
        perform: Callable[[E], Awaitable[Any]],
        map_error: Callable[[E, BaseException], BaseException | None],
        release: Callable[[Any], Any] = _cancel,
    ) -> None:
        self.perform = perform
        self.map_error = map_error
        self.release = release

    async def drive(self, op: Generator[E | Emit, Any, T], out: list[T] | None = None) -> AsyncIterator[Any]:
        """Run ``op``, yielding what it emits; its return value is appended to ``out`` (an async
        generator cannot return one)."""
        runner = Runner(op, self.map_error)
        perform = self.perform
        try:
            while not isinstance(effect := runner.next(), _Done):
                if isinstance(effect, Emit):
                    yield effect.value
                    continue
                try:
                    runner.answered(effect, await perform(effect))
                except BaseException as exc:
                    runner.failed(effect, exc)
            if out is not None:
                out.append(runner.value)  # type: ignore[arg-type]
        finally:
            op.close()
            for handle in runner.handles:
                if inspect.isawaitable(done := self.release(handle)):
                    await done

    async def run(self, op: Generator[E | Emit, Any, T]) -> T:
        """:meth:`drive` for an operation that emits nothing: its return value."""
        out: list[T] = []
        async for value in self.drive(op, out):
            raise TypeError(f"operation emitted {value!r}; use adrive() for streaming operations")
        return out[0]


# The loops as functions (scripted tests drive operations with a plain ``perform``).


def drive(
    op: Generator[Any, Any, T],
    perform: Callable[[Any], Any],
    map_error: Callable[[Any, BaseException], BaseException | None],
    release: Callable[[Any], Any] = _cancel,
) -> Generator[Any, None, T]:
    """:meth:`Loop.drive`."""
    return Loop(perform, map_error, release).drive(op)


def run(
    op: Generator[Any, Any, T],
    perform: Callable[[Any], Any],
    map_error: Callable[[Any, BaseException], BaseException | None],
    release: Callable[[Any], Any] = _cancel,
) -> T:
    """:meth:`Loop.run`."""
    return Loop(perform, map_error, release).run(op)


def adrive(
    op: Generator[Any, Any, T],
    perform: Callable[[Any], Awaitable[Any]],
    map_error: Callable[[Any, BaseException], BaseException | None],
    release: Callable[[Any], Any] = _cancel,
    out: list[T] | None = None,
) -> AsyncIterator[Any]:
    """:meth:`AsyncLoop.drive`."""
    return AsyncLoop(perform, map_error, release).drive(op, out)


async def arun(
    op: Generator[Any, Any, T],
    perform: Callable[[Any], Awaitable[Any]],
    map_error: Callable[[Any, BaseException], BaseException | None],
    release: Callable[[Any], Any] = _cancel,
) -> T:
    """:meth:`AsyncLoop.run`."""
    return await AsyncLoop(perform, map_error, release).run(op)
