"""The one module that wires Ray: actor wrappers, worker pools and a driver that routes requests.

Workers are plain classes (:class:`workers.prefill.PrefillWorker`,
:class:`workers.decode.DecodeWorker`); here they become Ray actors, grouped in
pools, and a :class:`Pipeline` routes each request to a prefill actor, then
hands the returned :class:`~workers.prefill.PrefillHandle` to a decode actor
whose tokens stream back as they are produced. Only the handle (keys, a few
hundred token ids, counts) crosses Ray; the KV itself moves through the kvstore
server, which is the point: any decode worker can pick up any request. The
optional direct handoff (``handoff=True``) instead passes the prompt's KV as
per-layer Ray object refs from the prefill actor to the decode actor.

Lifecycle: :func:`init_ray` once per process (local Ray, no dashboard), before
this process starts any gRPC server (Ray forks daemons at init); then
``Pipeline(config, ...)``; :meth:`Pipeline.wait_ready` blocks until every
actor has loaded its model; :meth:`Pipeline.shutdown` kills the actors.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.decode import DecodeSummary, DecodeWorker, TokenEvent
from workers.prefill import PrefillHandle, PrefillRequest, PrefillWorker, WorkerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUTING = ("least_loaded", "round_robin")


def init_ray(num_cpus: int = 2, **options: Any) -> None:
    """Start (or join the already started) local Ray with small, quiet defaults.

    Actors import ``workers``/``transfer``/``kvstore`` from this checkout, so
    the repository root is put on their ``PYTHONPATH``.
    """
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}},
    }
    kwargs.update(options)
    ray.init(**kwargs)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class RayPrefillWorker(PrefillWorker):
    """PrefillWorker as an actor, plus the direct handoff: per-layer KV as Ray object refs."""

    def prefill_refs(self, request: PrefillRequest) -> tuple[PrefillHandle, list[Any]]:
        import ray

        handle, layers = self.prefill_with_kv(request)
        return handle, [ray.put(kv) for kv in layers]


class RayDecodeWorker(DecodeWorker):
    """DecodeWorker as an actor; ``stream_refs`` pulls the prefix from object refs, layer by layer."""

    def stream_refs(self, handle: PrefillHandle, refs: list[Any],
                    max_new_tokens: int) -> Iterator[TokenEvent | DecodeSummary]:
        import ray

        # ``refs`` arrive unresolved (nested in a list), so each layer is fetched only when the
        # layer-wise loader asks for it, while the model already runs on earlier layers.
        yield from self.stream(handle, max_new_tokens, prefix=(ray.get(ref) for ref in refs))


class WorkerPool:
    """Actors of one kind and the requests in flight on each; picks where the next one goes.

    ``least_loaded`` picks the actor with the fewest requests in flight (ties go
    round robin, so an idle pool still spreads work); ``round_robin`` ignores load.
    Counts are kept by the driver, which is the only one submitting work.
    """

    def __init__(self, actors: Sequence[Any], routing: str = "least_loaded") -> None:
        if not actors:
            raise ValueError("a pool needs at least one actor")
        if routing not in ROUTING:
            raise ValueError(f"routing must be one of {ROUTING}, got {routing!r}")
        self.actors = list(actors)
        self.routing = routing
        self.in_flight = [0] * len(self.actors)
        self.num_routed = [0] * len(self.actors)
        self._next = itertools.cycle(range(len(self.actors)))
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            n = len(self.actors)
            if self.routing == "round_robin":
                index = next(self._next)
            else:
                start = next(self._next)
                order = [(start + i) % n for i in range(n)]
                index = min(order, key=lambda i: self.in_flight[i])
            self.in_flight[index] += 1
            self.num_routed[index] += 1
            return index

    def release(self, index: int) -> None:
        with self._lock:
            self.in_flight[index] -= 1


@dataclass
class RequestResult:
    """One request end to end, as the driver saw it."""

    handle: PrefillHandle
    summary: DecodeSummary
    prefill_worker: int
    decode_worker: int
    latency_s: float  # submission to last token, seen by the driver

    @property
    def tokens(self) -> list[int]:
        return list(self.summary.tokens)


class Pipeline:
    """Pools of prefill and decode actors behind one driver.

    ``num_cpus_per_actor`` is what Ray reserves per actor; each actor's torch
    uses that many threads unless ``config.num_threads`` says otherwise.
    """

    def __init__(self, config: WorkerConfig, *, num_prefill: int = 1, num_decode: int = 1,
                 routing: str = "least_loaded", num_cpus_per_actor: float = 1.0) -> None:
        import ray

        if num_prefill < 1 or num_decode < 1:
            raise ValueError("a pipeline needs at least one prefill and one decode worker")
        threads = config.num_threads or max(1, int(num_cpus_per_actor))
        from dataclasses import replace

        self.config = replace(config, num_threads=threads)
        prefill_cls = ray.remote(num_cpus=num_cpus_per_actor)(RayPrefillWorker)
        decode_cls = ray.remote(num_cpus=num_cpus_per_actor)(RayDecodeWorker)
        self.prefill_pool = WorkerPool([prefill_cls.remote(self.config) for _ in range(num_prefill)], routing)
        self.decode_pool = WorkerPool([decode_cls.remote(self.config) for _ in range(num_decode)], routing)

    def wait_ready(self, timeout_s: float = 600.0) -> str:
        """Block until every actor has loaded the model; returns the model fingerprint."""
        import ray

        refs = [a.ready.remote() for a in self.prefill_pool.actors + self.decode_pool.actors]
        fingerprints = set(ray.get(refs, timeout=timeout_s))
        if len(fingerprints) != 1:
            raise RuntimeError(f"workers loaded different models: {sorted(fingerprints)}")
        return fingerprints.pop()

    # -- prefill -------------------------------------------------------------------------------------

    def submit_prefill(self, request: PrefillRequest, *, handoff: bool = False) -> tuple[int, Any]:
        """Route ``request`` to a prefill actor; (actor index, ObjectRef of its handle, or of
        ``(handle, per-layer KV refs)`` with ``handoff``)."""
        index = self.prefill_pool.acquire()
        actor = self.prefill_pool.actors[index]
        return index, (actor.prefill_refs if handoff else actor.prefill).remote(request)

    def finish_prefill(self, index: int, ref: Any, timeout_s: float | None = None) -> PrefillHandle:
        import ray

        try:
            return ray.get(ref, timeout=timeout_s)
        finally:
            self.prefill_pool.release(index)

    def prefill(self, request: PrefillRequest, timeout_s: float | None = None) -> PrefillHandle:
        return self.finish_prefill(*self.submit_prefill(request), timeout_s=timeout_s)

    # -- decode --------------------------------------------------------------------------------------

    def stream(self, handle: PrefillHandle, max_new_tokens: int) -> Iterator[TokenEvent | DecodeSummary]:
        """Tokens of ``handle`` as a decode actor produces them, then the summary."""
        return self._stream(self.decode_pool.acquire(), handle, max_new_tokens)

    def _stream(self, index: int, handle: PrefillHandle, max_new_tokens: int,
                refs: list[Any] | None = None) -> Iterator[TokenEvent | DecodeSummary]:
        import ray

        actor = self.decode_pool.actors[index]
        try:
            if refs is None:
                gen = actor.stream.options(num_returns="streaming").remote(handle, max_new_tokens)
            else:
                gen = actor.stream_refs.options(num_returns="streaming").remote(handle, refs, max_new_tokens)
            for ref in gen:
                yield ray.get(ref)
        finally:
            self.decode_pool.release(index)

    def generate(self, request: PrefillRequest, max_new_tokens: int,
                 on_token: Callable[[TokenEvent], None] | None = None, *, handoff: bool = False) -> RequestResult:
        """Prefill then decode one request, calling ``on_token`` for each streamed token."""
        return next(iter(self.run([request], max_new_tokens, on_token, handoff=handoff)))

    def run(self, requests: Sequence[PrefillRequest], max_new_tokens: int,
            on_token: Callable[[TokenEvent], None] | None = None,
            on_handle: Callable[[PrefillHandle], None] | None = None, *,
            overlap: bool = True, handoff: bool = False) -> Iterator[RequestResult]:
        """Run a batch in order; results come back in request order.

        With ``overlap`` every prefill is submitted at once, so prefill of later
        requests runs while earlier ones decode (one prefill actor still runs
        them in submission order, so a request sees the chunks its predecessors
        stored). Without it, a request's prefill starts only after the previous
        request finished decoding, so prefill timings are not disturbed by a
        concurrent decode (what a TTFT comparison needs on a small machine).
        ``on_handle`` sees each prefill handle before its tokens stream.

        ``handoff`` sends the prompt's KV from the prefill actor to the decode
        actor as per-layer Ray object refs instead of through the store (the
        chunks are still stored for later reuse when the request says so).
        """
        queue = list(requests)
        start: dict[str, float] = {}
        pending: list[tuple[PrefillRequest, int, Any]] = []

        def submit(request: PrefillRequest) -> None:
            start[request.request_id] = time.perf_counter()
            pending.append((request, *self.submit_prefill(request, handoff=handoff)))

        try:
            while queue or pending:
                while queue and (overlap or not pending):
                    submit(queue.pop(0))
                request, index, ref = pending.pop(0)
                handle, refs = self.finish_prefill(index, ref), None
                if handoff:
                    handle, refs = handle
                if on_handle is not None:
                    on_handle(handle)
                summary = None
                decode_index = self.decode_pool.acquire()
                for item in self._stream(decode_index, handle, max_new_tokens, refs):
                    if isinstance(item, DecodeSummary):
                        summary = item
                    elif on_token is not None:
                        on_token(item)
                if summary is None:
                    raise RuntimeError(f"decode of {request.request_id!r} ended without a summary")
                yield RequestResult(handle, summary, index, decode_index,
                                    time.perf_counter() - start[request.request_id])
        finally:
            for _, index, _ in pending:  # abandoned: the refs are dropped, counts put back
                self.prefill_pool.release(index)

    def shutdown(self) -> None:
        import ray

        for actor in self.prefill_pool.actors + self.decode_pool.actors:
            ray.kill(actor)
