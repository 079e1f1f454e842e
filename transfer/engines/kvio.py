"""Glue between a model's per-layer KV tensors and the store's (chunk, layer) blobs.

The client moves bytes and the codec turns tensors into bytes; this module cuts
a context into the store's unit (one full chunk of ``chunk_tokens`` tokens, one
layer), encodes it, and puts it back together on the way out:

* :func:`put_context` stores the full chunks of a context whose KV is already
  in memory (a prefill's cache), from ``start_chunk`` on (the chunks before it
  are already stored). Encoding is lazy: a chunk's blobs are made (its
  layers side by side on the codec threads) just before they are sent, so
  only one Put batch of encoded bytes exists at a time.
* :func:`put_chunks` is the streaming variant: it takes an iterator of per-chunk
  KV, so a context too big for memory (a million tokens) is written chunk by
  chunk as it is produced.
* :func:`iter_layers` reads layers back one at a time (all chunks of layer 0,
  then layer 1, ...), so memory holds one layer of the context, never all.
* :func:`fetch_prefix` is the common case: look up how much of a context is
  stored and fetch it, every layer, ready for a transformers cache.

Tensors are ``[kv_heads, tokens, head_dim]`` per layer, as in
:func:`workers.model.cache_to_layers`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.keys import DEFAULT_CHUNK_TOKENS, ChunkKey, Namespace, chunk_keys
from transfer.codec import LayerKV, decode_into, encode
from transfer.rpc.client import KVClient, PutItem, PutResult


def profile_of(namespace: Namespace | str) -> str:
    """The codec profile named by a namespace's last part (``tenant/model/profile``)."""
    return Namespace.parse(str(namespace)).profile


def chunk_items(
    chunk_kv: Sequence[LayerKV],
    key: bytes,
    *,
    profile: str,
    token_offset: int,
    num_layers: int | None = None,
    context_end: int | None = None,
) -> Iterator[PutItem]:
    """PutItems for one chunk, layer 0 first; each layer is encoded only when pulled."""
    total = num_layers if num_layers is not None else len(chunk_kv)
    if len(chunk_kv) != total:
        raise ValueError(f"chunk has {len(chunk_kv)} layers, expected {total}")
    # the chunk's layers encode side by side on the codec threads
    for layer, blob in enumerate(
        encode(list(chunk_kv), profile, token_offset=token_offset, context_end=context_end)
    ):
        yield PutItem(key, layer, total, blob)


def context_items(
    namespace: Namespace | str,
    keys: Sequence[bytes],
    layers_kv: Sequence[LayerKV],
    *,
    profile: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    start_chunk: int = 0,
    saliency: torch.Tensor | None = None,
    context_end: int | None = None,
) -> Iterator[PutItem]:
    """Lazily encoded PutItems for chunks ``start_chunk..len(keys)`` of an in-memory context.

    ``layers_kv[l]`` holds the KV of tokens ``0..`` of the context (at least
    ``len(keys) * chunk_tokens`` of them); ``saliency``, when given, is indexed
    by token on its last dimension and handed to the codec chunk by chunk;
    ``context_end`` (the context's length) lets lossy profiles keep its most
    recent tokens at high precision.
    """
    profile = profile or profile_of(namespace)
    num_layers = len(layers_kv)
    needed = len(keys) * chunk_tokens
    for layer, (k, v) in enumerate(layers_kv):
        if k.shape != v.shape or k.dim() != 3 or k.shape[1] < needed:
            raise ValueError(
                f"layer {layer}: K {tuple(k.shape)} / V {tuple(v.shape)} must be "
                f"[kv_heads, >= {needed} tokens, head_dim] and equal"
            )
    for chunk in range(start_chunk, len(keys)):
        a, b = chunk * chunk_tokens, (chunk + 1) * chunk_tokens
        sal = saliency[..., a:b] if saliency is not None else None
        # the chunk's layers encode side by side on the codec threads (one chunk of frames at a time)
        blobs = encode(
            [(k[:, a:b], v[:, a:b]) for k, v in layers_kv],
            profile,
            saliency=sal,
            token_offset=a,
            context_end=context_end,
        )
        for layer, blob in enumerate(blobs):
            yield PutItem(keys[chunk], layer, num_layers, blob)


