"""Very long contexts (up to millions of tokens) to and from the store in bounded memory.

A million tokens of SmolLM2 KV is ~23 GB in fp16: it fits neither in a gRPC
message nor, comfortably, in RAM. :mod:`transfer.engines.kvio` already streams chunk by
chunk; this module adds what only matters at that scale:

* :func:`offload_context` / :func:`offload_frames` write a context chunk by chunk
  as it is produced. Items are grouped into Put streams of ``batch_bytes`` and at
  most ``parallel`` streams are in flight, so the client never holds more than
  ``(parallel + 1) * batch_bytes`` of encoded KV (the server buffers one stream
  per in-flight Put before writing it, so it holds about the same).
* :func:`stream_layers` reads layer by layer (every chunk of layer 0, then layer
  1, ...) in *windows* of ``window_keys`` chunks: one Get per (layer, window), at
  most ``prefetch`` of them running ahead of the consumer. A single Get of all
  3,907 chunk keys of one layer would make the server load ~770 MB of one layer
  before sending the first byte; windows keep both sides at
  ``(prefetch + 1) * window_keys`` blobs.
* :func:`read_layers` decodes those windows straight into one preallocated tensor
  per layer (:func:`transfer.codec.decode_into` with a destination), for a
  consumer that wants whole layers (one layer of a 1M-token context is 768 MB
  of fp16 K+V; only the layer being yielded is alive here).
* :func:`peak_rss_bytes` / :func:`reset_peak_rss` read and reset a process's
  ``VmHWM``: how the test suite and ``bench/offload_1m.py`` check the promise.

The codec (:mod:`transfer.codec`) is imported only by the functions that encode
or decode, so moving pre-encoded frames needs no torch work at all.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvstore.keys import DEFAULT_CHUNK_TOKENS, Namespace
from kvstore.wire import Blob
from transfer.rpc.client import KVClient, PutItem

MiB = 1024 * 1024
DEFAULT_BATCH_BYTES = 32 * MiB
DEFAULT_PARALLEL = 2
DEFAULT_WINDOW_KEYS = 128
DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class OffloadResult:
    """What an offload stored: chunks, blobs, encoded bytes and the Put streams it took."""

    num_chunks: int
    num_blobs: int
    bytes_stored: int
    num_requests: int


class LayerWindow(NamedTuple):
    """Blobs of ``layer`` for chunks ``first_chunk .. first_chunk + len(blobs)``, in chunk order."""

    layer: int
    first_chunk: int
    blobs: list[Blob]


# ----------------------------------------------------------------------------- writing


def offload_frames(
    client: KVClient,
    namespace: Namespace | str,
    keys: Sequence[bytes],
    frames: Iterable[Sequence[bytes]],
    *,
    start_chunk: int = 0,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    parallel: int = DEFAULT_PARALLEL,
) -> OffloadResult:
    """Store already-encoded chunks: ``frames`` yields, per chunk, one blob per layer (layer 0 first).

    Chunks are zipped with ``keys[start_chunk:]``; more chunks than keys is a
    ``ValueError``. Blocks until every Put stream is acknowledged; the first
    failing stream's error is raised (earlier streams stay stored: puts are
    idempotent, so a retry of the whole offload is safe).
    """
    if batch_bytes <= 0 or parallel < 1:
        raise ValueError("batch_bytes must be > 0 and parallel >= 1")
    ns = str(namespace)
    keys = list(keys)
    pending: deque[Future[Any]] = deque()
    totals = {"chunks": 0, "blobs": 0, "bytes": 0, "requests": 0}

    def settle(future: Future[Any]) -> None:
        result = future.result()
        totals["requests"] += result.num_requests
        totals["bytes"] += result.bytes_stored
        totals["blobs"] += result.num_stored

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="kvstore-offload") as pool:
        try:
            batch: list[PutItem] = []
            size = 0
            for i, chunk in enumerate(frames):
                index = start_chunk + i
                if index >= len(keys):
                    raise ValueError(f"more chunks than keys ({len(keys)})")
                num_layers = len(chunk)
                for layer, blob in enumerate(chunk):
                    batch.append(PutItem(keys[index], layer, num_layers, blob))
                    size += len(blob)
                totals["chunks"] += 1
                if size >= batch_bytes:
                    while len(pending) >= parallel:
                        settle(pending.popleft())
                    pending.append(pool.submit(client.put, ns, batch))
                    batch, size = [], 0
            if batch:
                while len(pending) >= parallel:
                    settle(pending.popleft())
                pending.append(pool.submit(client.put, ns, batch))
            while pending:
                settle(pending.popleft())
        finally:
            for future in pending:
                future.cancel()
    return OffloadResult(totals["chunks"], totals["blobs"], totals["bytes"], totals["requests"])


def encode_chunks(
    chunks: Iterable[Sequence[tuple[Any, Any]]],
    *,
    profile: str,
    start_chunk: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Iterator[list[bytes]]:
    """Encode a stream of chunks (per layer ``(k, v)`` of ``[kv_heads, chunk_tokens, head_dim]``) lazily."""
    from transfer.codec import encode

    for i, chunk_kv in enumerate(chunks):
        offset = (start_chunk + i) * chunk_tokens
        for layer, (k, _) in enumerate(chunk_kv):
            if k.shape[1] != chunk_tokens:
                raise ValueError(
                    f"chunk {start_chunk + i} layer {layer} has {k.shape[1]} tokens, expected {chunk_tokens}"
                )
        yield encode(list(chunk_kv), profile, token_offset=offset)  # layers side by side on the codec threads


def offload_context(
    client: KVClient,
    namespace: Namespace | str,
    keys: Sequence[bytes],
    chunks: Iterable[Sequence[tuple[Any, Any]]],
    *,
    profile: str | None = None,
    start_chunk: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    parallel: int = DEFAULT_PARALLEL,
) -> OffloadResult:
    """Encode and store a context produced chunk by chunk; the profile defaults to the namespace's."""
    profile = profile or Namespace.parse(str(namespace)).profile
    frames = encode_chunks(chunks, profile=profile, start_chunk=start_chunk, chunk_tokens=chunk_tokens)
    return offload_frames(
        client, namespace, keys, frames, start_chunk=start_chunk, batch_bytes=batch_bytes, parallel=parallel
    )


