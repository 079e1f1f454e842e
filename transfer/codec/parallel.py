"""Frames encoded and decoded on every core: one shared thread pool, order kept, memory bounded.

Why threads work here: the CPU kernels (cpu_kernels), zstd and torch's casts
all release the GIL, so frames of a chunk or a layer run side by side; the
Python glue between them is a small part of a frame's time. One pool per
process (``KVSTORE_CODEC_THREADS``, default: the usable cores) is shared by
every caller, so a worker that reads and writes at once does not oversubscribe
the machine. ``KVSTORE_CODEC_THREADS=1`` keeps everything on the calling thread.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from kvstore.integrity import TRAILER_BYTES
from transfer import affinity
from transfer.codec import cpu_decode, cpu_kernels
from transfer.codec.errors import CorruptFrame
from transfer.codec.format import FLAG_LOSSLESS, FrameHeader, parse_header
from transfer.codec.frame import (
    decode_layer,
    decode_lossless_into,
    decode_opened,
    encode_layers,
    lossless_into_supported,
    open_frame,
)

T = TypeVar("T")
R = TypeVar("R")

_THREAD_PREFIX = "kvstore-codec"
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def codec_threads() -> int:
    """Threads the codec may use: ``KVSTORE_CODEC_THREADS`` or the cores this process may run on."""
    raw = os.environ.get("KVSTORE_CODEC_THREADS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"KVSTORE_CODEC_THREADS must be a positive integer, got {raw!r}") from None
        if value < 1:
            raise ValueError(f"KVSTORE_CODEC_THREADS must be a positive integer, got {raw!r}")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=codec_threads(), thread_name_prefix=_THREAD_PREFIX, initializer=_one_torch_thread
            )
        return _pool


def _one_torch_thread() -> None:
    """Torch ops in a codec thread run on that thread alone.

    A new thread otherwise gets OpenMP's default team (every core) for each
    torch op, so two codec threads would each fan out over both cores and spin
    against each other: measured 0.5-0.7x the speed of one thread for the small
    casts and reductions of a frame. The calling thread's own setting is untouched.
    """
    torch.set_num_threads(1)
    affinity.enter_io()  # codec threads are I/O: off the model's cores when a CPU plan is active


def imap_ordered(fn: Callable[[T], R], items: Iterable[T], *, ahead: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on the codec pool, results in input order, at most ``ahead`` in flight.

    Items are pulled lazily (a million-token context is never listed), and an
    exception from ``fn`` is raised at its position after the earlier results.
    Closing the iterator early cancels what has not started. Called from a
    codec thread itself it runs inline: waiting there on the same pool could
    leave every thread waiting.
    """
    workers = codec_threads()
    if workers == 1 or threading.current_thread().name.startswith(_THREAD_PREFIX):
        yield from map(fn, items)
        return
    limit = ahead if ahead is not None else 2 * workers
    if limit < 1:
        raise ValueError("ahead must be >= 1")
    pool = _shared_pool()
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def decode_many(
    blobs: Sequence[bytes | memoryview],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    threads: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`decode_layer` of every blob, in order, using every codec thread (or ``threads`` of them).

    On CPU the blobs are cut into one contiguous part per thread and each part
    is decoded by one kernel call (cpu_decode.decode_batch) when its frames
    share a shape; the tensors of a part are views of one allocation.
    ``threads=1`` decodes in the calling thread only: for a caller that runs
    next to model compute and should not take its cores.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    workers = codec_threads() if threads is None else min(threads, codec_threads())
    if len(blobs) < 2:
        return [decode_layer(b, device=device, dtype=dtype) for b in blobs]
    if not (cpu_kernels.enabled() and torch.device(device).type == "cpu"):
        if workers == 1:
            return [decode_layer(b, device=device, dtype=dtype) for b in blobs]
        return list(imap_ordered(lambda b: decode_layer(b, device=device, dtype=dtype), blobs))
    parts = min(workers, len(blobs))
    bounds = [len(blobs) * i // parts for i in range(parts + 1)]
    pieces = [blobs[bounds[i] : bounds[i + 1]] for i in range(parts)]
    if parts == 1:
        return _decode_part(pieces[0], dtype)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for part in imap_ordered(lambda piece: _decode_part(piece, dtype), pieces):
        out.extend(part)
    return out


def decode_concat(
    blobs: Sequence[bytes | memoryview],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's frames (consecutive chunks, same heads) as one ``(K, V)`` over all their tokens.

    Lossless 16/32-bit frames on the CPU are unshuffled straight into their
    token slice of the output: no per-chunk tensors and no concatenation after
    (on a 2,048-token fp32 layer that was two of the decode's four passes over
    memory, and this runs next to model compute in the layer-wise loader).
    Every other case decodes each frame and concatenates; both give the same
    tensors, and a frame that fails verification raises the same error.
    """
    if not blobs:
        raise ValueError("decode_concat needs at least one frame")
    plan = _lossless_plan(blobs) if torch.device(device).type == "cpu" else None
    if plan is None:
        parts = decode_many(blobs, device=device, dtype=dtype, threads=threads)
        if len(parts) == 1:
            return parts[0]
        return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)
    first = plan[0]
    total = sum(h.tokens for h in plan)
    k_out = torch.empty((first.heads, total, first.head_dim), dtype=first.dtype)
    v_out = torch.empty_like(k_out)
    starts = [0]
    for h in plan:
        starts.append(starts[-1] + h.tokens)

    def fill(index: int) -> None:
        header, raw = open_frame(blobs[index])  # verifies the checksum; the plan only read the header
        if header != plan[index]:
            raise CorruptFrame(f"frame {index}: header changed between planning and decoding")
        decode_lossless_into(header, raw, k_out, v_out, starts[index])

    workers = 1 if threads == 1 else min(codec_threads() if threads is None else threads, len(blobs))
    if workers == 1:
        for index in range(len(blobs)):
            fill(index)
    else:
        for _ in imap_ordered(fill, range(len(blobs))):
            pass
    if dtype is not None and dtype != first.dtype:
        return k_out.to(dtype), v_out.to(dtype)
    return k_out, v_out


def _lossless_plan(blobs: Sequence[bytes | memoryview]) -> list[FrameHeader] | None:
    """The headers of frames that :func:`decode_concat` can write in place, or None (take the general path).

    Read without verifying the checksum: a frame that lies here fails
    verification in ``open_frame`` before anything is written from it.
    """
    try:
        headers = [parse_header(memoryview(b)[:-TRAILER_BYTES]) for b in blobs]
    except Exception:  # noqa: BLE001 - the general path raises the precise error for this frame
        return None
    first = headers[0]
    if not all(
        lossless_into_supported(h)
        and h.heads == first.heads
        and h.head_dim == first.head_dim
        and h.dtype == first.dtype
        for h in headers
    ):
        return None
    return headers


def _decode_part(
    blobs: Sequence[bytes | memoryview], dtype: torch.dtype | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    opened = [open_frame(b) for b in blobs]
    first = opened[0][0]
    same = all(
        not hd.flags & FLAG_LOSSLESS
        and hd.shape == first.shape
        and hd.seed == first.seed
        and hd.dtype == first.dtype
        for hd, _ in opened
    )
    if not same:
        return [decode_opened(hd, raw, dtype=dtype) for hd, raw in opened]
    out_dtype = dtype or first.dtype
    pairs = cpu_decode.decode_batch(opened, out_dtype)
    if pairs and pairs[0][0].dtype != out_dtype:
        pairs = [(k.to(out_dtype), v.to(out_dtype)) for k, v in pairs]
    return pairs


def encode_chunk(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    profile: str,
    *,
    token_offset: int = 0,
    context_end: int | None = None,
    saliency: torch.Tensor | None = None,
) -> list[bytes]:
    """The frames of one chunk's layers (what ``encode_layer`` gives for each), using every codec thread.

    The layers are cut into one contiguous part per thread and each part goes
    through :func:`encode_layers` (one kernel call per tier for all its layers),
    so a thread takes and releases the GIL a few times per part, not per frame.
    """
    if not layers:
        return []
    parts = min(codec_threads(), len(layers))
    kwargs = {"token_offset": token_offset, "context_end": context_end, "saliency": saliency}
    if parts == 1:
        return encode_layers(layers, profile, **kwargs)
    bounds = [len(layers) * i // parts for i in range(parts + 1)]
    pieces = [layers[bounds[i] : bounds[i + 1]] for i in range(parts)]
    return [
        blob
        for part in imap_ordered(lambda piece: encode_layers(piece, profile, **kwargs), pieces)
        for blob in part
    ]
