"""Limits on the Put and Get streams a server keeps open, so no caller can starve the rest.

The asyncio server holds no thread for a stream that waits on its client, but
each open stream still costs memory (a Put buffers its blobs until the commit)
and a slot of the client's connection. :class:`StreamLimiter` caps the streams
open per tenant and per connection (gRPC peer) and says, when it refuses one,
which limit was hit and which config field raises it. :class:`StreamClock`
is the idle and total timeout of one stream (``server.stream_idle_timeout_s``,
``server.stream_timeout_s``): it tells a client that stopped sending or reading
from a slow backend, because only waits on the client are timed.
:class:`HeapTrimmer` gives back the memory that streams which ended early held.

Everything here runs on the server's event loop thread, so there are no locks (the
trimmer's one call into the allocator runs on a worker thread and touches nothing here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from kvstore.config import MiB, ServerConfig
from kvstore.errors import StreamLimitExceeded, StreamTimeout
from kvstore.malloc_tuning import release_free_memory

log = logging.getLogger("kvstore.server")

#: What abandoned streams must have held, together, before the heap is trimmed for them.
TRIM_MIN_BYTES = 64 * MiB
#: Seconds from the stream that crossed TRIM_MIN_BYTES to the trim.
TRIM_DELAY_S = 1.0
#: Fewest seconds between two trims.
TRIM_INTERVAL_S = 5.0


class StreamLimiter:
    """Counts open streams per tenant and per peer; :meth:`open` refuses one past either limit."""

    def __init__(self, limits: ServerConfig) -> None:
        self.per_tenant = limits.max_streams_per_tenant
        self.per_peer = limits.max_streams_per_peer
        self.tenants: Counter[str] = Counter()
        self.peers: Counter[str] = Counter()

    @contextmanager
    def open(self, method: str, tenant: str | None, peer: str) -> Iterator[None]:
        """Hold one stream slot of ``tenant`` (None: auth off, no tenant limit) and ``peer``."""
        if tenant is not None and self.tenants[tenant] >= self.per_tenant:
            raise StreamLimitExceeded(
                f"{method} refused: tenant {tenant!r} already has {self.tenants[tenant]} Put/Get streams open "
                f"(server.max_streams_per_tenant = {self.per_tenant}); finish or cancel some, or raise "
                "server.max_streams_per_tenant"
            )
        if self.peers[peer] >= self.per_peer:
            raise StreamLimitExceeded(
                f"{method} refused: this connection ({peer}) already has {self.peers[peer]} Put/Get streams "
                f"open (server.max_streams_per_peer = {self.per_peer}); finish or cancel some, open another "
                "connection, or raise server.max_streams_per_peer"
            )
        if tenant is not None:
            self.tenants[tenant] += 1
        self.peers[peer] += 1
        try:
            yield
        finally:
            self.peers[peer] -= 1
            if not self.peers[peer]:
                del self.peers[peer]
            if tenant is not None:
                self.tenants[tenant] -= 1
                if not self.tenants[tenant]:
                    del self.tenants[tenant]

    def open_streams(self) -> int:
        return sum(self.peers.values())


class StreamClock:
    """The idle and total deadlines of one stream, armed only while it waits on its client.

    A Put reads its requests under :meth:`watch` and calls :meth:`touch` after
    each message; a Get does the same around each write and sets :attr:`busy`
    while it reads the tiers (the server's own time is not counted as idle).
    :meth:`expired` is the :class:`StreamTimeout` naming the config field.

    ``touch`` is one store of the loop's clock: a timer is re-armed only when it
    fires early, not per message (re-arming an ``asyncio.timeout`` per message cost
    a few microseconds on every 64 KiB Put message).
    """

    def __init__(self, method: str, limits: ServerConfig) -> None:
        self.method = method
        self.idle_s = limits.stream_idle_timeout_s
        self.total_s = limits.stream_timeout_s
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self.end = self.last + self.total_s
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._fired = False
        self._on_expiry: Callable[[], None] | None = None
        #: Set while the server itself works on the stream; the idle clock does not run then.
        self.busy = False

    def deadline(self) -> float:
        return min(self.last + self.idle_s, self.end)

    def touch(self) -> None:
        """The client just did something (sent a message)."""
        self.last = self._loop.time()

    @asynccontextmanager
    async def watch(self, on_expiry: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Watch the deadlines while the body runs.

        Without ``on_expiry`` the current task is cancelled once the client has been
        idle past a deadline, and the body ends with TimeoutError (a Put waiting for
        its next message). With it, ``on_expiry`` is called instead and :attr:`fired`
        set; the body checks it (a Get whose write waits on flow control: a blocked
        write cannot be abandoned, see kvstore.server).
        """
        self._task = asyncio.current_task()
        self._on_expiry = on_expiry
        self.last = self._loop.time()
        self._timer = self._loop.call_at(self.deadline(), self._check)
        try:
            yield
        except asyncio.CancelledError:
            if self._fired and self._task is not None and self._task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._timer.cancel()

    @property
    def fired(self) -> bool:
        return self._fired

    def _check(self) -> None:
        now = self._loop.time()
        if self.busy:  # the server is working (a tier read): not the client's time
            self.last = now
        due = self.deadline()
        if now >= due - 1e-3:
            self._fired = True
            if self._on_expiry is not None:
                self._on_expiry()
            else:
                assert self._task is not None
                self._task.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)

    def expired(self, doing: str) -> StreamTimeout:
        if self._loop.time() >= self.end - 1e-3:
            return StreamTimeout(
                f"{self.method} stream ran longer than server.stream_timeout_s ({self.total_s:g} s); send "
                "smaller batches or raise server.stream_timeout_s"
            )
        return StreamTimeout(
            f"{self.method} stream idle: the client was {doing} for server.stream_idle_timeout_s "
            f"({self.idle_s:g} s); the server ended the stream (raise server.stream_idle_timeout_s if the "
            "client is legitimately slow)"
        )


