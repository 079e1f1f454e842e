"""The connector's scheduler side: one Lookup per request, and the step's loads and saves.

Runs in vLLM's engine core, once per engine. It never touches KV: it decides which
chunks a request loads (the stored prefix it was promised) and which it saves
(each prompt chunk once it is fully computed and not yet stored), by block id.

Truthful hits: a promise made at lookup time is only a hit once its load
succeeded. When a load fails, the worker reports its blocks; this side then takes
the hit back from vLLM's per-request stats (``num_cached_tokens``) and from our
totals, and answers 0 if vLLM asks again for the same request, so a recompute is
never shown as a cache hit.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvstore.keys import ChunkKey, chunk_keys
from transfer.errors import TransferError
from transfer.vllm.metrics import TOTALS
from transfer.vllm.plan import LoadSpec, SaveSpec

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("transfer.vllm.connector")

#: After a failed lookup, further failures are logged at most this often (with a count).
WARN_EVERY_S = 60.0


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)  # layer by layer, inside this step
    async_loads: list[LoadSpec] = field(default_factory=list)  # outside the step, done via get_finished
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _RequestState:
    """What the scheduler side tracks per live request."""

    request: Any  # vLLM's Request: its prefill stats are corrected if a load fails
    prompt_len: int
    keys: list[ChunkKey]  # keys of every full chunk of the prompt
    stored_chunks: int  # chunks known to be in the store (looked up, or saved)
    block_ids: list[int] = field(default_factory=list)
    load_failed: bool = False


class SchedulerSide:
    """Lookups and planning; ``client`` is a store client, ``rank_namespaces`` where each rank's blobs live."""

    def __init__(
        self,
        *,
        client: Any,
        key_namespace: str,
        rank_namespaces: list[str],
        num_layers: int,
        block_size: int,
        chunk_blocks: int,
        lookup_timeout_s: float,
        async_loads: bool,
    ) -> None:
        self.client = client
        self.key_ns = key_namespace
        self.rank_namespaces = rank_namespaces
        self.num_layers = num_layers
        self.block_size = block_size
        self.chunk_blocks = chunk_blocks
        self.chunk_tokens = block_size * chunk_blocks
        self.lookup_timeout_s = lookup_timeout_s
        self.async_loads = async_loads
        self.requests: dict[str, _RequestState] = {}
        self.pending: dict[str, tuple[int, int, list[int]]] = {}  # req -> (local tokens, hit, async blocks)
        self.loading: dict[str, LoadSpec] = {}  # planned loads not yet known to have succeeded
        self._failures = 0
        self._last_warning = 0.0
        self.disabled: str | None = None  # why this engine's KV cannot be stored (logged once at start)

    # ------------------------------------------------------------------ start

    def probe(self) -> str | None:
        """Ask the store once; the reason it cannot be reached, or None when it answers."""
        try:
            self.client.lookup(
                self.rank_namespaces[0], [uuid.uuid4().bytes * 2], 1, timeout_s=self.lookup_timeout_s
            )
            return None
        except TransferError as exc:
            return f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ lookups

    def matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if self.disabled:
            return 0, False
        state = self.requests.get(request.request_id)
        if state is None:
            state = self._lookup(request)
            self.requests[request.request_id] = state
        if state.load_failed:
            return 0, False  # vLLM asks again after a failed async load: it recomputes
        hit = state.stored_chunks * self.chunk_tokens
        n = hit - num_computed_tokens
        return (n, self.async_loads) if n > 0 else (0, False)

    def _lookup(self, request: Request) -> _RequestState:
        prompt = list(request.prompt_token_ids or [])
        keys = chunk_keys(prompt, self.key_ns, self.chunk_tokens)
        usable = max(0, (len(prompt) - 1) // self.chunk_tokens)  # vLLM must compute >= 1 prompt token
        found = 0
        if usable:
            TOTALS.add(lookups=1)
            try:
                found = min(
                    self.client.lookup(ns, keys[:usable], self.num_layers, timeout_s=self.lookup_timeout_s)
                    for ns in self.rank_namespaces
                )
                if self._failures:
                    log.info("kvstore: store answers again after %d failed lookup(s)", self._failures)
                    self._failures = 0
            except TransferError as exc:
                TOTALS.add(lookup_errors=1)
                self._warn_lookup(exc)
        return _RequestState(request=request, prompt_len=len(prompt), keys=keys, stored_chunks=found)

    def _warn_lookup(self, exc: TransferError) -> None:
        """One line per outage, then one a minute with a count: not a warning per request."""
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning(
                "kvstore: lookup failed (%s); prompts are computed (%d failure(s) so far in this outage)",
                exc,
                self._failures,
            )

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        state = self.requests.get(request.request_id)
        if state is None:
            return
        hit = state.stored_chunks * self.chunk_tokens
        ids = list(blocks.get_block_ids()[0]) if self.async_loads else []
        self.pending[request.request_id] = (hit - num_external_tokens, hit, ids)
        TOTALS.add(offered_tokens=num_external_tokens)

    # ------------------------------------------------------------------ planning

    def build_meta(self, out: SchedulerOutput) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        if self.disabled:
            return meta
        try:
            self._plan(out, meta)
        except Exception:
            log.exception("kvstore: planning loads/saves failed; this step neither loads nor saves")
            meta = KVStoreConnectorMetadata()
        self.pending.clear()
        return meta

    def _plan(self, out: SchedulerOutput, meta: KVStoreConnectorMetadata) -> None:
        bs, m = self.block_size, self.chunk_blocks
        if self.async_loads:  # the request waits for its load; it is not scheduled in this step
            for req_id, (local, hit, ids) in list(self.pending.items()):
                state = self.requests.get(req_id)
                if state is None:
                    continue
                n = hit // self.chunk_tokens
                spec = LoadSpec(req_id, state.keys[:n], ids[: n * m], local // bs)
                meta.async_loads.append(spec)
                self.loading[req_id] = spec
            self.pending.clear()
        steps: list[tuple[str, int]] = []
        for new in out.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            steps.append((new.req_id, new.num_computed_tokens + out.num_scheduled_tokens.get(new.req_id, 0)))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids is not None else state.block_ids
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            steps.append((req_id, cached.num_computed_tokens[i] + out.num_scheduled_tokens.get(req_id, 0)))
        for req_id, computed_after in steps:
            state = self.requests[req_id]
            if req_id in self.pending:
                local, hit, _ = self.pending[req_id]
                n = hit // self.chunk_tokens
                spec = LoadSpec(req_id, state.keys[:n], state.block_ids[: n * m], local // bs)
                meta.loads.append(spec)
                self.loading[req_id] = spec
            done = min(computed_after, state.prompt_len) // self.chunk_tokens
            if done > state.stored_chunks and len(state.block_ids) >= done * m:
                first = state.stored_chunks
                meta.saves.append(
                    SaveSpec(req_id, state.keys[first:done], state.block_ids[first * m : done * m], first)
                )
                state.stored_chunks = done

    # ------------------------------------------------------------------ outcomes

    def on_output(self, output: KVConnectorOutput) -> None:
        """Loads that failed (their blocks reported) are not hits; loads that finished are."""
        bad = set(output.invalid_block_ids or ())
        failed_reqs = set(getattr(output, "failed_recving", None) or ())
        if not bad and not failed_reqs:
            return
        # A request's blocks are its own until it finishes, and only loads are reported, so a
        # reported block names the load it belongs to whichever step it was planned in.
        for req_id, spec in list(self.loading.items()):
            if req_id in failed_reqs or bad.intersection(spec.target_blocks):
                self._take_back(req_id, spec)
                del self.loading[req_id]

    def _take_back(self, req_id: str, spec: LoadSpec) -> None:
        state = self.requests.get(req_id)
        TOTALS.add(untrue_hits=1)
        if state is None:
            return
        state.load_failed = True
        stats = getattr(state.request, "prefill_stats", None)
        promised: Any = getattr(stats, "num_external_cached_tokens", 0)
        if stats is not None and promised:
            # vLLM 0.32 records the promised external tokens when it schedules the request and keeps
            # them after a failed load; the request computes them now, so they are not cached tokens.
            stats.set(
                num_prompt_tokens=stats.num_prompt_tokens,
                num_local_cached_tokens=stats.num_local_cached_tokens,
                num_external_cached_tokens=0,
            )

    def finished(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self.pending.pop(request.request_id, None)
        self.loading.pop(request.request_id, None)
