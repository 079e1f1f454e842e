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
the chunk, split out of vLLM's cache by :mod:`transfer.vllm.layout` (which reads
the layout and the backend from vLLM and refuses one it does not know), encoded
by the codec profile chosen in the settings.

The class is vLLM's entry point and nothing more: the scheduler side lives in
:mod:`transfer.vllm.scheduler`, the worker side (loads, saves, devices) in
:mod:`transfer.vllm.worker`, the figures in :mod:`transfer.vllm.metrics`.

Failures never break a request: a store that cannot be reached is a miss at
lookup time (one log line per outage); a load that fails reports its blocks
through ``get_block_ids_with_load_errors`` and vLLM recomputes them (with
``kv_load_failure_policy="recompute"``), and the promised hit is taken back. A
corrupt block is deleted from the store so the next request re-saves it. No hook
raises into the engine's step.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from transfer.vllm.layout import PagedKV, PagedLayout, Placement, UnsupportedLayout, check_profile
from transfer.vllm.metrics import TOTALS, KVStoreConnectorStats, KVStorePromMetrics
from transfer.vllm.plan import LoadSpec, SaveSpec
from transfer.vllm.scheduler import KVStoreConnectorMetadata, SchedulerSide
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, open_store, rank_namespace
from transfer.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "TOTALS",
    "KVStoreConnector",
    "KVStoreConnectorMetadata",
    "KVStoreConnectorStats",
    "LoadSpec",
    "SaveSpec",
]

log = logging.getLogger(__name__)

