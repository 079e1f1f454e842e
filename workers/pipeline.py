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

Lifecycle: :func:`init_ray` once per process, either starting a local Ray (no
dashboard; before this process starts any gRPC server, since Ray forks daemons
at init) or joining an existing cluster (``address="auto"``, ``"host:port"`` or
``"ray://host:port"``); then ``Pipeline(config, ...)``, optionally pinning each
role to the nodes that advertise its custom resource (``prefill_resources``,
``decode_resources``; see :data:`ROLE_RESOURCES`); :meth:`Pipeline.wait_ready`
blocks until every actor has loaded its model; :meth:`Pipeline.shutdown` kills
the actors. Nothing here reads the environment: the entrypoint decides the
address and resources and passes them in.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.allocator import ALLOCATOR_ENV
from workers.decode import DecodeSummary, DecodeWorker, TokenEvent
from workers.prefill import PrefillHandle, PrefillRequest, PrefillWorker, WorkerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUTING = ("least_loaded", "round_robin")


# What the KubeRay worker groups advertise (deploy/kuberay/raycluster.yaml): one unit per pod.
ROLE_RESOURCES: dict[str, dict[str, float]] = {"prefill": {"prefill": 1.0}, "decode": {"decode": 1.0}}
DEFAULT_LOCAL_CPUS = 2


def ray_init_kwargs(
    num_cpus: int | None = None, *, address: str | None = None, **options: Any
) -> dict[str, Any]:
    """The ``ray.init`` arguments :func:`init_ray` uses; a pure function, so it can be checked without Ray.

    ``address=None`` starts a new local Ray (``address="local"``, so a stray
    ``RAY_ADDRESS`` or a ``ray start`` on this machine is not joined by
    accident) with ``num_cpus`` (default 2) and the repository root on the
    actors' ``PYTHONPATH``. Any other address joins an existing cluster, where
    Ray refuses ``num_cpus`` (the nodes already declared theirs) and the
    driver's checkout path means nothing to the nodes (they run the worker image,
    which has the packages installed). ``options`` override or extend the result.
    """
    joining = address is not None and address != "local"
    if joining and num_cpus is not None:
        raise ValueError(f"num_cpus applies only to a local Ray; the cluster at {address!r} has its own CPUs")
    if not joining and num_cpus is not None and num_cpus < 1:
        raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
    env_vars = {"TOKENIZERS_PARALLELISM": "false", **ALLOCATOR_ENV}
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if joining:
        kwargs["address"] = address
    else:
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env_vars["PYTHONPATH"] = pythonpath
        kwargs.update(
            address="local",
            num_cpus=DEFAULT_LOCAL_CPUS if num_cpus is None else num_cpus,
            include_dashboard=False,
        )
    kwargs["runtime_env"] = {"env_vars": env_vars}
    kwargs.update(options)
    return kwargs


def init_ray(num_cpus: int | None = None, *, address: str | None = None, **options: Any) -> None:
    """Start a local Ray, or join the cluster at ``address``; a no-op if this process is already connected.

    See :func:`ray_init_kwargs` for what each mode passes to ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(**ray_init_kwargs(num_cpus, address=address, **options))


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

    def stream_refs(
        self, handle: PrefillHandle, refs: list[Any], max_new_tokens: int
    ) -> Iterator[TokenEvent | DecodeSummary]:
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


def actor_options(num_cpus: float = 1.0, resources: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The ``ray.remote`` options of one role's actors: CPUs reserved, plus the custom resources that pin
    the role to its nodes (e.g. ``{"prefill": 1}`` on the KubeRay prefill group).

    Ray takes CPUs and GPUs only through ``num_cpus``/``num_gpus``, so those names are refused here
    instead of failing later inside Ray.
    """
    if num_cpus <= 0:
        raise ValueError(f"num_cpus per actor must be positive, got {num_cpus}")
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if resources:
        for name, amount in resources.items():
            if not name or name in ("CPU", "GPU"):
                raise ValueError(f"custom resource name {name!r} is not allowed (use num_cpus / num_gpus)")
            if amount <= 0:
                raise ValueError(f"custom resource {name!r} needs a positive amount, got {amount}")
        options["resources"] = {name: float(amount) for name, amount in resources.items()}
    return options


class Pipeline:
    """Pools of prefill and decode actors behind one driver.

    ``num_cpus_per_actor`` is what Ray reserves per actor; each actor's torch
    uses that many threads unless ``config.num_threads`` says otherwise.
    ``prefill_resources`` / ``decode_resources`` are Ray custom resources each
    actor of that role requires, so the roles land on the nodes that advertise
    them (``ROLE_RESOURCES`` matches the KubeRay worker groups). Without them
    actors go wherever CPUs are free. An actor whose resources no node offers
    stays pending, and :meth:`wait_ready` times out.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        num_prefill: int = 1,
        num_decode: int = 1,
        routing: str = "least_loaded",
        num_cpus_per_actor: float = 1.0,
        prefill_resources: Mapping[str, float] | None = None,
        decode_resources: Mapping[str, float] | None = None,
    ) -> None:
        import ray

        if num_prefill < 1 or num_decode < 1:
            raise ValueError("a pipeline needs at least one prefill and one decode worker")
        threads = config.num_threads or max(1, int(num_cpus_per_actor))
        from dataclasses import replace

        self.config = replace(config, num_threads=threads)
        self.prefill_options = actor_options(num_cpus_per_actor, prefill_resources)
        self.decode_options = actor_options(num_cpus_per_actor, decode_resources)
        prefill_cls = ray.remote(**self.prefill_options)(RayPrefillWorker)
        decode_cls = ray.remote(**self.decode_options)(RayDecodeWorker)
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

    def warm_up(self, profiles: Sequence[str], timeout_s: float = 600.0) -> float:
        """Warm every actor's codec and model for ``profiles`` (in parallel); returns the slowest
        actor's seconds. Run before anything is timed: a fresh machine compiles the codec kernels
        on first use, and a request that paid for it would report that as the codec's speed."""
        import ray

        refs = [a.warm_up.remote(list(profiles)) for a in self.prefill_pool.actors + self.decode_pool.actors]
        return max(ray.get(refs, timeout=timeout_s))

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

    def _stream(
        self, index: int, handle: PrefillHandle, max_new_tokens: int, refs: list[Any] | None = None
    ) -> Iterator[TokenEvent | DecodeSummary]:
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

    def generate(
        self,
        request: PrefillRequest,
        max_new_tokens: int,
        on_token: Callable[[TokenEvent], None] | None = None,
        *,
        handoff: bool = False,
    ) -> RequestResult:
        """Prefill then decode one request, calling ``on_token`` for each streamed token."""
        return next(iter(self.run([request], max_new_tokens, on_token, handoff=handoff)))

    def run(
        self,
        requests: Sequence[PrefillRequest],
        max_new_tokens: int,
        on_token: Callable[[TokenEvent], None] | None = None,
        on_handle: Callable[[PrefillHandle], None] | None = None,
        *,
        overlap: bool = True,
        handoff: bool = False,
    ) -> Iterator[RequestResult]:
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
                yield RequestResult(
                    handle, summary, index, decode_index, time.perf_counter() - start[request.request_id]
                )
        finally:
            for _, index, _ in pending:  # abandoned: the refs are dropped, counts put back
                self.prefill_pool.release(index)

    def shutdown(self) -> None:
        import ray

        for actor in self.prefill_pool.actors + self.decode_pool.actors:
            ray.kill(actor)