def put_context(
    client: KVClient,
    namespace: Namespace | str,
    token_ids: Sequence[int],
    layers_kv: Sequence[LayerKV],
    profile: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    start_chunk: int = 0,
    *,
    saliency: torch.Tensor | None = None,
) -> tuple[list[ChunkKey], PutResult]:
    """Encode and store every full chunk of a context from ``start_chunk`` on.

    Returns the context's chunk keys (all of them, for later lookups) and what
    the server stored. A trailing partial chunk is not stored: its key would
    change when the context grows.
    """
    keys = chunk_keys(token_ids, namespace, chunk_tokens)
    items = context_items(
        namespace,
        keys,
        layers_kv,
        profile=profile,
        chunk_tokens=chunk_tokens,
        start_chunk=start_chunk,
        saliency=saliency,
        context_end=len(token_ids),
    )
    return keys, client.put(namespace, items)


def put_chunks(
    client: KVClient,
    namespace: Namespace | str,
    keys: Sequence[bytes],
    chunks: Iterable[Sequence[LayerKV]],
    *,
    profile: str | None = None,
    start_chunk: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    context_end: int | None = None,
) -> PutResult:
    """Store a context produced chunk by chunk, holding one chunk (plus one Put batch) at a time.

    ``chunks`` yields, for chunks ``start_chunk, start_chunk + 1, ...``, the
    per-layer ``(k, v)`` of that chunk only (``[kv_heads, chunk_tokens,
    head_dim]``); it is zipped with ``keys[start_chunk:]`` and may stop early.
    ``context_end`` is the context's total length when known (see :func:`context_items`).
    """
    profile = profile or profile_of(namespace)

    def items() -> Iterator[PutItem]:
        for i, chunk_kv in enumerate(chunks):
            index = start_chunk + i
            if index >= len(keys):
                raise ValueError(f"more chunks than keys ({len(keys)})")
            for layer, (k, _) in enumerate(chunk_kv):
                if k.shape[1] != chunk_tokens:
                    raise ValueError(
                        f"chunk {index} layer {layer} has {k.shape[1]} tokens, expected {chunk_tokens}"
                    )
            yield from chunk_items(
                chunk_kv,
                keys[index],
                profile=profile,
                token_offset=index * chunk_tokens,
                context_end=context_end,
            )

    return client.put(namespace, items())


def iter_layers(
    client: KVClient,
    namespace: Namespace | str,
    keys: Sequence[bytes],
    layer_start: int,
    layer_end: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(layer, k, v)`` over all ``keys``, one decoded layer at a time, in layer order."""
    for layer, blobs in client.get_layers(namespace, keys, layer_start, layer_end):
        k, v = decode_into(blobs, device=device, dtype=dtype)
        yield layer, k, v


@dataclass
class FetchedPrefix:
    """The stored prefix of a context: how many chunks matched and their KV per layer."""

    keys: list[ChunkKey]
    num_chunks: int
    num_tokens: int
    layers: list[LayerKV]

    def to_cache(self, config: Any = None) -> Any:
        """A transformers DynamicCache (batch 1) holding the prefix."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        for i, (k, v) in enumerate(self.layers):
            cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
        return cache


def fetch_prefix(
    client: KVClient,
    namespace: Namespace | str,
    token_ids: Sequence[int],
    num_layers: int,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    max_chunks: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> FetchedPrefix:
    """Look up the longest stored prefix of ``token_ids`` and fetch all its layers.

    ``max_chunks`` caps what is reused (a caller that must recompute the last
    token keeps at least one token out of the prefix).
    """
    keys = chunk_keys(token_ids, namespace, chunk_tokens)
    if max_chunks is not None:
        keys = keys[:max_chunks]
    n = client.lookup(namespace, keys, num_layers) if keys else 0
    if n == 0:
        return FetchedPrefix(keys, 0, 0, [])
    layers = [
        (k, v)
        for _, k, v in iter_layers(client, namespace, keys[:n], 0, num_layers, device=device, dtype=dtype)
    ]
    return FetchedPrefix(keys, n, n * chunk_tokens, layers)