_CODEC_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def engine_shape(vllm_config: VllmConfig, role: KVConnectorRole, weights: str) -> EngineShape:
    """What makes this engine's KV usable by another, read from vLLM's config."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
    dtype_name = _CODEC_DTYPES.get(dtype) if isinstance(dtype, torch.dtype) else None
    if dtype_name is None:
        raise UnsupportedLayout(
            f"KVStoreConnector stores fp16/bf16/fp32 KV; this engine's KV cache dtype is {dtype} "
            "(set --kv-cache-dtype auto)"
        )
    rank = 0
    if role == KVConnectorRole.WORKER and parallel.tensor_parallel_size > 1:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
    mla = bool(getattr(model, "use_mla", False))
    archs = getattr(model.hf_config, "architectures", None) or [model.hf_config.model_type]
    return EngineShape(
        architecture=str(archs[0]),
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=1 if mla else model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        kv_dtype=dtype_name,
        block_size=cache.block_size,
        model_name=str(model.model),
        tp_rank=rank,
        tp_size=parallel.tensor_parallel_size,
        weights=weights,
        mla=mla,
    )


def resolve_layout(vllm_config: VllmConfig, shape: EngineShape, kv_cache_config: Any = None) -> PagedLayout:
    """The paged layout of this engine: backend and layout as vLLM resolved them."""
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

    backends = get_current_attn_backends(vllm_config)
    names = sorted({b.get_name() for b in backends})
    if len(names) != 1:
        raise UnsupportedLayout(f"one attention backend per engine is supported, this one uses {names}")
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or vllm_config.cache_config.kv_cache_layout
    if layout is None:
        layout = "LBHNC" if names[0] == "CPU_ATTN" else None
    if layout is None:
        raise UnsupportedLayout("vLLM has not resolved a KV cache layout yet")
    layout = getattr(layout, "name", layout)
    return PagedLayout.resolve(
        names[0],
        is_mla=shape.mla or any(b.is_mla() for b in backends),
        layout=str(layout),
        num_heads=shape.num_kv_heads,
        block_size=shape.block_size,
        head_dim=shape.head_dim,
    )


def _weights(settings: ConnectorSettings, vllm_config: VllmConfig) -> str:
    if settings.weights_fingerprint != "auto":
        return settings.weights_fingerprint
    from transfer.vllm.fingerprint import weights_fingerprint

    model = vllm_config.model_config
    return weights_fingerprint(str(model.model), getattr(model, "revision", None))


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector over a kvstore server; see the module docstring."""

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """vLLM asks this while it builds its config (before the model loads, on engines with CUDA
        graphs): the settings are checked here so a typo stops the engine at once. Layer-by-layer
        hooks (``wait_for_layer_load``, ``save_kv_layer``) cannot run inside a full CUDA graph."""
        ConnectorSettings.from_extra(extra_config)
        return True

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = s = ConnectorSettings.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self._shape = shape = engine_shape(vllm_config, role, _weights(s, vllm_config))
        check_profile(Placement.LATENT if shape.mla else Placement.CONTENT, s.profile, shape.head_dim)
        chunk_blocks = s.chunk_blocks_for(shape.block_size)
        self._namespace = str(rank_namespace(s, shape))
        self._client = open_store(s)
        self._stats = KVStoreConnectorStats()
        self._stats_lock = threading.Lock()
        self._layer_index: dict[str, int] = {}
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            ranks = [rank_namespace(s, shape, r) for r in range(1 if shape.mla else shape.tp_size)]
            self._scheduler = SchedulerSide(
                client=self._client,
                key_namespace=str(key_namespace(s, shape)),
                rank_namespaces=[str(ns) for ns in ranks],
                num_layers=shape.num_layers,
                block_size=shape.block_size,
                chunk_blocks=chunk_blocks,
                lookup_timeout_s=s.lookup_timeout_s,
                async_loads=s.load_mode == "async",
            )
            self._check_layout()
            self._check_store()
        else:
            self._worker = WorkerSide(
                client=self._client,
                namespace=self._namespace,
                num_layers=shape.num_layers,
                block_size=shape.block_size,
                chunk_blocks=chunk_blocks,
                profile=s.profile,
                load_timeout_s=s.load_timeout_s,
                save_timeout_s=s.save_timeout_s,
                saves=not (shape.mla and shape.tp_rank != 0),
                stats=self._record,
            )
        log.info(
            "kvstore connector (%s): store %s, namespace %s, chunk %d tokens, profile %s, loads %s",
            role.name.lower(),
            s.target,
            self._namespace,
            shape.block_size * chunk_blocks,
            s.profile,
            s.load_mode,
        )

    def _check_layout(self) -> None:
        """The scheduler refuses, once and at start, an engine whose KV the workers cannot split."""
        assert self._scheduler is not None
        try:
            resolve_layout(self._vllm_config, self._shape, self._kv_cache_config)
        except UnsupportedLayout as exc:
            self._scheduler.disabled = str(exc)
            log.error("kvstore connector: %s; it offers no hits and saves nothing, prompts are computed", exc)
        except Exception as exc:  # the workers decide with the real layers; log why the check could not
            log.info("kvstore connector: layout not checked on the scheduler side (%s)", exc)

    def _check_store(self) -> None:
        assert self._scheduler is not None
        problem = self._scheduler.probe()
        if problem is None:
            return
        if self._settings.require_store:
            raise RuntimeError(
                f"kvstore connector: the store at {self._settings.target} does not answer ({problem}); "
                "kv_connector_extra_config.require_store is true, so the engine does not start"
            )
        log.error(
            "kvstore connector: the store at %s does not answer (%s); every prompt is computed until it "
            "does (set require_store: true to refuse to start instead)",
            self._settings.target,
            problem,
        )

    def _record(self, **figures: float) -> None:
        TOTALS.add(**figures)
        with self._stats_lock:
            for name in ("loaded_tokens", "loaded_bytes", "load_errors", "saved_tokens", "saved_bytes"):
                if name in figures:
                    self._stats.data[name] += figures[name]
            if "save_errors" in figures:
                self._stats.data["save_errors"] += figures["save_errors"]

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        try:
            assert self._scheduler is not None
            return self._scheduler.matched_tokens(request, num_computed_tokens)
        except Exception:  # the scheduler must keep running: a miss
            log.exception("kvstore: lookup for request %s failed", request.request_id)
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        try:
            assert self._scheduler is not None
            self._scheduler.after_alloc(request, blocks, num_external_tokens)
        except Exception:
            log.exception("kvstore: update_state_after_alloc failed")

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        try:
            if self._scheduler is not None:
                self._scheduler.on_output(connector_output)
        except Exception:
            log.exception("kvstore: update_connector_output failed")

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is not None:
            self._scheduler.finished(request)
        return False, None  # saves finish within their step (wait_for_save)

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        try:
            from vllm.model_executor.models.utils import extract_layer_index

            names = list(kv_caches)
            try:
                order = sorted(names, key=extract_layer_index)
            except Exception:
                order = names
            self._layer_index = {name: i for i, name in enumerate(order)}
            layout = resolve_layout(self._vllm_config, self._shape, self._kv_cache_config)
            num_blocks = getattr(self._kv_cache_config, "num_blocks", None) or kv_caches[order[0]].shape[0]
            paged = PagedKV(layout, [kv_caches[n] for n in order], num_blocks)
            self._worker.register(paged)
            log.info(
                "kvstore: paged KV of backend %s, layout %s (%s), %d layers",
                layout.backend,
                layout.layout,
                layout.placement.value,
                paged.num_layers,
            )
        except Exception as exc:
            self._worker.register(None, f"{type(exc).__name__}: {exc}")
            log.error("kvstore: connector disabled on this worker (%s); every load will be recomputed", exc)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        try:
            meta = self._connector_metadata
            if not isinstance(meta, KVStoreConnectorMetadata) or self._worker is None:
                return
            self._worker.start_async_loads(meta.async_loads)
            if meta.loads:
                self._worker.start_load(meta.loads)
        except Exception:
            log.exception("kvstore: start_load_kv failed")

    def wait_for_layer_load(self, layer_name: str) -> None:
        try:
            layer = self._layer_index.get(layer_name)
            if layer is None or self._worker is None:
                return
            waited = self._worker.wait_layer(layer)
            if waited is None:
                return
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
            layer = self._layer_index.get(layer_name)
            if not isinstance(meta, KVStoreConnectorMetadata) or layer is None or self._worker is None:
                return
            self._worker.save_layer(layer, meta.saves)
        except Exception:
            log.exception("kvstore: save_kv_layer failed")

    def wait_for_save(self) -> None:
        try:
            if self._worker is not None:
                self._worker.finish_load()
                self._worker.finish_saves()
        except Exception:
            log.exception("kvstore: wait_for_save failed")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return None, (self._worker.finished_loads() or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        try:
            return self._worker.take_invalid() if self._worker is not None else set()
        except Exception:
            log.exception("kvstore: finishing a load failed")
            return set()

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
            if self._worker is not None:
                self._worker.close()
            self._client.close()
        except Exception:
            log.exception("kvstore: shutdown")
