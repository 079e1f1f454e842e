"""The connector's worker side: KV between vLLM's paged cache and the store, per rank.

Loads come in two modes (``load_mode``):

- ``layerwise`` (in the step): ``start_load`` opens one layer-ordered ``Get``
  stream for the step's loads in a thread that decodes layer ``i`` into the
  paged blocks and signals it; ``wait_layer(i)`` waits for that layer only, so
  layer 0's attention runs while later layers are still on the wire.
- ``async`` (outside the step): vLLM parks the request
  (``WAITING_FOR_REMOTE_KVS``) and keeps stepping the others; a thread loads
  every layer and the request is reported through ``finished_loads`` (vLLM's
  ``get_finished``), its failed blocks no later than that through
  ``take_invalid``. A long load never stalls a running request.

Saves: ``save_layer`` gathers the blocks to save (a copy, on the cache's device)
and hands them to a thread that encodes and ``Put``s them while the forward pass
goes on; ``finish_saves`` bounds it at the step's end.

Devices: on CUDA, gathered blocks go to pinned host memory on a side stream and
the encoder waits on that copy's event; decoded layers go host -> device on the
side stream, and ``wait_layer`` makes the compute stream wait on that layer's
event (the host never blocks on the copy). On CPU the same code runs without
streams: what CI tests is the GPU path's logic and format.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from transfer.errors import TransferError
from transfer.rpc.client import PutItem
from transfer.vllm.layout import PagedKV, Placement
from transfer.vllm.plan import LoadSpec, SaveSpec

log = logging.getLogger("transfer.vllm.connector")


def _codec() -> Any:
    """``transfer.codec``, imported on first use, never at module import: it loads numba, and a numba
    imported before vLLM's worker has started breaks vLLM's kernel-registry scan (vLLM 0.32, CPU)."""
    import transfer.codec

    return transfer.codec


#: ``nice`` of an asynchronous load's thread. A load outside the step is background work: on an
#: engine whose forward runs on the CPU (vLLM's CPU build binds its compute threads to every core),
#: an async loader at normal priority took the cores from the running requests' decode steps
#: (median step 4.7x longer while a 2,048-token load was in flight, bench/vllm_prefix.py); at a lower
#: priority it runs in the gaps. On a GPU engine it only orders host threads.
ASYNC_LOAD_NICE = 10


def _background_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ASYNC_LOAD_NICE)


class Staging:
    """Host <-> device moves of KV on a side stream (CUDA), or nothing at all (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        """A host copy of ``t`` and a function that returns once the copy has landed."""
        if not self.cuda:
            return t, lambda: None
        assert self.stream is not None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return host, done.synchronize

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    def write(self, paged: PagedKV, layer: int, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> Any:
        """Scatter host K and V into blocks; on CUDA on the side stream, returning its event."""
        if not self.cuda:
            paged.scatter(layer, ids, k, v)
            return None
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            paged.scatter(layer, ids, k, v)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event


class _Load:
    """One batch of loads: a thread streams layers from the store into the paged cache."""

    def __init__(self, owner: WorkerSide, specs: list[LoadSpec], *, layerwise: bool) -> None:
        self.owner = owner
        self.specs = specs
        self.layerwise = layerwise
        n = owner.num_layers
        self.events = [threading.Event() for _ in range(n)]
        self.device_events: list[Any] = [None] * n
        self.failed: dict[int, str] = {}  # spec index -> reason
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.loaded_bytes = 0
        self.deadline = time.monotonic() + owner.load_timeout_s
        self.thread = threading.Thread(target=self._run, name="kvstore-vllm-load", daemon=True)
        self.thread.start()

    def _fail(self, index: int, reason: str) -> None:
        self.failed.setdefault(index, reason)

    def _run(self) -> None:
        if not self.layerwise:
            _background_priority()
        owner = self.owner
        keys = [k for s in self.specs for k in s.keys]
        bounds, at = [], 0
        for s in self.specs:
            bounds.append((at, at + len(s.keys)))
            at += len(s.keys)
        try:
            if owner.paged is None:
                raise RuntimeError(owner.disabled_reason or "no paged KV cache registered")
            stream = owner.client.get_layers(
                owner.namespace, keys, 0, owner.num_layers, timeout_s=owner.load_timeout_s
            )
            for layer, blobs in stream:
                if self.cancelled.is_set():
                    break
                for i, spec in enumerate(self.specs):
                    if i in self.failed:
                        continue
                    part = blobs[bounds[i][0] : bounds[i][1]]
                    try:
                        self.device_events[layer] = self._write(layer, spec, part)
                    except Exception as exc:  # undecodable, wrong shape: this request recomputes
                        self._fail(i, f"layer {layer}: {exc}")
                        owner.drop_corrupt(spec, part)
                self.events[layer].set()
            if not self.layerwise and owner.staging.cuda and owner.staging.stream is not None:
                owner.staging.stream.synchronize()  # reported finished only once on the device
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
            self.done.set()
            if not self.layerwise:
                owner.async_load_done(self)

    def _write(self, layer: int, spec: LoadSpec, blobs: list[Any]) -> Any:
        owner = self.owner
        paged = owner.paged
        assert paged is not None
        codec = _codec()
        need = paged.layout.frame_shape(owner.chunk_tokens)
        for blob in blobs:  # the header alone says whether a frame fits this engine
            got = tuple(codec.read_header(blob).shape)
            if got != need:
                raise ValueError(f"stored frame has shape {got}, this engine needs {need}")
        h, t, d = need
        total = t * len(blobs)
        k = owner.staging.host_buffer((h, total, d), paged.dtype)
        v = owner.staging.host_buffer((h, total, d), paged.dtype)
        codec.decode_into(blobs, (k, v), threads=1)  # on this thread only: it runs beside the model
        self.loaded_bytes += sum(len(blob) for blob in blobs)
        skip = spec.first_block * owner.block_size
        ids = spec.block_ids[spec.first_block : len(blobs) * owner.chunk_blocks]
        if self.cancelled.is_set() or not ids:
            return None
        return owner.staging.write(paged, layer, ids, k[:, skip:], v[:, skip:])

    def wait_layer(self, layer: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        ok = self.events[layer].wait(max(0.0, self.deadline - time.monotonic()))
        waited = time.perf_counter() - t0
        if not ok:
            self.cancel(f"layer {layer} not loaded within load_timeout_s")
        elif self.device_events[layer] is not None:
            torch.cuda.current_stream().wait_event(self.device_events[layer])
        return ok, waited

    def cancel(self, reason: str) -> None:
        self.cancelled.set()
        for i in range(len(self.specs)):
            self._fail(i, reason)

    def bad_blocks(self) -> set[int]:
        bad: set[int] = set()
        for i, reason in self.failed.items():
            spec = self.specs[i]
            log.warning(
                "kvstore: load of request %s failed (%s); vLLM recomputes its %d blocks",
                spec.req_id,
                reason,
                len(spec.target_blocks),
            )
            bad.update(spec.target_blocks)
        return bad

    def loaded_tokens(self) -> int:
        ok = [s for i, s in enumerate(self.specs) if i not in self.failed]
        return sum(len(s.target_blocks) for s in ok) * self.owner.block_size


class _Save:
    """One step's saves: copies of each layer's blocks, encoded and Put by a thread."""

    def __init__(self, owner: WorkerSide, specs: list[SaveSpec]) -> None:
        self.owner = owner
        self.specs = specs
        self.block_ids = [b for s in specs for b in s.block_ids]
        self.queue: queue.Queue[tuple[int, torch.Tensor, torch.Tensor, Callable[[], None]] | None] = (
            queue.Queue()
        )
        self.error: BaseException | None = None
        self.saved_bytes = 0
        self.saved_tokens = 0
        self.thread = threading.Thread(target=self._run, name="kvstore-vllm-save", daemon=True)
        self.thread.start()

    def push(self, layer: int) -> None:
        if self.error is not None:
            return
        paged = self.owner.paged
        assert paged is not None
        k, v = paged.gather(layer, self.block_ids)  # a copy: the blocks may be reused after the step
        hk, wait_k = self.owner.staging.to_host(k)
        hv, wait_v = self.owner.staging.to_host(v)

        def landed() -> None:
            wait_k()
            wait_v()

        self.queue.put((layer, hk, hv, landed))

    def _items(self) -> Iterator[PutItem]:
        owner = self.owner
        t = owner.chunk_tokens
        while True:
            item = self.queue.get()
            if item is None:
                return
            layer, k, v, landed = item
            landed()
            pos = 0
            for spec in self.specs:
                for c, key in enumerate(spec.keys):
                    blob = _codec().encode_layer(
                        k[:, pos : pos + t],
                        v[:, pos : pos + t],
                        owner.profile,
                        token_offset=(spec.first_chunk + c) * t,
                    )
                    pos += t
                    self.saved_bytes += len(blob)
                    if layer == 0:
                        self.saved_tokens += t
                    yield PutItem(key, layer, owner.num_layers, blob)

    def _run(self) -> None:
        try:
            self.owner.client.put(self.owner.namespace, self._items(), timeout_s=self.owner.save_timeout_s)
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


class WorkerSide:
    """Loads and saves of one rank; vLLM-free, so tests drive it with real tensors and a real store.

    ``stats`` receives ``(name, value)`` figures as they happen (the connector turns
    them into vLLM's interval stats and our totals).
    """

    def __init__(
        self,
        *,
        client: Any,
        namespace: str,
        num_layers: int,
        block_size: int,
        chunk_blocks: int,
        profile: str,
        load_timeout_s: float,
        save_timeout_s: float,
        saves: bool = True,
        stats: Callable[..., None] = lambda **_: None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.num_layers = num_layers
        self.block_size = block_size
        self.chunk_blocks = chunk_blocks
        self.chunk_tokens = block_size * chunk_blocks
        self.profile = profile
        self.load_timeout_s = load_timeout_s
        self.save_timeout_s = save_timeout_s
        self.saves = saves  # False on the TP ranks that do not own a replicated (MLA) latent
        self.stats = stats
        self.paged: PagedKV | None = None
        self.disabled_reason: str | None = None
        self.staging = Staging(torch.device("cpu"))
        self._load: _Load | None = None
        self._save: _Save | None = None
        self._lock = threading.Lock()
        self._async: list[_Load] = []
        self._finished: set[str] = set()
        self._invalid: set[int] = set()

    def register(self, paged: PagedKV | None, reason: str | None = None) -> None:
        if paged is not None and paged.num_layers != self.num_layers:
            reason = f"{paged.num_layers} layers with KV, the model config says {self.num_layers}"
            paged = None
        self.paged, self.disabled_reason = paged, reason
        if paged is not None:
            self.staging = Staging(paged.device)
            if paged.layout.placement is Placement.LATENT:
                log.info(
                    "kvstore: MLA latent KV; %s", "this rank saves it" if self.saves else "rank 0 saves it"
                )

    # ------------------------------------------------------------------ loads

    def start_load(self, specs: list[LoadSpec]) -> None:
        self.finish_load()
        if specs:
            self._load = _Load(self, specs, layerwise=True)

    def start_async_loads(self, specs: list[LoadSpec]) -> None:
        if specs:
            load = _Load(self, specs, layerwise=False)
            with self._lock:
                self._async.append(load)
            self.stats(async_loads=len(specs))

    def async_load_done(self, load: _Load) -> None:
        """Called by an async load's thread: failed blocks first, then the requests as finished."""
        bad = load.bad_blocks()
        self._account(load)
        with self._lock:
            self._invalid |= bad
            self._finished.update(s.req_id for s in load.specs)
            if load in self._async:
                self._async.remove(load)

    def wait_layer(self, layer: int) -> float | None:
        load = self._load
        if load is None:
            return None
        _, waited = load.wait_layer(layer)
        return waited

    def finish_load(self) -> None:
        load, self._load = self._load, None
        if load is None:
            return
        load.thread.join(max(0.0, load.deadline - time.monotonic()))
        if load.thread.is_alive():
            load.cancel("load still running at the end of the step")
        bad = load.bad_blocks()
        with self._lock:
            self._invalid |= bad
        self._account(load)

    def _account(self, load: _Load) -> None:
        self.stats(
            loads=len(load.specs),
            load_errors=len(load.failed),
            loaded_tokens=load.loaded_tokens(),
            loaded_bytes=load.loaded_bytes,
        )

    def finished_loads(self) -> set[str]:
        with self._lock:
            done, self._finished = self._finished, set()
        return done

    def take_invalid(self) -> set[int]:
        self.finish_load()
        with self._lock:
            bad, self._invalid = self._invalid, set()
        return bad

    def drop_corrupt(self, spec: LoadSpec, blobs: list[Any]) -> None:
        """Delete the chunks of a load that did not decode, so later requests recompute and re-save them."""
        try:
            for key, blob in zip(spec.keys, blobs, strict=False):
                try:
                    _codec().decode_layer(blob)
                except Exception:
                    self.client.delete(self.namespace, [key])
                    self.stats(corrupt_deleted=1)
        except TransferError as exc:
            log.warning("kvstore: could not delete a corrupt block: %s", exc)

    # ------------------------------------------------------------------ saves

    def save_layer(self, layer: int, specs: list[SaveSpec]) -> None:
        if not specs or self.paged is None or not self.saves:
            return
        if self._save is None:
            self._save = _Save(self, specs)
        self._save.push(layer)

    def finish_saves(self) -> None:
        save, self._save = self._save, None
        if save is None:
            return
        if save.finish(self.save_timeout_s):
            self.stats(saves=1, saved_bytes=save.saved_bytes, saved_tokens=save.saved_tokens)
        else:
            self.stats(save_errors=1)

    def close(self) -> None:
        self.finish_saves()
        self.finish_load()
        with self._lock:
            pending = list(self._async)
        for load in pending:
            load.cancel("connector shut down")
            load.thread.join(5.0)
