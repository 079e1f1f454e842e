"""The prefill worker: compute a prompt's KV once, reusing whatever prefix the store already has.

For one request the worker

1. cuts the prompt into chunk keys (:func:`kvstore.keys.chunk_keys`),
2. asks the store how many leading chunks it holds (one ``Lookup``),
3. streams those chunks layer by layer into a :class:`transfer.engines.layerwise.LayerwiseCache`
   while the model already runs on the layers that arrived,
4. runs the model on the uncached suffix only (split at the reuse boundary, see
   :mod:`workers.runner`),
5. encodes every new full chunk per layer with the configured codec profile and
   stores it,

and returns a :class:`PrefillHandle`: everything a decode worker needs to pick
the request up from the store (keys, tail tokens, first token), plus counts and
timings. It is a plain class; :mod:`workers.pipeline` makes it a Ray actor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.keys import DEFAULT_CHUNK_TOKENS, ChunkKey, Namespace, chunk_keys
from transfer.engines import cpu_plan as affinity
from transfer.errors import DataLoss, NotFound, Unavailable
from transfer.replicas.client import StoreClient
from transfer.rpc.client import PutItem
from workers.runner import ModelRunner, reuse_boundary

if TYPE_CHECKING:
    from transfer.codec import LayerKV

log = logging.getLogger(__name__)

FP16_BYTES = 2


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs: where the store is, which model, how KV is cut and encoded.

    ``layerwise`` overlaps the fetch of a stored prefix with compute (layer
    ``i`` runs while ``i+1..`` are on the wire); off, the whole prefix is
    fetched before the model starts, which is simpler to reason about.

    ``compute_cpus`` (a list like ``"0"`` or ``"0-3"``) pins the worker's model
    thread to those CPUs and its KV I/O threads to the others
    (:mod:`transfer.engines.cpu_plan`); give each worker of a machine its own. None
    (the default) leaves placement to the OS.
    """

    store_target: str
    token: str | None = None
    #: Copies of each chunk when ``store_target`` names several replicas (a list or ``dns:///``).
    replication: int = 2
    #: ``"all"``: a put returns once every owner has the chunk (decode finds it wherever it asks);
    #: ``"one"``: once one owner has it.
    write_ack: str = "all"
    model_path: str | None = None
    profile: str = "lossless"
    tenant: str = "default"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    num_threads: int | None = None
    layerwise: bool = True
    compute_cpus: str | None = None

    def __post_init__(self) -> None:
        if not self.store_target:
            raise ValueError(
                "store_target must be 'host:port' of a kvstore server, a list "
                "'host:port,host:port,...' or 'dns:///name:port'"
            )
        from transfer.replicas.membership import parse_target
        from transfer.replicas.routing import check_write_ack

        parse_target(self.store_target)  # a malformed target fails here, not in the worker
        if self.replication < 1:
            raise ValueError(f"replication must be >= 1, got {self.replication}")
        check_write_ack(self.write_ack)
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        check_profile(self.profile)  # here, not at the first encode after a prefill already ran
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.compute_cpus is not None:
            affinity.parse_cpus(self.compute_cpus)  # a bad list fails here, not in the worker

    def connect(self) -> StoreClient:
        """The store client for ``store_target`` (one server, or a cluster with placement)."""
        from transfer.replicas.client import connect

        return connect(
            self.store_target, token=self.token, replication=self.replication, write_ack=self.write_ack
        )

    def apply_cpu_plan(self) -> affinity.CpuPlan | None:
        """Pin the calling thread (the model's) and this process's I/O threads as ``compute_cpus`` says."""
        if self.compute_cpus is None:
            return None
        plan = affinity.plan_for(self.compute_cpus)
        affinity.apply(plan)
        return plan


def check_profile(profile: str, what: str = "profile") -> None:
    """A codec profile the codec knows, or ValueError naming the known ones."""
    from transfer.codec.profiles import PROFILES

    if profile not in PROFILES:
        raise ValueError(f"{what} {profile!r} is not a codec profile; choose one of {sorted(PROFILES)}")


