"""``KVStoreConnector``: vLLM's v1 KV connector backed by a kvstore server.

Enable it with::

    kv_transfer_config = {"kv_connector": "KVStoreConnector",
                          "kv_connector_module_path": "transfer.vllm.connector",
                          "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                          "kv_connector_extra_config": {"target": "127.0.0.1:50051", "profile": "lossless"}}

How vLLM's paged cache maps onto the store: a stored chunk is ``chunk_blocks``
whole vLLM blocks of one request's prompt; its key is the chained prefix hash of
every token up to the chunk's end (:func:`kvstore.keys.chunk_keys`), so a key
names a whole prefix. One blob per (chunk, layer) holds that layer's K and V of
the chunk, encoded by the codec profile chosen in the settings.

Scheduler side (one instance, in the engine core): one ``Lookup`` per request
gives the stored prefix; vLLM allocates blocks for it and the connector plans a
load (those blocks) and saves (each prompt chunk once it is fully computed and
not already stored) into the step's metadata.

Worker side (one per rank): ``start_load_kv`` opens one layer-ordered ``Get``
stream for every load of the step in a background thread, which decodes layer
``i`` into the paged blocks and then signals it; ``wait_for_layer_load(i)``
waits for layer ``i`` only, so layer 0's attention runs while later layers are
still on the wire. ``save_kv_layer`` copies the layer's blocks to be saved and
queues them to a background ``Put`` stream that encodes and sends them while
the forward pass goes on; ``wait_for_save`` bounds that stream at the step's end.

Failures never break a request: a store that cannot be reached is a miss at
lookup time; a load that fails (store gone, block missing or corrupt, a frame of
the wrong shape, a deadline) reports the request's loaded blocks through
``get_block_ids_with_load_errors`` and vLLM recomputes them (with
``kv_load_failure_policy="recompute"``; ``"fail"`` fails the request instead). A
corrupt block is deleted from the store so the next request recomputes and
re-saves it. No hook raises into the engine's step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvstore.keys import chunk_keys
from transfer.client import PutItem
from transfer.errors import TransferError
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, open_store, rank_namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def _codec() -> Any:
    """``transfer.codec``, imported on first use, never at module import: it loads numba, and a numba
    imported before vLLM's worker has started breaks vLLM's kernel-registry scan (vLLM 0.32, CPU)."""
    import transfer.codec

    return transfer.codec


_CODEC_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


# --------------------------------------------------------------------------- statistics


class _Totals:
    """Process-wide cumulative counters of every connector instance (both roles).

    vLLM's own route for connector figures is :class:`KVStoreConnectorStats`
    (worker -> scheduler -> stat loggers -> Prometheus); these totals are what
    a process can read about itself (tests, benchmarks, debugging).
    """

    FIELDS = (
        "lookups",
        "lookup_errors",
        "hit_tokens",
        "loads",
        "load_errors",
        "loaded_tokens",
        "loaded_bytes",
        "layer_waits",
        "layer_wait_s",
        "saves",
        "save_errors",
        "saved_tokens",
        "saved_bytes",
        "corrupt_deleted",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(self.FIELDS, 0)
        self.last_layer_waits: dict[int, float] = {}

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._values)
            out["last_layer_waits"] = dict(self.last_layer_waits)
            return out


TOTALS = _Totals()


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Figures of one interval, sent from the workers to vLLM's stat loggers."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {
            "loaded_tokens": 0,
            "loaded_bytes": 0,
            "load_errors": 0,
            "saved_tokens": 0,
            "saved_bytes": 0,
            "save_errors": 0,
            "layer_wait_s": [],
        }

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(name, []).extend(value)
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        waits = self.data.get("layer_wait_s", [])
        out = {k: v for k, v in self.data.items() if not isinstance(v, list)}
        out["layer_waits"] = len(waits)
        out["layer_wait_avg_ms"] = round(1e3 * sum(waits) / len(waits), 3) if waits else 0.0
        out["layer_wait_max_ms"] = round(1e3 * max(waits), 3) if waits else 0.0
        return out

    def is_empty(self) -> bool:
        return not self.data.get("layer_wait_s") and not any(
            v for v in self.data.values() if not isinstance(v, list)
        )


class KVStorePromMetrics(KVConnectorPromMetrics):
    """The connector's Prometheus metrics, registered by vLLM next to its own."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counters = {
            "loaded_tokens": "Prompt tokens whose KV was loaded from kvstore instead of computed.",
            "loaded_bytes": "Encoded KV bytes loaded from kvstore.",
            "load_errors": "Loads that failed (store unreachable, block missing or corrupt); recomputed.",
            "saved_tokens": "Prompt tokens whose KV was saved to kvstore.",
            "saved_bytes": "Encoded KV bytes saved to kvstore.",
            "save_errors": "Saves that failed or ran past save_timeout_s.",
        }
        self._counters = {}
        for name, doc in counters.items():
            metric = self._counter_cls(name=f"vllm:kvstore_{name}", documentation=doc, labelnames=labelnames)
            self._counters[name] = {i: metric.labels(*v) for i, v in per_engine_labelvalues.items()}
        wait = self._histogram_cls(
            name="vllm:kvstore_layer_load_wait_seconds",
            documentation="Time the forward pass waited for one layer of a kvstore load.",
            labelnames=labelnames,
            buckets=[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
        )
        self._wait = {i: wait.labels(*v) for i, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, children in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                children[engine_idx].inc(value)
        for seconds in transfer_stats_data.get("layer_wait_s", []):
            self._wait[engine_idx].observe(seconds)


# --------------------------------------------------------------------------- metadata


@dataclass
class LoadSpec:
    """Load the stored chunks ``keys`` of one request into ``block_ids`` (``chunk_blocks`` per key);
    blocks before ``first_block`` were computed locally and are left alone."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    first_block: int


@dataclass
class SaveSpec:
    """Save chunks ``first_chunk ..`` of one request (``keys``) from ``block_ids``."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    first_chunk: int


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _RequestState:
    """What the scheduler side tracks per live request."""

    prompt_len: int
    keys: list[bytes]  # keys of every full chunk of the prompt
    stored_chunks: int  # chunks known to be in the store (looked up, or saved)
    block_ids: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- worker helpers


class _LayerLoad:
    """One step's loads: a thread streams layers from the store into the paged cache."""

    def __init__(self, owner: KVStoreConnector, specs: list[LoadSpec]) -> None:
        self.owner = owner
        self.specs = specs
        self.events = [threading.Event() for _ in range(owner._shape.num_layers)]
        self.failed: dict[int, str] = {}  # spec index -> reason
        self.cancelled = threading.Event()
        self.loaded_bytes = 0
        self.started = time.monotonic()
        self.deadline = self.started + owner._settings.load_timeout_s
        self.thread = threading.Thread(target=self._run, name="kvstore-vllm-load", daemon=True)
        self.thread.start()

    def _fail(self, index: int, reason: str) -> None:
        self.failed.setdefault(index, reason)

    def _run(self) -> None:
        owner = self.owner
        keys = [k for s in self.specs for k in s.keys]
        bounds = []
        at = 0
        for s in self.specs:
            bounds.append((at, at + len(s.keys)))
            at += len(s.keys)
        try:
            if owner._kv5 is None:
                raise RuntimeError("no paged KV cache registered in a layout the connector understands")
            stream = owner._client.get_layers(
                owner._namespace, keys, 0, owner._shape.num_layers, timeout_s=owner._settings.load_timeout_s
            )
            for layer, blobs in stream:
                if self.cancelled.is_set():
                    break
                for i, spec in enumerate(self.specs):
                    if i in self.failed:
                        continue
                    part = blobs[bounds[i][0] : bounds[i][1]]
                    try:
                        self._write(layer, spec, part)
                    except Exception as exc:  # undecodable, wrong shape: this request recomputes
                        self._fail(i, f"layer {layer}: {exc}")
                        owner._drop_corrupt(spec, part)
                self.events[layer].set()
        except (TransferError, RuntimeError, OSError) as exc:
            for i in range(len(self.specs)):
                self._fail(i, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # never let the loader thread die silently
            log.exception("kvstore load failed")
            for i in range(len(self.specs)):
                self._fail(i, f"{type(exc).__name__}: {exc}")
        finally:
            for event in self.events:
                event.set()

    def _write(self, layer: int, spec: LoadSpec, blobs: list[Any]) -> None:
        owner = self.owner
        shape = owner._shape
        heads, dim, bs = shape.num_kv_heads, shape.head_dim, shape.block_size
        codec = _codec()
        for blob in blobs:  # the header alone says whether a frame fits this engine
            got = codec.read_header(blob).shape
            if tuple(got) != (heads, owner._chunk_tokens, dim):
                need = (heads, owner._chunk_tokens, dim)
                raise ValueError(f"stored frame has shape {tuple(got)}, this engine needs {need}")
        # the request's chunks of this layer as one tensor; on this thread only (it runs beside the model)
        k, v = codec.decode_into(blobs, dtype=owner._dtype, threads=1)
        self.loaded_bytes += sum(len(blob) for blob in blobs)
        k = k.view(heads, -1, bs, dim).permute(1, 0, 2, 3)[spec.first_block :]
        v = v.view(heads, -1, bs, dim).permute(1, 0, 2, 3)[spec.first_block :]
        if self.cancelled.is_set():
            return
        idx = torch.tensor(spec.block_ids[spec.first_block : len(blobs) * owner._settings.chunk_blocks])
        kv5 = owner._kv5[layer]
        kv5[idx, :, 0] = k
        kv5[idx, :, 1] = v

    def wait_layer(self, layer: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        ok = self.events[layer].wait(max(0.0, self.deadline - time.monotonic()))
        waited = time.perf_counter() - t0
        if not ok:
            self.cancel(f"layer {layer} not loaded within load_timeout_s")
        return ok, waited

    def cancel(self, reason: str) -> None:
        self.cancelled.set()
        for i in range(len(self.specs)):
            self._fail(i, reason)

    def finish(self) -> set[int]:
        """Wait for the thread (bounded); the block ids of every failed load."""
        self.thread.join(max(0.0, self.deadline - time.monotonic()))
        if self.thread.is_alive():
            self.cancel("load still running at the end of the step")
        bad: set[int] = set()
        for i, reason in self.failed.items():
            spec = self.specs[i]
            log.warning(
                "kvstore: load of request %s failed (%s); vLLM recomputes its %d blocks",
                spec.req_id,
                reason,
                len(spec.block_ids) - spec.first_block,
            )
            bad.update(spec.block_ids[spec.first_block :])
        return bad


class _StreamedSave:
    """One step's saves: copies of each layer's blocks, encoded and Put by a thread."""

    def __init__(self, owner: KVStoreConnector, specs: list[SaveSpec]) -> None:
        self.owner = owner
        self.specs = specs
        self.index = torch.tensor([b for s in specs for b in s.block_ids])
        self.queue: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.saved_bytes = 0
        self.saved_tokens = 0
        self.thread = threading.Thread(target=self._run, name="kvstore-vllm-save", daemon=True)
        self.thread.start()

    def push(self, layer: int, kv_layer: torch.Tensor) -> None:
        if self.error is None:
            self.queue.put((layer, kv_layer.index_select(0, self.index)))  # a copy: blocks may be reused

    def _items(self) -> Iterator[PutItem]:
        owner = self.owner
        shape = owner._shape
        heads, dim, bs = shape.num_kv_heads, shape.head_dim, shape.block_size
        m = owner._settings.chunk_blocks
        while True:
            item = self.queue.get()
            if item is None:
                return
            layer, blocks = item
            kv5 = blocks.view(blocks.shape[0], heads, 2, bs, dim)
            pos = 0
            for spec in self.specs:
                for c, key in enumerate(spec.keys):
                    sel = kv5[pos : pos + m]
                    pos += m
                    k = sel[:, :, 0].permute(1, 0, 2, 3).reshape(heads, m * bs, dim)
                    v = sel[:, :, 1].permute(1, 0, 2, 3).reshape(heads, m * bs, dim)
                    blob = _codec().encode_layer(
                        k,
                        v,
                        owner._settings.profile,
                        token_offset=(spec.first_chunk + c) * owner._chunk_tokens,
                    )
                    self.saved_bytes += len(blob)
                    if layer == 0:
                        self.saved_tokens += owner._chunk_tokens
                    yield PutItem(key, layer, shape.num_layers, blob)

    def _run(self) -> None:
        try:
            self.owner._client.put(
                self.owner._namespace, self._items(), timeout_s=self.owner._settings.save_timeout_s
            )
        except BaseException as exc:  # recorded, counted and logged by finish()
            self.error = exc

    def finish(self, timeout_s: float) -> bool:
        self.queue.put(None)
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.error = self.error or TimeoutError(f"save not done within save_timeout_s={timeout_s}")
        if self.error is not None:
            log.warning(
                "kvstore: save of %d chunk(s) failed: %s", sum(len(s.keys) for s in self.specs), self.error
            )
            return False
        return True


# --------------------------------------------------------------------------- the connector


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector over a kvstore server; see the module docstring."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = ConnectorSettings.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self._shape = self._engine_shape(vllm_config, role)
        self._chunk_tokens = self._shape.block_size * self._settings.chunk_blocks
        self._key_ns = str(key_namespace(self._settings, self._shape))
        self._namespace = str(rank_namespace(self._settings, self._shape))
        self._dtype = {v: k for k, v in _CODEC_DTYPES.items()}.get(self._shape.kv_dtype)
        self._client = open_store(self._settings)
        # scheduler side
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: dict[str, tuple[int, int]] = {}  # req -> (local tokens, hit tokens)
        # worker side
        self._layer_index: dict[str, int] = {}
        self._kv5: list[torch.Tensor] | None = None
        self._load: _LayerLoad | None = None
        self._save: _StreamedSave | None = None
        self._invalid: set[int] = set()
        self._stats = KVStoreConnectorStats()
        self._stats_lock = threading.Lock()
        log.info(
            "kvstore connector (%s): store %s, namespace %s, chunk %d tokens, profile %s",
            role.name.lower(),
            self._settings.target,
            self._namespace,
            self._chunk_tokens,
            self._settings.profile,
        )

    @staticmethod
    def _engine_shape(vllm_config: VllmConfig, role: KVConnectorRole) -> EngineShape:
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        cache = vllm_config.cache_config
        dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
        dtype_name = _CODEC_DTYPES.get(dtype) if isinstance(dtype, torch.dtype) else None
        if dtype_name is None:
            raise ValueError(f"KVStoreConnector stores fp16/bf16/fp32 KV; this engine's KV dtype is {dtype}")
        rank = 0
        if role == KVConnectorRole.WORKER and parallel.tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
        archs = getattr(model.hf_config, "architectures", None) or [model.hf_config.model_type]
        return EngineShape(
            architecture=str(archs[0]),
            num_layers=model.get_num_layers(parallel),
            num_kv_heads=model.get_num_kv_heads(parallel),
            head_dim=model.get_head_size(),
            kv_dtype=dtype_name,
            block_size=cache.block_size,
            model_name=str(model.model),
            tp_rank=rank,
            tp_size=parallel.tensor_parallel_size,
        )

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        try:
            state = self._requests.get(request.request_id)
            if state is None:
                state = self._lookup(request)
                self._requests[request.request_id] = state
            hit = state.stored_chunks * self._chunk_tokens
            return (hit - num_computed_tokens, False) if hit > num_computed_tokens else (0, False)
        except Exception:  # the scheduler must keep running: a miss
            log.exception("kvstore: lookup for request %s failed", request.request_id)
            return 0, False

    def _lookup(self, request: Request) -> _RequestState:
        prompt = list(request.prompt_token_ids or [])
        keys = chunk_keys(prompt, self._key_ns, self._chunk_tokens)
        usable = max(0, (len(prompt) - 1) // self._chunk_tokens)  # vLLM must compute >= 1 prompt token
        found = 0
        if usable:
            TOTALS.add(lookups=1)
            try:
                found = min(
                    self._client.lookup(
                        str(rank_namespace(self._settings, self._shape, r)),
                        keys[:usable],
                        self._shape.num_layers,
                        timeout_s=self._settings.lookup_timeout_s,
                    )
                    for r in range(self._shape.tp_size)
                )
            except TransferError as exc:
                TOTALS.add(lookup_errors=1)
                log.warning(
                    "kvstore: lookup failed (%s); request %s computes its prompt", exc, request.request_id
                )
        return _RequestState(prompt_len=len(prompt), keys=keys, stored_chunks=found)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        state = self._requests.get(request.request_id)
        if state is None:
            return
        hit = state.stored_chunks * self._chunk_tokens
        self._pending_loads[request.request_id] = (hit - num_external_tokens, hit)
        TOTALS.add(hit_tokens=num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        try:
            self._plan(scheduler_output, meta)
        except Exception:
            log.exception("kvstore: planning loads/saves failed; this step neither loads nor saves")
            meta = KVStoreConnectorMetadata()
        self._pending_loads.clear()
        return meta

    def _plan(self, out: SchedulerOutput, meta: KVStoreConnectorMetadata) -> None:
        bs, m = self._shape.block_size, self._settings.chunk_blocks
        steps: list[tuple[str, int]] = []
        for new in out.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            steps.append((new.req_id, new.num_computed_tokens + out.num_scheduled_tokens.get(new.req_id, 0)))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids is not None else state.block_ids
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            steps.append((req_id, cached.num_computed_tokens[i] + out.num_scheduled_tokens.get(req_id, 0)))
        for req_id, computed_after in steps:
            state = self._requests[req_id]
            if req_id in self._pending_loads:
                local, hit = self._pending_loads[req_id]
                n = hit // self._chunk_tokens
                meta.loads.append(LoadSpec(req_id, state.keys[:n], state.block_ids[: n * m], local // bs))
            done = min(computed_after, state.prompt_len) // self._chunk_tokens
            if done > state.stored_chunks and len(state.block_ids) >= done * m:
                first = state.stored_chunks
                meta.saves.append(
                    SaveSpec(req_id, state.keys[first:done], state.block_ids[first * m : done * m], first)
                )
                state.stored_chunks = done

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None  # saves finish within their step (wait_for_save)

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            from vllm.model_executor.models.utils import extract_layer_index

            names = list(kv_caches)
            try:
                order = sorted(names, key=extract_layer_index)
            except Exception:
                order = names
            self._layer_index = {name: i for i, name in enumerate(order)}
            shape = self._shape
            views = []
            for name in order:
                t = kv_caches[name]
                want = (shape.num_kv_heads, shape.block_size, 2 * shape.head_dim)
                if t.dim() != 4 or tuple(t.shape[1:]) != want or t.dtype != self._dtype:
                    raise ValueError(
                        f"layer {name}: paged KV {tuple(t.shape)} {t.dtype}; the connector "
                        f"handles vLLM's CPU layout [blocks, {want[0]}, {want[1]}, {want[2]}] "
                        f"in {self._dtype}"
                    )
                # CPU layout: per block and head, block_size rows of K then block_size rows of V.
                views.append(t.view(t.shape[0], shape.num_kv_heads, 2, shape.block_size, shape.head_dim))
            if len(views) != shape.num_layers:
                raise ValueError(
                    f"{len(views)} attention layers with KV, the model config says {shape.num_layers}"
                )
            self._kv5 = views
        except Exception as exc:
            self._kv5 = None
            log.error("kvstore: connector disabled on this worker (%s); every load will be recomputed", exc)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        try:
            meta = self._connector_metadata
            if not isinstance(meta, KVStoreConnectorMetadata) or not meta.loads:
                return
            self._finish_load()
            self._load = _LayerLoad(self, meta.loads)
        except Exception:
            log.exception("kvstore: start_load_kv failed")

    def wait_for_layer_load(self, layer_name: str) -> None:
        load = self._load
        if load is None:
            return
        try:
            layer = self._layer_index.get(layer_name)
            if layer is None:
                return
            _, waited = load.wait_layer(layer)
            TOTALS.add(layer_waits=1, layer_wait_s=waited)
            TOTALS.last_layer_waits[layer] = waited
            with self._stats_lock:
                self._stats.data["layer_wait_s"].append(waited)
        except Exception:
            log.exception("kvstore: wait_for_layer_load failed")

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        try:
            meta = self._connector_metadata
            if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves or self._kv5 is None:
                return
            layer = self._layer_index.get(layer_name)
            if layer is None:
                return
            if self._save is None:
                self._save = _StreamedSave(self, meta.saves)
            self._save.push(layer, kv_layer)
        except Exception:
            log.exception("kvstore: save_kv_layer failed")

    def wait_for_save(self) -> None:
        try:
            self._finish_load()
            save, self._save = self._save, None
            if save is None:
                return
            ok = save.finish(self._settings.save_timeout_s)
            with self._stats_lock:
                if ok:
                    self._stats.data["saved_bytes"] += save.saved_bytes
                    self._stats.data["saved_tokens"] += save.saved_tokens
                else:
                    self._stats.data["save_errors"] += 1
            if ok:
                TOTALS.add(saves=1, saved_bytes=save.saved_bytes, saved_tokens=save.saved_tokens)
            else:
                TOTALS.add(save_errors=1)
        except Exception:
            log.exception("kvstore: wait_for_save failed")

    def _finish_load(self) -> None:
        load, self._load = self._load, None
        if load is None:
            return
        bad = load.finish()
        self._invalid |= bad
        ok = [s for i, s in enumerate(load.specs) if i not in load.failed]
        tokens = sum(len(s.block_ids) - s.first_block for s in ok) * self._shape.block_size
        with self._stats_lock:
            self._stats.data["loaded_tokens"] += tokens
            self._stats.data["loaded_bytes"] += load.loaded_bytes
            self._stats.data["load_errors"] += len(load.failed)
        TOTALS.add(
            loads=len(load.specs),
            load_errors=len(load.failed),
            loaded_tokens=tokens,
            loaded_bytes=load.loaded_bytes,
        )

    def _drop_corrupt(self, spec: LoadSpec, blobs: list[Any]) -> None:
        """Delete the chunks of a load that did not decode, so later requests recompute and re-save them."""
        try:
            for key, blob in zip(spec.keys, blobs, strict=False):
                try:
                    _codec().decode_layer(blob)
                except Exception:
                    self._client.delete(self._namespace, [key])
                    TOTALS.add(corrupt_deleted=1)
        except TransferError as exc:
            log.warning("kvstore: could not delete a corrupt block: %s", exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        try:
            self._finish_load()
        except Exception:
            log.exception("kvstore: finishing a load failed")
        bad, self._invalid = self._invalid, set()
        return bad

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KVStoreConnectorStats()
            return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVStoreConnectorStats(data=dict(data)) if data is not None else KVStoreConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return KVStorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        try:
            self.wait_for_save()
            self._client.close()
        except Exception:
            log.exception("kvstore: shutdown")