# ----------------------------------------------------------------------------- reading


def stream_layers(
    client: KVClient,
    namespace: Namespace | str,
    keys: Sequence[bytes],
    layer_start: int,
    layer_end: int,
    *,
    window_keys: int = DEFAULT_WINDOW_KEYS,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[LayerWindow]:
    """Yield :class:`LayerWindow` s in layer order, then chunk order, with bounded read-ahead.

    Every blob's integrity trailer is checked by the client on arrival. Closing
    the iterator early stops issuing Gets (those already running finish and are
    dropped).
    """
    if window_keys < 1 or prefetch < 0:
        raise ValueError("window_keys must be >= 1 and prefetch >= 0")
    if not 0 <= layer_start < layer_end:
        raise ValueError(f"empty layer range [{layer_start}, {layer_end})")
    ns = str(namespace)
    keys = [bytes(k) for k in keys]
    plan = [
        (layer, first)
        for layer in range(layer_start, layer_end)
        for first in range(0, len(keys), window_keys)
    ]
    return _stream(client, ns, keys, plan, window_keys, prefetch)


def _fetch(client: KVClient, ns: str, keys: list[bytes], layer: int) -> list[Blob]:
    blobs: list[Blob] = []
    for _, part in client.get_layers(ns, keys, layer, layer + 1):
        blobs.extend(part)
    return blobs


def _stream(
    client: KVClient, ns: str, keys: list[bytes], plan: list[tuple[int, int]], window_keys: int, prefetch: int
) -> Iterator[LayerWindow]:
    if not plan:
        return
    if prefetch == 0:
        for layer, first in plan:
            yield LayerWindow(layer, first, _fetch(client, ns, keys[first : first + window_keys], layer))
        return
    pool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="kvstore-prefetch")
    pending: deque[tuple[int, int, Future[list[Blob]]]] = deque()
    steps = iter(plan)
    try:
        for layer, first in steps:
            pending.append(
                (layer, first, pool.submit(_fetch, client, ns, keys[first : first + window_keys], layer))
            )
            if len(pending) >= prefetch:
                break
        while pending:
            layer, first, future = pending.popleft()
            blobs = future.result()
            step = next(steps, None)
            if step is not None:
                nl, nf = step
                pending.append((nl, nf, pool.submit(_fetch, client, ns, keys[nf : nf + window_keys], nl)))
            yield LayerWindow(layer, first, blobs)
            del blobs
    finally:
        for _, _, future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def read_layers(
    client: KVClient,
    namespace: Namespace | str,
    keys: Sequence[bytes],
    layer_start: int,
    layer_end: int,
    *,
    num_tokens: int | None = None,
    dtype: Any = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    window_keys: int = DEFAULT_WINDOW_KEYS,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[tuple[int, Any, Any]]:
    """Yield ``(layer, k, v)`` over the whole context, each ``[kv_heads, tokens, head_dim]``.

    Windows are decoded as they arrive into one tensor per layer, allocated
    when the layer's first window arrives (heads and head_dim from its first
    frame's header); ``dtype`` defaults to the frames'. ``num_tokens`` (default
    ``len(keys) * chunk_tokens``) sizes it.
    """
    import torch

    from transfer.codec import decode_into, read_header

    total = num_tokens if num_tokens is not None else len(keys) * chunk_tokens
    k_out = v_out = None
    current = -1
    filled = 0
    for window in stream_layers(
        client, namespace, keys, layer_start, layer_end, window_keys=window_keys, prefetch=prefetch
    ):
        if window.layer != current:
            if k_out is not None:
                yield current, k_out, v_out
            k_out = v_out = None
            current, filled = window.layer, 0
        if not window.blobs:
            continue
        headers = [read_header(b) for b in window.blobs]  # sizes only: decode_into verifies each frame
        if k_out is None or v_out is None:  # (set together)
            first = headers[0]
            k_out = torch.empty((first.heads, total, first.head_dim), dtype=dtype or first.dtype)
            v_out = torch.empty_like(k_out)
        decode_into(window.blobs, (k_out, v_out), token_offset=filled)  # a window's frames side by side
        filled += sum(h.tokens for h in headers)
    if k_out is not None:
        yield current, k_out, v_out


# ----------------------------------------------------------------------------- accounting


def fp16_bytes(num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of a context's K and V in fp16: the yardstick for "fp16-equivalent" throughput."""
    return 2 * num_layers * num_kv_heads * num_tokens * head_dim * 2


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/{pid}/status has no {field} line")
    return int(match.group(1)) * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (``VmHWM``) of a process since start or the last :func:`reset_peak_rss`."""
    return _status_kib(pid, "VmHWM")


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size (``VmRSS``) of a process."""
    return _status_kib(pid, "VmRSS")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where that is not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def page_cache_drop(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to drop ``path``'s cached pages (clean ones only), so a re-read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
