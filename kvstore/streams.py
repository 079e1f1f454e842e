"""Limits on the Put and Get streams a server keeps open, so no caller can starve the rest.

The asyncio server holds no thread for a stream that waits on its client, but
each open stream still costs memory (a Put buffers its blobs until the commit)
and a slot of the client's connection. :class:`StreamLimiter` caps the streams
open per tenant and per connection (gRPC peer) and says, when it refuses one,
which limit was hit and which config field raises it. :class:`StreamClock`
is the idle and total timeout of one stream (``server.stream_idle_timeout_s``,
``server.stream_timeout_s``): it tells a client that stopped sending or reading
from a slow backend, because only waits on the client are timed.

Everything here runs on the server's event loop thread, so there are no locks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from kvstore.config import ServerConfig
from kvstore.errors import StreamLimitExceeded, StreamTimeout


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
