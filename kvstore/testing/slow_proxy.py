"""A TCP proxy on loopback that can slow the server-to-client direction: a slow network, on demand.

Used to make a store load take a known, long time (so a test can see what the engine
does meanwhile) without a server that misbehaves. Bytes are forwarded unchanged;
``delay_s`` is slept before each forwarded read of at most ``chunk`` bytes, so a
transfer of N bytes takes about ``N / chunk * delay_s`` seconds. Loopback only.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class SlowProxy:
    """``127.0.0.1:<port>`` -> ``target``; ``delay_s`` may be changed at any time."""

    def __init__(self, target: str, *, delay_s: float = 0.0, chunk: int = 64 << 10) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay_s = delay_s
        self.chunk = chunk
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="slow-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                if slow and self.delay_s > 0:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> SlowProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