@dataclass(frozen=True)
class PrefillRequest:
    """One prompt. ``reuse=False`` recomputes everything and ``store=False`` stores nothing
    (together: the no-cache baseline); ``profile`` overrides the worker's codec profile."""

    request_id: str
    token_ids: tuple[int, ...]
    reuse: bool = True
    store: bool = True
    profile: str | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        if self.profile is not None:
            check_profile(self.profile, f"request {self.request_id!r}: profile")
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))


@dataclass(frozen=True)
class PrefillHandle:
    """What prefill hands to decode: where the prompt's KV lives and how the request stands."""

    request_id: str
    namespace: str
    keys: tuple[ChunkKey, ...]  # every full chunk of the prompt
    token_ids: tuple[int, ...]
    chunk_tokens: int
    boundary: int  # tokens [0, boundary) are reusable from the store; the tail is recomputed
    num_cached_tokens: int  # reused from the store by this prefill
    num_prefilled_tokens: int  # run through the model by this prefill
    first_token: int
    num_stored_chunks: int
    stored_bytes: int  # encoded bytes this prefill put (blobs incl. trailers)
    fp16_bytes: int  # what the same chunk-layers take as raw fp16 K and V
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefix_keys(self) -> tuple[ChunkKey, ...]:
        return self.keys[: self.boundary // self.chunk_tokens]


def open_prefix_cache(
    client: StoreClient,
    runner: ModelRunner,
    namespace: str,
    keys: Sequence[bytes],
    chunk_tokens: int,
    *,
    layerwise: bool,
) -> Any:
    """A transformers cache holding the stored chunks ``keys``; ``None`` when there are none."""
    if not keys:
        return None
    num_layers = runner.shape.num_layers
    if layerwise:
        from transfer.engines.layerwise import LayerwiseCache

        return LayerwiseCache.from_store(client, namespace, list(keys), num_layers, chunk_tokens=chunk_tokens)
    layers = [(k, v) for _, k, v in _iter_layers(client, namespace, keys, num_layers)]
    return runner.cache_from_layers(layers)


#: The store could not deliver chunks its Lookup had reported: evicted in between, or every replica
#: holding them was lost. The prompt is then recomputed: slower, never wrong, never an error.
STORE_MISSES = (NotFound, DataLoss, Unavailable)


def prefill_from_store(
    client: StoreClient,
    runner: ModelRunner,
    namespace: str,
    keys: Sequence[bytes],
    token_ids: Sequence[int],
    chunk_tokens: int,
    boundary: int,
    *,
    layerwise: bool,
) -> tuple[Any, int]:
    """Run the model over ``token_ids`` reusing the stored chunks ``keys``; returns the output and the
    number of chunks reused (0 when the store could not deliver them and everything was recomputed)."""
    if keys:
        cache = None
        try:
            cache = open_prefix_cache(client, runner, namespace, keys, chunk_tokens, layerwise=layerwise)
            out = runner.prefill(token_ids, cache, past_tokens=len(keys) * chunk_tokens, boundary=boundary)
            return out, len(keys)
        except STORE_MISSES as exc:
            log.warning("prefix of %d chunks could not be fetched (%s); recomputing it", len(keys), exc)
        finally:
            close_cache(cache)
    return runner.prefill(token_ids, None, past_tokens=0, boundary=boundary), 0


def _iter_layers(
    client: StoreClient, namespace: str, keys: Sequence[bytes], num_layers: int
) -> Iterator[Any]:
    from transfer.engines.kvio import iter_layers

    return iter_layers(client, namespace, list(keys), 0, num_layers)


def close_cache(cache: Any) -> None:
    """Stop a layer-wise loader (if any) once the model no longer needs it."""
    close = getattr(cache, "close", None)
    if close is not None and hasattr(cache, "wait_loaded"):
        close()


class StoreWorker:
    """What prefill and decode workers share: a model runner, a store client, the CPU plan.

    ``runner`` and ``client`` are built from ``config`` unless given (tests and the
    demo hand in shared ones).
    """

    def __init__(
        self, config: WorkerConfig, *, runner: ModelRunner | None = None, client: StoreClient | None = None
    ) -> None:
        self.config = config
        self.runner = (
            runner if runner is not None else ModelRunner(config.model_path, num_threads=config.num_threads)
        )
        self.client = client if client is not None else config.connect()
        self.cpu_plan = config.apply_cpu_plan()  # after the client: its gRPC threads move to the I/O CPUs

    def ready(self) -> str:
        """The model fingerprint; a cheap call that proves the worker finished loading."""
        return self.runner.fingerprint

    def warm_up(self, profiles: Sequence[str]) -> float:
        """Seconds spent compiling/loading the codec kernels of ``profiles`` (see ModelRunner.warm_up)."""
        return self.runner.warm_up(profiles, self.config.chunk_tokens)

    def close(self) -> None:
        self.client.close()


class PrefillWorker(StoreWorker):
    """Prefill with prefix reuse over a kvstore server (see the module docstring)."""

    def namespace(self, profile: str | None = None) -> str:
        return str(Namespace(self.config.tenant, self.runner.fingerprint, profile or self.config.profile))

    def prefill(self, request: PrefillRequest) -> PrefillHandle:
        return self._prefill(request)[0]

    def prefill_with_kv(self, request: PrefillRequest) -> tuple[PrefillHandle, list[LayerKV]]:
        """The handle plus the prompt's KV over ``[0, boundary)``, one ``(k, v)`` per layer.

        For a direct handoff to decode (object refs instead of the store); the
        chunks are stored as usual when ``request.store``.
        """
        handle, cache = self._prefill(request)
        b = handle.boundary
        return handle, [
            (k[:, :b].contiguous(), v[:, :b].contiguous()) for k, v in self.runner.cache_layers(cache)
        ]

    def _prefill(self, request: PrefillRequest) -> tuple[PrefillHandle, Any]:
        start = time.perf_counter()
        cfg, runner = self.config, self.runner
        c = cfg.chunk_tokens
        num_layers = runner.shape.num_layers
        profile = request.profile or cfg.profile
        ns = self.namespace(profile)
        ids = request.token_ids
        keys = chunk_keys(ids, ns, c)
        boundary = reuse_boundary(len(ids), c)
        present = self.client.lookup(ns, keys, num_layers) if keys and (request.reuse or request.store) else 0
        cached = min(present, boundary // c) if request.reuse else 0
        t_lookup = time.perf_counter()

        out, cached = prefill_from_store(
            self.client, runner, ns, keys[:cached], ids, c, boundary, layerwise=cfg.layerwise
        )
        t_first = time.perf_counter()

        stored_chunks = stored_bytes = 0
        first_new = present  # chunks [0, present) are stored already; puts would be no-ops
        if request.store and first_new < len(keys):
            from transfer.engines.kvio import context_items  # the codec loads only where KV is encoded

            sizes: list[int] = []
            items = context_items(
                ns,
                keys,
                runner.cache_layers(out.cache),
                profile=profile,
                chunk_tokens=c,
                start_chunk=first_new,
            )
            self.client.put(ns, _counting(items, sizes))
            stored_chunks, stored_bytes = len(keys) - first_new, sum(sizes)
        t_end = time.perf_counter()

        shape = runner.shape
        fp16 = stored_chunks * num_layers * 2 * shape.num_kv_heads * c * shape.head_dim * FP16_BYTES
        handle = PrefillHandle(
            request_id=request.request_id,
            namespace=ns,
            keys=tuple(keys),
            token_ids=ids,
            chunk_tokens=c,
            boundary=boundary,
            num_cached_tokens=cached * c,
            num_prefilled_tokens=out.num_computed,
            first_token=out.first_token,
            num_stored_chunks=stored_chunks,
            stored_bytes=stored_bytes,
            fp16_bytes=fp16,
            timings={
                "lookup_s": t_lookup - start,
                "compute_s": t_first - t_lookup,
                "ttft_s": t_first - start,
                "store_s": t_end - t_first,
                "total_s": t_end - start,
            },
        )
        return handle, out.cache


def _counting(items: Iterator[PutItem], sizes: list[int]) -> Iterator[PutItem]:
    for item in items:
        sizes.append(len(item.blob))
        yield item
