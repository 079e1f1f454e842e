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
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from kvstore.backends.s3 import S3Backend

_RESERVED_PORTS = frozenset({6379})

#: moto takes any credentials; tests and benchmarks all use these.
_MOTO_KEY = "test"


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


class _Started(ABC):
    """``with server:`` starts it and closes it (stop, then remove its files) on the way out."""

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _ServerProcess(_Started):
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

    def start(self) -> Self:
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


class RedisProcess(_ServerProcess):
    """``redis-server`` with persistence off, in its own temp dir, on a free port."""

    kind = "redis"

    def __init__(
        self, port: int | None = None, start_timeout_s: float = 15.0, binary: str | None = None
    ) -> None:
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
            raise ServiceError(
                f"moto server mode needs {missing}; install 'moto[server]' (scripts/bootstrap.sh)"
            )
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

    def tier_config(self, bucket: str) -> dict[str, Any]:
        """Dotted config overrides that enable a server's S3 tier on this moto, in ``bucket``."""
        return {
            "s3.enabled": True,
            "s3.endpoint_url": self.endpoint_url,
            "s3.bucket": bucket,
            "s3.access_key_id": _MOTO_KEY,
            "s3.secret_access_key": _MOTO_KEY,
        }

    def backend(self, bucket: str, **kwargs: Any) -> S3Backend:
        """An :class:`~kvstore.backends.s3.S3Backend` on this moto, in ``bucket``; ``kwargs`` tune it."""
        from kvstore.backends.s3 import S3Backend  # here, for the same reason as in client()

        return S3Backend(
            endpoint_url=self.endpoint_url,
            bucket=bucket,
            access_key_id=_MOTO_KEY,
            secret_access_key=_MOTO_KEY,
            **kwargs,
        )

    def client(self) -> Any:
        """A raw boto3 S3 client of this moto, to read or corrupt what a tier stored behind its back."""
        import boto3  # here, so Redis-only users of this module never import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=_MOTO_KEY,
            aws_secret_access_key=_MOTO_KEY,
        )

    def reset(self) -> None:
        """Drop every bucket and object (cheaper than a restart between tests)."""
        status = self._request("POST", "/moto-api/reset")
        if status != 200:
            raise ServiceError(f"moto reset answered HTTP {status}")


class RedisClusterNode(RedisProcess):
    """One ``redis-server`` in cluster mode: its own data port and cluster-bus port.

    ``cluster-port`` is given explicitly (Redis 7) because the default, port + 10000,
    may be out of range or taken for a kernel-picked port. ``nodes.conf`` lives in the
    node's directory, so :meth:`restart` brings back the same node id and it rejoins.
    """

    kind = "redis-cluster-node"

    def __init__(self, node_timeout_ms: int = 1000, **kwargs: object) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.bus_port = 0
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _spawn_and_wait(self) -> None:
        if not self.bus_port or not self._fixed_port:
            self.bus_port = free_port()
            while self.bus_port == self.port:
                self.bus_port = free_port()
        super()._spawn_and_wait()

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica always takes over, however long its master was gone (test clusters
            # are killed at random moments); a dead master's slots do not stop the others.
            "--cluster-replica-validity-factor", "0",
            "--cluster-require-full-coverage", "no",
        ]  # fmt: skip

    paused = False

    @property
    def answering(self) -> bool:
        """Running and not frozen by :meth:`pause` (a frozen node would stall every probe)."""
        return self.running and not self.paused

    def pause(self) -> None:
        super().pause()
        self.paused = True

    def resume(self) -> None:
        super().resume()
        self.paused = False

    def command(self, *args: str, timeout_s: float = 2.0) -> str:
        """Run one command through ``redis-cli`` against this node; its stdout."""
        cli = shutil.which("redis-cli") or ""
        done = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServiceError(f"redis-cli {' '.join(args)} on {self.port}: {done.stderr.strip()}")
        return done.stdout


