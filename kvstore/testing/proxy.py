"""A TCP proxy that makes a real server look slow, not dead: for tests of slow-but-healthy tiers.

A frozen server (SIGSTOP) answers nothing; a loaded one answers every request, some of them
late. The second is what opened the circuit breaker of a healthy S3 tier in issue 24 (two
reads past the 0.35 s read timeout). :class:`DelayProxy` sits between a tier and its real
server (Redis, the S3 server) on a free loopback port and forwards every byte both ways;
while ``slow_s`` and ``slow_every_s`` are set it holds back one reply chunk every
``slow_every_s`` seconds for ``slow_s`` seconds, so slow calls are isolated and the rest
flow at full speed. Everything else (connection handling, protocol, data) is the real
server's.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from kvstore.testing.services import ServiceError


class DelayProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; see the module docstring. Close it when done."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        #: How long a slowed reply chunk is held back (0: none is).
        self.slow_s = 0.0
        #: At most one reply chunk is slowed per this many seconds (0: none is).
        self.slow_every_s = 0.0
        #: Reply chunks held back so far.
        self.num_slowed = 0
        self._lock = threading.Lock()
        self._last_slowed = 0.0
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name="delay-proxy", daemon=True)
        self._acceptor.start()

    def slow(self, slow_s: float, every_s: float) -> None:
        """From now on hold back one reply chunk every ``every_s`` seconds for ``slow_s`` seconds."""
        with self._lock:
            self.slow_s, self.slow_every_s = slow_s, every_s

    def fast(self) -> None:
        """Forward everything at once again."""
        self.slow(0.0, 0.0)

    def _delay(self) -> float:
        with self._lock:
            if not (self.slow_s and self.slow_every_s):
                return 0.0
            now = time.monotonic()
            if now - self._last_slowed < self.slow_every_s:
                return 0.0
            self._last_slowed = now
            self.num_slowed += 1
            return self.slow_s

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, replies), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                delay = self._delay() if replies else 0.0
                if delay and self._closed.wait(delay):  # the held-back chunk (ends early on close)
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._sockets.difference_update((src, dst))

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._acceptor.join(timeout=5.0)
        if self._acceptor.is_alive():
            raise ServiceError("delay proxy: the accept thread did not stop")

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
