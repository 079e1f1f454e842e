"""A transformers cache whose layers arrive from the store while the model runs.

Fetching a stored prefix and then running the model serialises two costs:
``fetch(all layers) + compute``. But layer ``i`` of the forward pass needs only
layer ``i`` of the cache, and the store streams layers in order, so the two can
overlap: the model computes layer ``i`` while layers ``i+1..`` are still on the
wire, and the critical path shrinks to about ``fetch(one layer) + compute``
when the network keeps up.

:class:`LayerwiseCache` is a :class:`transformers.DynamicCache` whose slots are
filled by a background thread. The thread consumes ``(layer, blobs)`` pairs
(normally :meth:`transfer.rpc.client.KVClient.get_layers`), decodes each layer
(:func:`transfer.codec.decode_into`: all its chunks into one tensor) and
publishes it behind a per-layer ``threading.Event``. When attention in layer
``i`` calls ``update()``, the cache waits for layer ``i`` only, installs it,
and continues exactly like a DynamicCache (so the logits are the same as with a
DynamicCache holding the same tensors, and generation continues normally).

Before a layer arrives the cache already reports the prefix length, because
the model asks for it (positions, masks) before running layer 0.

``prefetch_depth`` bounds how many decoded layers may wait ahead of compute:
the loader stops pulling from the stream once that many are pending, so a slow
model back-pressures the store instead of filling memory.

Every step is recorded in :attr:`LayerwiseCache.events` with a monotonic
timestamp (``arrived``, ``decoded``, ``wait``, ``consumed``), which is how tests
and benchmarks show that layer 0 was consumed before the last layer arrived.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvstore.keys import DEFAULT_CHUNK_TOKENS, Namespace
from transfer.engines import cpu_plan as affinity
from transfer.errors import DeadlineExceeded, TransferError

Decoder = Callable[[Sequence[bytes]], tuple[torch.Tensor, torch.Tensor]]

ARRIVED = "arrived"
DECODED = "decoded"
WAIT = "wait"
CONSUMED = "consumed"


@dataclass(frozen=True)
class LayerEvent:
    kind: str
    layer: int
    t: float


class _StreamedLayer(DynamicLayer):
    """A DynamicLayer whose stored prefix is installed from the loader on first use.

    It reaches its cache through a weak reference: a strong one would make every
    cache a reference cycle (cache -> layers -> cache), freed only when Python's
    cyclic GC happens to run. Each cache holds a whole prefix of KV, so cycles
    piled up several prefixes' worth of garbage between collections, and the
    forward passes in between ran on freshly faulted memory (measured: ~90 MB
    more heap per request, TTFT 250 -> 500 ms until the GC ran).
    """

    def __init__(self, owner: LayerwiseCache, index: int, prefix_tokens: int) -> None:
        # transformers' DynamicLayer.__init__ is unannotated (untyped_calls_exclude misses super() calls)
        super().__init__()  # type: ignore[no-untyped-call]
        self._owner = weakref.ref(owner)
        self._index = index
        self._prefix_tokens = prefix_tokens
        self._installed = False

    def _ensure(self, like: torch.Tensor | None = None) -> None:
        if self._installed:
            return
        owner = self._owner()
        if owner is None:  # only reachable through a layer kept after its cache was dropped
            raise TransferError(
                f"layer {self._index}: its LayerwiseCache is gone; keep the cache, not its layers"
            )
        k, v = owner._take(self._index)
        if like is not None and (k.dtype != like.dtype or k.device != like.device):
            k, v = k.to(like.device, like.dtype), v.to(like.device, like.dtype)
        self.keys, self.values = k, v
        self.device = k.device
        self.is_initialized = True
        self._installed = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure(key_states)
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return super().get_seq_length() if self._installed else self._prefix_tokens

    def crop(self, tokens_to_remove: int) -> None:
        self._ensure()
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._ensure()
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._ensure()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._ensure()
        super().batch_select_indices(indices)


class LayerwiseCache(DynamicCache):
    """DynamicCache for a batch-1 model with full attention, filled layer by layer from a stream.

    ``source`` yields ``(layer, blobs)`` for layers ``0..num_layers-1`` in
    order; ``decode(blobs)`` turns one layer's blobs into ``(k, v)`` of shape
    ``[kv_heads, prefix_tokens, head_dim]``. The loader thread starts at once.

    ``decode_in_loader=False`` moves decoding to the model's thread, at the
    moment a layer is needed: only the transfer overlaps compute then, but the
    two threads no longer compete for the GIL, which wins when decoding is
    Python-heavy and cores are scarce (``bench/layerwise.py`` measures both).
    """

    def __init__(
        self,
        source: Iterable[tuple[int, Sequence[bytes]]],
        num_layers: int,
        prefix_tokens: int,
        *,
        decode: Decoder,
        prefetch_depth: int = 2,
        wait_timeout_s: float = 120.0,
        decode_in_loader: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_layers < 1 or prefix_tokens < 0:
            raise ValueError("num_layers must be >= 1 and prefix_tokens >= 0")
        if prefetch_depth < 1:
            raise ValueError("prefetch_depth must be >= 1")
        Cache.__init__(self, layers=[_StreamedLayer(self, i, prefix_tokens) for i in range(num_layers)])
        self.num_layers = num_layers
        self.prefix_tokens = prefix_tokens
        self.prefetch_depth = prefetch_depth
        self.wait_timeout_s = wait_timeout_s
        self._decode = decode
        self.decode_in_loader = decode_in_loader
        self._clock = clock
        self._cond = threading.Condition()
        self._ready = [threading.Event() for _ in range(num_layers)]
        self._consumed = [threading.Event() for _ in range(num_layers)]
        # decoded K and V, or the blobs when the consumer decodes (decode_in_loader off)
        self._slots: list[tuple[torch.Tensor, torch.Tensor] | Sequence[bytes] | None] = [None] * num_layers
        self._num_published = 0
        self._num_consumed = 0
        self._stopped = False
        self._error: BaseException | None = None
        self.events: list[LayerEvent] = []
        self._thread = threading.Thread(
            target=self._load, args=(iter(source),), name="layerwise-loader", daemon=True
        )
        self._thread.start()

    @classmethod
    def from_store(
        cls,
        client: Any,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        num_layers: int,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        prefetch_depth: int = 2,
        wait_timeout_s: float = 120.0,
        decode_in_loader: bool = True,
        decode_threads: int = 1,
    ) -> LayerwiseCache:
        """Start streaming every layer of ``keys`` (a stored prefix) from a :class:`KVClient`.

        ``decode_threads``: codec threads the loader decodes with. One by default: the
        loader runs next to the model's forward pass, and a decode spread over every
        core takes them from compute (measured on 2 cores: TTFT 178 -> 169 ms with one).
        Raise it when compute runs elsewhere (a GPU) and the CPU has cores to spare.
        """
        from transfer.codec import decode_into

        if not keys:
            raise ValueError("no stored chunks to stream; use a plain DynamicCache")
        source = client.get_layers(namespace, keys, 0, num_layers)
        return cls(
            source,
            num_layers,
            len(keys) * chunk_tokens,
            decode=lambda blobs: decode_into(blobs, device=device, dtype=dtype, threads=decode_threads),
            prefetch_depth=prefetch_depth,
            wait_timeout_s=wait_timeout_s,
            decode_in_loader=decode_in_loader,
        )

    # -- loader thread ----------------------------------------------------------------------------

    def _record(self, kind: str, layer: int) -> None:
        self.events.append(LayerEvent(kind, layer, self._clock()))  # list.append is atomic

    def _may_pull(self) -> bool:
        return self._stopped or self._num_published - self._num_consumed < self.prefetch_depth

    def _load(self, source: Any) -> None:
        affinity.enter_io()  # started by the model's thread: leave its cores to it when a CPU plan is active
        try:
            expected = 0
            while expected < self.num_layers:
                with self._cond:
                    if not self._cond.wait_for(self._may_pull, timeout=self.wait_timeout_s):
                        raise DeadlineExceeded(
                            f"layer {expected - self.prefetch_depth} was not consumed "
                            f"within {self.wait_timeout_s} s; cache abandoned?"
                        )
                    if self._stopped:
                        return
                item = next(source, None)
                if item is None:
                    raise TransferError(f"layer stream ended after {expected} of {self.num_layers} layers")
                layer, blobs = item
                self._record(ARRIVED, layer)
                if layer != expected:
                    raise TransferError(f"layer stream out of order: got layer {layer}, expected {expected}")
                if self.decode_in_loader:
                    slot: Any = self._decoded(layer, blobs)
                    self._record(DECODED, layer)
                else:
                    slot = blobs
                with self._cond:
                    self._slots[layer] = slot
                    self._num_published += 1
                self._ready[layer].set()
                expected += 1
        except BaseException as exc:  # handed to the consumer, which raises it in the model's thread
            self._error = exc
            for event in self._ready:
                event.set()
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # cancels the gRPC stream when we stop early

    def _decoded(self, layer: int, blobs: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._decode(blobs)
        if k.dim() != 3 or k.shape[1] != self.prefix_tokens or k.shape != v.shape:
            raise TransferError(
                f"layer {layer} decoded to K {tuple(k.shape)} / V {tuple(v.shape)}; "
                f"expected [kv_heads, {self.prefix_tokens}, head_dim]"
            )
        return k.unsqueeze(0), v.unsqueeze(0)

    # -- consumer side (the model's thread) -------------------------------------------------------

    def _take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._record(WAIT, layer)
        if not self._ready[layer].wait(self.wait_timeout_s):
            raise DeadlineExceeded(f"layer {layer} did not arrive within {self.wait_timeout_s} s")
        with self._cond:
            kv: Any = self._slots[layer]  # see _slots
            self._slots[layer] = None
            if kv is None:
                error = self._error
                if isinstance(error, TransferError):
                    raise error
                raise TransferError(f"layer {layer} could not be loaded: {error!r}") from error
            self._num_consumed += 1
            if self.decode_in_loader:
                self._record(CONSUMED, layer)  # under the lock: the log never shows more than depth pending
            self._cond.notify_all()
        if not self.decode_in_loader:
            kv = self._decoded(layer, kv)
            self._record(DECODED, layer)
            self._record(CONSUMED, layer)
        self._consumed[layer].set()
        return cast("tuple[torch.Tensor, torch.Tensor]", kv)  # decoded above or by the loader

    def consumed_event(self, layer: int) -> threading.Event:
        """Set once the model has taken layer ``layer`` (tests gate a stream on it)."""
        return self._consumed[layer]

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        """Join the loader; True when it has finished (all layers delivered, or failed, or closed)."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the loader after the layer it is receiving; the stream is cancelled."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def times(self, kind: str) -> dict[int, float]:
        """``{layer: timestamp}`` of the first event of ``kind`` per layer."""
        out: dict[int, float] = {}
        for event in list(self.events):
            if event.kind == kind and event.layer not in out:
                out[event.layer] = event.t
        return out