class RedisClusterProcess(_Started):
    """A local Redis Cluster: ``masters`` masters with ``replicas`` replicas each, on loopback.

    Built the way an operator builds one: N ``redis-server --cluster-enabled yes``
    processes joined by ``redis-cli --cluster create ... --cluster-replicas R``, then
    polled (with a deadline) until every node reports ``cluster_state:ok`` and agrees
    on the slot map. ``cluster-node-timeout`` is short (1 s by default), so a killed
    master's replica is promoted within a few seconds without ``CLUSTER FAILOVER``.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.cli = shutil.which("redis-cli") or ""
        if not self.cli:
            raise ServiceError("redis-cli not found on PATH; run scripts/bootstrap.sh (apt: redis-tools)")
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters_count = masters
        self.replicas_per_master = replicas
        self.start_timeout_s = start_timeout_s
        self.nodes = [
            RedisClusterNode(node_timeout_ms=node_timeout_ms) for _ in range(masters * (1 + replicas))
        ]

    # -- addresses -----------------------------------------------------------------
    @property
    def startup_nodes(self) -> list[str]:
        """``host:port`` of every node (what a client is given to discover the cluster)."""
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://`` URL of the first node; a cluster client discovers the rest from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            done = subprocess.run(
                [self.cli, "--cluster", "create", *self.startup_nodes,
                 "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
                capture_output=True, text=True, timeout=self.start_timeout_s, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise ServiceError(
                    f"redis-cli --cluster create failed: {done.stdout[-2000:]} {done.stderr[-2000:]}"
                )
            self.wait_ok(self.start_timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _info(self, node: RedisClusterNode) -> dict[str, str]:
        out = node.command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)

    def masters(self) -> list[RedisClusterNode]:
        """The live nodes that currently say they are masters holding slots."""
        found = []
        for node in self.nodes:
            if not node.answering:
                continue
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                line = next(ln for ln in node.command("CLUSTER", "NODES").splitlines() if "myself" in ln)
                fields = line.split()
                if "master" in fields[2] and len(fields) > 8:
                    found.append(node)
        return found

    def wait_ok(self, timeout_s: float = 30.0, masters: int | None = None) -> float:
        """Poll until every live, unpaused node says ``cluster_state:ok``, all slots are assigned and
        ``masters`` (default: as created) live masters serve them; seconds waited."""
        want = masters if masters is not None else self.masters_count
        start = time.monotonic()
        deadline = start + timeout_s
        delay = 0.05
        last = ""
        while time.monotonic() < deadline:
            try:
                infos = [self._info(node) for node in self.nodes if node.answering]
                settled = all(
                    i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384" for i in infos
                )
                if settled and len(self.masters()) >= want and self._replicas_synced():
                    return time.monotonic() - start
                last = repr([i.get("cluster_state") for i in infos])
            except (ServiceError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
            time.sleep(delay)  # polling interval, bounded by the deadline above
            delay = min(delay * 2, 0.25)
        raise ServiceError(f"redis cluster not ok within {timeout_s}s: {last}")

    def _replicas_synced(self) -> bool:
        """Every live replica has finished its initial sync (else a failover now would lose data)."""
        for node in self.nodes:
            if not node.answering:
                continue
            info = dict(
                line.split(":", 1) for line in node.command("INFO", "replication").splitlines() if ":" in line
            )
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def node_for_key(self, key: str) -> RedisClusterNode:
        """The live master that serves ``key``'s slot right now."""
        asker = next(node for node in self.nodes if node.answering)
        slot = int(asker.command("CLUSTER", "KEYSLOT", key).strip())
        for node in self.masters():
            for line in node.command("CLUSTER", "NODES").splitlines():
                if "myself" not in line:
                    continue
                for rng in line.split()[8:]:
                    lo, _, hi = rng.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return node
        raise ServiceError(f"no live master serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