class HeapTrimmer:
    """Gives the heap pages that streams which ended early held back to the OS, in bulk.

    The tuned allocator (kvstore.malloc_tuning) keeps freed multi-MiB buffers for reuse,
    which steady traffic wants; but what a burst of abandoned streams held (Gets
    whose readers stalled and left, cancelled or refused Puts) then stays resident:
    100 slow readers left 800 MiB of RSS behind them (bench/slow_readers_memory.py).
    Each such stream reports what it held (:meth:`abandoned`); once that adds up
    to :data:`TRIM_MIN_BYTES`, one ``malloc_trim`` runs on a worker thread
    :data:`TRIM_DELAY_S` later (the rest of the burst ends meanwhile and shares it),
    and never sooner than :data:`TRIM_INTERVAL_S` after the previous one: a trim
    walks every free chunk of the heap under the arena lock (0.2-0.5 s with 512
    free 1 MiB holes on the 2-core VM), so small errors never pay for one.
    """

    def __init__(self, executor: Executor, counters: Any, enabled: bool = True) -> None:
        self.executor = executor
        self.counters = counters
        self.enabled = enabled
        #: Bytes the streams that ended early held, since the last trim.
        self.pending_bytes = 0
        self._scheduled = False
        self._last = -math.inf

    def abandoned(self, nbytes: int) -> None:
        """A stream that held about ``nbytes`` of buffers ended without finishing (event loop only)."""
        if not self.enabled or nbytes <= 0:
            return
        self.pending_bytes += nbytes
        if self._scheduled or self.pending_bytes < TRIM_MIN_BYTES:
            return
        loop = asyncio.get_running_loop()
        self._scheduled = True
        loop.call_at(max(loop.time() + TRIM_DELAY_S, self._last + TRIM_INTERVAL_S), self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._last = loop.time()
        nbytes, self.pending_bytes = self.pending_bytes, 0
        with contextlib.suppress(RuntimeError):  # the server is stopping: its pool is closed
            loop.run_in_executor(self.executor, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        started = time.perf_counter()
        if release_free_memory():
            self.counters.add(heap_trims=1)
            log.info(
                "gave free heap pages back to the OS after streams that ended early (about %d MiB of "
                "their buffers) in %.0f ms",
                nbytes >> 20,
                (time.perf_counter() - started) * 1e3,
            )
