"""The decode worker: pick a prefilled request up from the store and generate greedily.

Given a :class:`workers.prefill.PrefillHandle` the worker looks up the stored
prefix of the prompt (normally every reusable chunk prefill just stored),
streams it layer by layer into a :class:`transfer.engines.layerwise.LayerwiseCache`,
recomputes the short tail (the tokens after the last full chunk, which are never
stored) while later layers are still arriving, and then decodes one token at a
time. If chunks went missing (evicted between prefill and decode) it recomputes
from the last stored one: slower, never wrong.

The first generated token is the one prefill already produced (and a client may
already have shown); decode continues from it. Whether decode's own recompute
of the tail agrees with it is reported (``first_token_match``), which is how a
lossy codec profile shows up at the handoff.

:meth:`DecodeWorker.stream` yields :class:`TokenEvent` per token and ends with
one :class:`DecodeSummary`; :mod:`workers.pipeline` turns it into a Ray
streaming generator.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.prefill import PrefillHandle, StoreWorker, close_cache, prefill_from_store

if TYPE_CHECKING:
    from transfer.codec import LayerKV


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int
    token: int
    t: float  # seconds since decode started on the worker


@dataclass(frozen=True)
class DecodeSummary:
    request_id: str
    tokens: tuple[int, ...]
    num_fetched_tokens: int  # prompt KV read from the store
    num_recomputed_tokens: int  # prompt tokens decode ran through the model
    first_token_match: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.timings["generate_s"] if self.timings.get("generate_s") else 0.0


def handed_over_cache(prefix: Iterable[LayerKV], num_layers: int, num_tokens: int) -> Any:
    """A layer-wise cache fed by per-layer KV that is already decoded (a direct handoff).

    Same overlap as the store path: layer ``i`` is computed while later layers
    are still being pulled from ``prefix``.
    """
    from transfer.engines.layerwise import LayerwiseCache

    source = enumerate(prefix)
    return LayerwiseCache(source, num_layers, num_tokens, decode=lambda kv: kv)


class DecodeWorker(StoreWorker):
    """Greedy decoding from a stored prompt cache (see the module docstring)."""

    def stream(
        self, handle: PrefillHandle, max_new_tokens: int, *, prefix: Iterable[LayerKV] | None = None
    ) -> Iterator[TokenEvent | DecodeSummary]:
        """Generate for ``handle``; ``prefix`` (per-layer KV of ``[0, boundary)``, pulled lazily in
        layer order) replaces the store when prefill handed its KV over directly."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        start = time.perf_counter()
        runner, c = self.runner, handle.chunk_tokens
        if prefix is not None and handle.boundary:
            cache, past = handed_over_cache(prefix, runner.shape.num_layers, handle.boundary), handle.boundary
            try:
                out = runner.prefill(handle.token_ids, cache, past_tokens=past, boundary=handle.boundary)
            finally:
                close_cache(cache)
        else:
            keys = handle.prefix_keys
            present = self.client.lookup(handle.namespace, keys, runner.shape.num_layers) if keys else 0
            out, reused = prefill_from_store(
                self.client,
                runner,
                handle.namespace,
                keys[:present],
                handle.token_ids,
                c,
                handle.boundary,
                layerwise=self.config.layerwise,
            )
            past = reused * c
        t_ready = time.perf_counter()
        tokens: list[int] = []
        for i, token in enumerate(runner.iter_decode(out.cache, handle.first_token, max_new_tokens)):
            tokens.append(token)
            yield TokenEvent(handle.request_id, i, token, time.perf_counter() - start)
        t_end = time.perf_counter()
        yield DecodeSummary(
            request_id=handle.request_id,
            tokens=tuple(tokens),
            num_fetched_tokens=past,
            num_recomputed_tokens=out.num_computed,
            first_token_match=out.first_token == handle.first_token,
            timings={"restore_s": t_ready - start, "generate_s": t_end - t_ready, "total_s": t_end - start},
        )

    def decode(self, handle: PrefillHandle, max_new_tokens: int) -> DecodeSummary:
        """The whole generation at once (no streaming)."""
        summary = None
        for item in self.stream(handle, max_new_tokens):
            if isinstance(item, DecodeSummary):
                summary = item
        if summary is None:  # stream() always ends with a summary; this guards a broken generator
            raise RuntimeError(f"decode of {handle.request_id!r} produced no summary")
        return summary
