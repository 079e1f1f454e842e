"""A vLLM engine in a child process, driven over a local socket (tests and benchmarks).

vLLM keeps one KV connector per process (``ensure_kv_transfer_initialized``), so
two engines that must not share a connector (the writer and the reader of a
prefix) need two processes. :class:`EngineProcess` starts a fresh interpreter
(``python -m transfer.vllm.harness``, not multiprocessing's spawn, which would
re-import the caller's main module: a numba/llvmlite imported before vLLM's
worker starts breaks vLLM's kernel registry scan), builds ``vllm.LLM`` there once, and then serves
``generate`` / ``stats`` / ``metrics`` calls until :meth:`EngineProcess.close`.
The engine core runs in that child's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so the connector's process-wide totals (:data:`transfer.vllm.connector.TOTALS`)
describe exactly this engine. Offline: the model is a local directory, and
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set in the child.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from typing import Any

CHILD_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    num_cached_tokens: int | None
    seconds: float


def connector_config(
    target: str, *, profile: str = "lossless", policy: str = "recompute", **extra: Any
) -> dict[str, Any]:
    """kv_transfer_config (as keyword arguments of ``KVTransferConfig``) for the kvstore connector."""
    return {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "transfer.vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": policy,
        "kv_connector_extra_config": {"target": target, "profile": profile, **extra},
    }


def _child(conn: Any) -> None:
    engine_kwargs, kv = conn.recv()
    try:
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig

        t0 = time.perf_counter()
        kwargs = dict(engine_kwargs)
        if kv is not None:
            kwargs["kv_transfer_config"] = KVTransferConfig(**kv)
        llm = LLM(**kwargs)
        conn.send(("ok", time.perf_counter() - t0))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "stop":
                conn.send(("ok", None))
                return
            if cmd == "generate":
                prompts, max_tokens = args
                params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                out = []
                for ids in prompts:  # one at a time: each figure is one request's latency
                    t = time.perf_counter()
                    res = llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
                    dt = time.perf_counter() - t
                    comp = res.outputs[0]
                    out.append((list(comp.token_ids), comp.text, res.num_cached_tokens, dt))
                conn.send(("ok", out))
            elif cmd == "interleave":
                conn.send(("ok", _interleave(llm, SamplingParams, *args)))
            elif cmd == "stats":
                mod = sys.modules.get("transfer.vllm.connector")
                conn.send(("ok", mod.TOTALS.snapshot() if mod is not None else None))
            elif cmd == "metrics":
                metrics = {}
                for m in llm.get_metrics():
                    if m.name.startswith(args):
                        metrics[m.name] = (
                            getattr(m, "value", None) if hasattr(m, "value") else getattr(m, "count", None)
                        )
                conn.send(("ok", metrics))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


def _interleave(
    llm: Any, sampling: Any, running: list[int], running_tokens: int, arriving: list[int], after_steps: int
) -> dict[str, Any]:
    """Step the engine by hand: ``running`` decodes; after ``after_steps`` of its steps, ``arriving``
    (a prompt whose prefix is in the store) is added. Every step's wall time is recorded with the
    phase it started in: ``before`` the arrival, ``loading`` (the arriving request's load not done:
    the connector's ``loads`` total, in this process, has not moved yet), ``joining`` (loaded, no
    token yet: its suffix is prefilled) or ``after``."""
    from transfer.vllm.metrics import TOTALS

    engine = llm.llm_engine
    params = sampling(temperature=0.0, max_tokens=running_tokens, ignore_eos=True)
    engine.add_request("running", {"prompt_token_ids": list(running)}, params)
    steps: list[tuple[str, float]] = []
    done: set[str] = set()
    phase, outputs = "before", {}
    count = 0
    deadline = time.monotonic() + 600
    while not (phase != "before" and {"running", "arriving"} <= done):
        if phase == "before" and count == after_steps:
            engine.add_request(
                "arriving",
                {"prompt_token_ids": list(arriving)},
                sampling(temperature=0.0, max_tokens=4, ignore_eos=True),
            )
            phase = "loading"
            loads = TOTALS.snapshot()["loads"]
        t = time.perf_counter()
        outs = engine.step()
        steps.append((phase, time.perf_counter() - t))
        count += 1
        if phase == "loading" and TOTALS.snapshot()["loads"] > loads:
            phase = "joining"
        for out in outs:
            outputs[out.request_id] = out
            if out.request_id == "arriving" and out.outputs and out.outputs[0].token_ids:
                phase = "after"
            if out.finished:
                done.add(out.request_id)
        if time.monotonic() > deadline:
            raise RuntimeError(f"interleave did not finish in 600 s ({count} steps, phase {phase})")
    arriving_out = outputs["arriving"]
    return {
        "steps": steps,
        "running_tokens": list(outputs["running"].outputs[0].token_ids),
        "arriving_tokens": list(arriving_out.outputs[0].token_ids),
        "arriving_cached": arriving_out.num_cached_tokens,
    }


class EngineProcess:
    """One vLLM engine (``vllm.LLM``) in its own process."""

    def __init__(
        self,
        model: str,
        *,
        kv: dict[str, Any] | None = None,
        prefix_caching: bool = False,
        max_model_len: int = 4096,
        dtype: str = "bfloat16",
        log_path: str | None = None,
        start_timeout_s: float = 300.0,
        **engine_kwargs: Any,
    ) -> None:
        kwargs = {
            "model": model,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "enable_prefix_caching": prefix_caching,
            "enforce_eager": True,
            "seed": 0,
            "disable_log_stats": False,
            **engine_kwargs,
        }
        repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._dir = tempfile.mkdtemp(prefix="vllm-engine-")
        address = os.path.join(self._dir, "engine.sock")
        authkey = os.urandom(16)
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
        env = {
            **os.environ,
            **CHILD_ENV,
            "KVSTORE_HARNESS_KEY": authkey.hex(),
            "PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.log_path = log_path or os.path.join(self._dir, "engine.log")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "transfer.vllm.harness", address],
                env=env,
                cwd=repo_root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        accepted: list[Any] = []
        waiter = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        waiter.start()
        while waiter.is_alive():
            waiter.join(0.5)
            if self._proc.poll() is not None and waiter.is_alive():
                listener.close()
                raise RuntimeError(
                    f"vLLM engine process exited (code {self._proc.returncode}); log: {self.log_path}"
                )
        listener.close()
        self._conn = accepted[0]
        self._conn.send((kwargs, kv))
        self.startup_s = self._reply(start_timeout_s)

    def _reply(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(1.0):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM engine process exited (code {self._proc.returncode}); log: {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.close(kill=True)
                raise TimeoutError(f"vLLM engine did not answer within {timeout_s} s (log: {self.log_path})")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"vLLM engine failed:\n{value}")
        return value

    def _call(self, cmd: str, args: Any = None, timeout_s: float = 600.0) -> Any:
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"vLLM engine process exited (code {self._proc.returncode}); log: {self.log_path}"
            )
        self._conn.send((cmd, args))
        return self._reply(timeout_s)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int = 8) -> list[Completion]:
        """Greedy completions of token-id prompts, one request at a time."""
        return [Completion(*c) for c in self._call("generate", ([list(p) for p in prompts], max_tokens))]

    def interleave(
        self, running: Sequence[int], running_tokens: int, arriving: Sequence[int], after_steps: int = 3
    ) -> dict[str, Any]:
        """Per-step wall times while ``arriving`` (with a stored prefix) joins a decoding request."""
        steps: dict[str, Any] = self._call(
            "interleave", (list(running), running_tokens, list(arriving), after_steps)
        )
        return steps

    def stats(self) -> dict[str, Any] | None:
        """The connector's process-wide totals (None when the engine has no connector)."""
        totals: dict[str, Any] | None = self._call("stats")
        return totals

    def metrics(self, prefix: str = "vllm:kvstore") -> dict[str, Any]:
        metrics: dict[str, Any] = self._call("metrics", prefix)
        return metrics

    def close(self, kill: bool = False) -> None:
        if self._proc.poll() is None and not kill:
            try:
                self._conn.send(("stop", None))
                self._conn.poll(30)
            except (BrokenPipeError, OSError):
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(30)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _child(Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(os.environ["KVSTORE_HARNESS_KEY"])))
