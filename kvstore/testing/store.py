"""A real kvstore gRPC server for tests and benchmarks, in-process or as a subprocess.

Shared by the test suite (tests/fixtures/store.py wraps these in pytest fixtures)
and bench/, so neither imports the other:

- :func:`store_config`: a StoreConfig on port 0 with RAM + disk under a directory.
- :func:`start_server_process`: ``python -m kvstore serve`` as a child process,
  ready once the standard health service answers SERVING; ``.kill()`` is a
  SIGKILL (crash), ``.stop()`` a SIGTERM (graceful). Use it for restart tests.
- :func:`make_blob`: an integrity-sealed blob, as an encoder would produce.
- :func:`serving`: an in-process server for a ``with`` block (stopped on the way out).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore import integrity
from kvstore.config import StoreConfig, load_config
from kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

if TYPE_CHECKING:
    from kvstore.server import ServerHandle

#: The source tree this package was imported from (child servers run from it).
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_blob(payload_bytes: int | bytes) -> bytes:
    """A sealed blob: ``payload || XXH3-64(payload)``; an int gives random bytes of that length."""
    payload = os.urandom(payload_bytes) if isinstance(payload_bytes, int) else bytes(payload_bytes)
    return integrity.seal(payload)


def committed(requests: Iterable[Any], ack: int = 0) -> Iterator[Any]:
    """A raw Put request stream ended by its commit message (PutRequest.commit), as every Put must be."""
    yield from requests
    yield kvstore_pb2.PutRequest(commit=True, ack=ack)


def store_config(tmp_path: Path, **overrides: Any) -> StoreConfig:
    """A test config: port 0, RAM + disk under ``tmp_path``, environment ignored.

    ``overrides`` are dotted fields, e.g. ``**{"server.max_blob_bytes": 1 << 20}``.
    """
    base = {
        "server.port": 0,
        "server.workers": 8,
        "memory.max_bytes": 256 << 20,
        "disk.path": str(tmp_path / "disk"),
        "disk.fsync": "never",
    }
    base.update(overrides)
    return load_config(None, environ={}, overrides=base)


#: Overrides for a server whose reads really reach its remote tiers: a 64 KiB RAM tier, no disk.
REMOTE_READS: dict[str, Any] = {"memory.max_bytes": 64 * 1024, "disk.enabled": False}


@contextlib.contextmanager
def serving(config: StoreConfig, **kwargs: Any) -> Iterator[ServerHandle]:
    """An in-process server (``kvstore.server.serve(config, **kwargs)``) for a ``with`` block.

    It is stopped at once (grace 0) on the way out, whatever happened inside: a test's
    server must never outlive it.
    """
    from kvstore.server import serve  # here: bench/ and fixtures import this module cheaply

    handle = serve(config, **kwargs)
    try:
        yield handle
    finally:
        handle.stop(grace=0)


def wait_serving(
    target: str,
    deadline_s: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll the standard health service until it answers SERVING (no fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    last: str = "no answer"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"kvstore serve exited with code {proc.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.05)
    raise TimeoutError(f"kvstore at {target} not SERVING after {deadline_s}s (last: {last})")


class ServerProcess:
    """A ``kvstore serve`` child process; see :func:`start_server_process`."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_path

    def stub(self) -> kvstore_pb2_grpc.KVStoreStub:
        return kvstore_pb2_grpc.KVStoreStub(grpc.insecure_channel(self.target))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as in a crash: nothing is flushed or drained."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM: graceful shutdown; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start_server_process(
    config_or_args: str | os.PathLike[str] | Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    deadline_s: float = 60.0,
    workdir: str | os.PathLike[str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    cpus: frozenset[int] | None = None,
) -> ServerProcess:
    """Run ``python -m kvstore serve`` and return once it is SERVING.

    ``config_or_args`` is a config file path or a list of ``serve`` flags. Unless
    the flags say otherwise the server binds a free port (``--port 0``); pass
    ``--port N`` to restart a server on the port of a killed one. ``credentials``:
    channel credentials for the readiness probe of a TLS server. ``cpus``: the
    CPUs the server may run on (benchmarks keep it off the model's core).
    """
    if config_or_args is None:
        args: list[str] = []
    elif isinstance(config_or_args, (str, os.PathLike)):
        args = ["--config", os.fspath(config_or_args)]
    else:
        args = list(config_or_args)
    if "--port" not in args:
        args += ["--port", "0"]
    import tempfile

    run_dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kvstore-proc-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ready = run_dir / f"ready-{time.monotonic_ns()}.json"
    log_path = run_dir / f"serve-{time.monotonic_ns()}.log"
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else ""
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--ready-file", str(ready), "--grace", "2", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=str(REPO_ROOT),
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    deadline = time.monotonic() + deadline_s
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"kvstore serve exited with code {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"kvstore serve not ready after {deadline_s}s:\n{log_path.read_text()}")
        time.sleep(0.02)
    port = int(json.loads(ready.read_text())["port"])
    handle = ServerProcess(proc, port, log_path)
    try:
        wait_serving(handle.target, max(1.0, deadline - time.monotonic()), proc, credentials)
    except BaseException:
        handle.kill()
        raise
    return handle
