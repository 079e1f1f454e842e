"""Real ``redis-server`` and S3 (moto server mode) processes on free loopback ports.

Tests and benchmarks need real servers they can also *kill*: fault tests take a
tier away mid-run and bring it back on the same port, which an in-process fake
cannot model. Each server is a child process that

* binds 127.0.0.1 on a port found free at start (never 6379, never a fixed one),
* is polled for readiness with a deadline instead of a blind sleep,
* dies with the thread that started it on Linux (``PR_SET_PDEATHSIG`` through
  ``setpriv``; start servers from a long-lived thread) and at interpreter exit, so
  a crashed test run leaves nothing behind,
* offers ``stop()`` (graceful), ``kill()`` (SIGKILL, as in a crash) and
  ``restart()`` (same port, so clients built with the old URL reconnect).

A restarted server is empty: Redis runs with persistence off and moto keeps its
state in memory. That is what a fault test wants (nothing stale can be served).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType

_RESERVED_PORTS = frozenset({6379})


class ServiceError(RuntimeError):
    """A test server could not be started (binary missing, never became ready)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def _with_parent_death_signal(command: list[str]) -> list[str]:
    """Have Linux SIGKILL the server when the thread that started it dies (no orphans after a crash).

    ``setpriv`` (util-linux) sets ``PR_SET_PDEATHSIG`` and then execs the server, so the
    server keeps its own pid; where it is missing, the atexit hook below still cleans up.
    """
    setpriv = shutil.which("setpriv")
    if sys.platform.startswith("linux") and setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *command]
    return command


_LIVE: weakref.WeakSet[_ServerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()


class _ServerProcess(ABC):
    """Shared lifecycle of a server child process; subclasses say how to run and probe it."""

    kind = "server"

    def __init__(self, port: int | None = None, start_timeout_s: float = 30.0) -> None:
        if port in _RESERVED_PORTS:
            raise ValueError(f"port {port} is reserved for the machine's own service")
        self._fixed_port = port is not None
        self.port = port or 0
        self.start_timeout_s = start_timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix=f"kvstore-{self.kind}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

    # -- to implement --------------------------------------------------------------
    @abstractmethod
    def _command(self) -> list[str]: ...

    @abstractmethod
    def _probe(self) -> bool:
        """True once the server answers a real request."""

    # -- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> _ServerProcess:
        """Start and wait until ready; picks another free port if the chosen one was taken."""
        if self.running:
            return self
        attempts = 1 if self._fixed_port else 3
        last_error: ServiceError | None = None
        for _ in range(attempts):
            if not self._fixed_port or not self.port:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except ServiceError as exc:
                last_error = exc
                self._terminate(signal.SIGKILL)
        if last_error is None:  # pragma: no cover - loop always runs once
            raise ServiceError(f"{self.kind}: not started")
        raise last_error

    def _spawn_and_wait(self) -> None:
        log_path = self._dir / f"{self.kind}.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            _with_parent_death_signal(self._command()),
            cwd=self._dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        _LIVE.add(self)
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.01
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceError(f"{self.kind} exited with {self._proc.returncode}: {self._log_tail()}")
            if self._probe():
                return
            time.sleep(delay)  # polling interval, bounded by the deadline above
            delay = min(delay * 2, 0.1)
        raise ServiceError(
            f"{self.kind} on port {self.port} not ready within {self.start_timeout_s}s: {self._log_tail()}"
        )

    def _log_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self._dir / f"{self.kind}.log").read_text(errors="replace")[-limit:]
        return ""

    def _terminate(self, sig: int, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)  # a paused server must wake up to handle SIGTERM
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM, then SIGKILL if it lingers)."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Crash the server (SIGKILL): open connections see resets, new ones are refused."""
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers, like a hung host."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (after a kill or stop); waits until ready."""
        if self.running:
            self.stop()
        self._fixed_port = True
        self.start()

    def close(self) -> None:
        """Stop and remove the working directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> _ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisProcess(_ServerProcess):
    """``redis-server`` with persistence off, in its own temp dir, on a free port."""

    kind = "redis"

    def __init__(self, port: int | None = None, start_timeout_s: float = 15.0, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("redis-server") or ""
        if not self.binary:
            raise ServiceError("redis-server not found on PATH; run scripts/bootstrap.sh (apt: redis-server)")
        super().__init__(port, start_timeout_s)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip

    def _probe(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class S3Process(_ServerProcess):
    """moto in server mode: a real HTTP server speaking the S3 API, in a child process.

    State is in memory, so a restart starts with no buckets; :meth:`reset` empties
    a running server (moto's ``/moto-api/reset``).
    """

    kind = "s3"

    def __init__(self, port: int | None = None, start_timeout_s: float = 60.0) -> None:
        missing = [m for m in ("moto.server", "flask", "flask_cors") if importlib.util.find_spec(m) is None]
        if missing:
            raise ServiceError(f"moto server mode needs {missing}; install 'moto[server]' (scripts/bootstrap.sh)")
        super().__init__(port, start_timeout_s)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _request(self, method: str, path: str, timeout_s: float = 2.0) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def _probe(self) -> bool:
        try:
            return self._request("GET", "/moto-api/data.json") == 200
        except (OSError, http.client.HTTPException):
            return False

    def reset(self) -> None:
        """Drop every bucket and object (cheaper than a restart between tests)."""
        status = self._request("POST", "/moto-api/reset")
        if status != 200:
            raise ServiceError(f"moto reset answered HTTP {status}")
