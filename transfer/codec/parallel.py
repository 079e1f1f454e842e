"""The codec's two entries, ``encode`` and ``decode_into``, run on every core.

``encode(layers, profile, ...)`` turns one chunk's layers into one sealed frame
per layer; ``decode_into(blobs, dest)`` turns one layer's frames (consecutive
chunks) back into one ``(K, V)`` over all their tokens, written into the
caller's tensors or into new ones. ``encode_layer`` and ``decode_layer`` are the
same entries for a single frame. Everything that moves KV (kvio, longctx, the
layer-wise cache, the vLLM connector, warm-up) goes through these.

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
from typing import Any, TypeVar

import torch

from kvstore.integrity import TRAILER_BYTES
from transfer.codec import cpu_decode, cpu_kernels
from transfer.codec.errors import CorruptFrame, ShapeMismatch
from transfer.codec.format import FLAG_LOSSLESS, FrameHeader, parse_header
from transfer.codec.frame import (
    LayerKV,
    decode_layer,
    decode_lossless_into,
    decode_opened,
    encode_group,
    lossless_into_supported,
    open_frame,
)
from transfer.codec.profiles import Profile
from transfer.engines import cpu_plan as affinity

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


def encode(
    layers: Sequence[LayerKV],
    profile: str | Profile = "balanced",
    *,
    saliency: torch.Tensor | None = None,
    token_offset: int = 0,
    context_end: int | None = None,
    threads: int | None = None,
) -> list[bytes]:
    """One chunk's layers (each ``(k, v)`` of ``[kv_heads, tokens, head_dim]``) -> one sealed frame per layer.

    ``token_offset`` is the position of the chunk's first token in the context
    (the first ``sink_tokens`` positions are kept at high precision), and
    ``context_end``, the context's length, keeps its ``recent_tokens`` (and
    ``warm_tokens``) at higher precision; ``None`` when the end is unknown.
    ``saliency`` ([tokens] or [heads, tokens], higher = more important) ranks
    the other tokens for profiles with a salient tier; without it the key norm
    is the proxy. The layers must share shape, dtype and device.

    The layers are cut into one contiguous part per codec thread (``threads``
    caps them; 1 keeps the work on the calling thread) and each part is encoded
    in one pass (frame.encode_group: one kernel call per tier for all its
    layers), so a thread takes and releases the GIL a few times per part, not
    per frame. The bytes do not depend on the split.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    def encode_part(part: Sequence[LayerKV]) -> list[bytes]:
        return encode_group(
            part, profile, token_offset=token_offset, context_end=context_end, saliency=saliency
        )

    if len(layers) < 2 or threads == 1:
        return encode_part(layers)
    parts = min(codec_threads() if threads is None else min(threads, codec_threads()), len(layers))
    if parts == 1:
        return encode_part(layers)
    k0 = layers[0][0]
    if any(  # each part checks its own layers; the parts must agree too, whatever the split
        not isinstance(k, torch.Tensor) or k.shape != k0.shape or k.dtype != k0.dtype or k.device != k0.device
        for k, _ in layers
    ):
        raise ShapeMismatch("all layers of a chunk must share shape, dtype and device")
    bounds = [len(layers) * i // parts for i in range(parts + 1)]
    pieces = [layers[bounds[i] : bounds[i + 1]] for i in range(parts)]
    return [blob for part in imap_ordered(encode_part, pieces) for blob in part]


def encode_layer(
    k: torch.Tensor,
    v: torch.Tensor,
    profile: str | Profile = "balanced",
    *,
    saliency: torch.Tensor | None = None,
    token_offset: int = 0,
    context_end: int | None = None,
) -> bytes:
    """:func:`encode` of a single layer: the sealed frame of one (chunk, layer)."""
    return encode_group(
        [(k, v)], profile, saliency=saliency, token_offset=token_offset, context_end=context_end
    )[0]


def decode_into(
    blobs: Sequence[bytes | memoryview],
    dest: LayerKV | None = None,
    *,
    token_offset: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    threads: int | None = None,
) -> LayerKV:
    """One layer's frames (consecutive chunks, same heads and head_dim) as one ``(K, V)`` over their tokens.

    Without ``dest`` the output is allocated: ``[heads, total tokens, head_dim]``
    on ``device``, in ``dtype`` (default: the frames' dtype). With ``dest =
    (k_out, v_out)`` (``[heads, T, head_dim]``, any dtype and device) the
    frames' tokens are written to ``[:, token_offset : token_offset + total]``
    and ``dest`` is returned; ``device`` and ``dtype`` are then taken from it.
    Every frame's checksum is verified before anything is written from it.

    On CPU with the kernels on, frames land straight in their token slice, with
    no per-chunk tensors and no copy: lossless 16/32-bit frames into an output of
    their dtype (unshuffled in place), quantized frames into a contiguous fp16 or
    float32 output (one kernel call per codec thread). Every other case decodes
    the frames on the codec threads and copies them into place.
    ``threads`` caps the codec threads used; 1 keeps the work on the calling
    thread (for a caller running next to model compute).
    """
    if not blobs:
        raise ValueError("decode_into needs at least one frame")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if dest is None:
        if token_offset != 0:
            raise ValueError("token_offset places frames in a destination; pass dest with it")
        if len(blobs) == 1:
            return decode_layer(blobs[0], device=device, dtype=dtype)
        headers = _headers(blobs) if torch.device(device).type == "cpu" else None
        if headers is None or not _one_layer(headers, dtype):
            parts = decode_frames(blobs, device=device, dtype=dtype, threads=threads)
            return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)
        first = headers[0]
        # lossless frames go in place in their own dtype (cast after); others decode straight to ``dtype``
        lossless = all(lossless_into_supported(h) for h in headers)
        out_dtype = first.dtype if lossless or dtype is None else dtype
        k_out = torch.empty((first.heads, sum(h.tokens for h in headers), first.head_dim), dtype=out_dtype)
        v_out = torch.empty_like(k_out)
        _fill(blobs, headers, k_out, v_out, 0, threads)
        if dtype is not None and dtype != out_dtype:
            return k_out.to(dtype), v_out.to(dtype)
        return k_out, v_out
    k_out, v_out = dest
    if k_out.dim() != 3 or k_out.shape != v_out.shape or k_out.dtype != v_out.dtype:
        raise ShapeMismatch(
            f"dest must be two equal [kv_heads, tokens, head_dim] tensors; got "
            f"{tuple(k_out.shape)} {k_out.dtype} and {tuple(v_out.shape)} {v_out.dtype}"
        )
    headers = _headers(blobs) if k_out.device.type == v_out.device.type == "cpu" else None
    if headers is not None:
        _fill(blobs, headers, k_out, v_out, token_offset, threads)
        return k_out, v_out
    pairs = decode_frames(blobs, device=k_out.device, dtype=k_out.dtype, threads=threads)
    at = token_offset
    for index, (k, v) in enumerate(pairs):
        _check_fits(index, tuple(k.shape), k_out, at)
        k_out[:, at : at + k.shape[1]].copy_(k)
        v_out[:, at : at + k.shape[1]].copy_(v)
        at += k.shape[1]
    return k_out, v_out


def _headers(blobs: Sequence[bytes | memoryview]) -> list[FrameHeader] | None:
    """Every frame's header, read without verifying (sizes only), or None when one does not parse.

    None sends the caller to the per-frame path, which raises the precise error
    for that frame; a frame that parses here but lies fails verification in
    ``open_frame`` before anything is written from it.
    """
    try:
        return [parse_header(memoryview(b)[:-TRAILER_BYTES]) for b in blobs]
    except Exception:  # noqa: BLE001 - the per-frame path raises the precise error for this frame
        return None


def _one_layer(headers: list[FrameHeader], dtype: torch.dtype | None) -> bool:
    """Whether the frames fill one output (same heads and head_dim; one dtype unless a cast is asked)."""
    first = headers[0]
    return all(
        h.heads == first.heads
        and h.head_dim == first.head_dim
        and (dtype is not None or h.dtype == first.dtype)
        for h in headers
    )


def _fits(shape: tuple[int, ...], k_out: torch.Tensor, at: int) -> bool:
    """Whether frames of ``shape`` (heads, tokens, head_dim) together fit ``k_out`` at token ``at``."""
    heads, n, dim = shape
    return heads == k_out.shape[0] and dim == k_out.shape[2] and 0 <= at <= k_out.shape[1] - n


def _check_fits(index: int, shape: tuple[int, ...], k_out: torch.Tensor, at: int) -> None:
    """Frames from ``index`` on, of ``shape`` (heads, tokens, head_dim) together, fit ``k_out`` at ``at``."""
    heads, n, dim = shape
    if not _fits(shape, k_out, at):
        raise ShapeMismatch(
            f"frame {index} ({heads}, {n}, {dim}) does not fit dest {tuple(k_out.shape)} at token {at}"
        )


def _fill(
    blobs: Sequence[bytes | memoryview],
    headers: list[FrameHeader],
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    token_offset: int,
    threads: int | None,
) -> None:
    """Decode the frames into their token slices of the CPU tensors ``k_out``/``v_out``, on the codec threads.

    Lossless 16/32-bit frames of the output's dtype are unshuffled straight into
    place (no per-chunk tensors: on a 2,048-token fp32 layer a decode + cat was
    two of its four passes over memory). Other frames are cut into one part per
    thread; a part of quantized frames (one heads, head_dim and seed) into a
    contiguous fp16 or float32 output is decoded by one kernel call straight into
    its token slices (a decode into a part tensor and a copy into place cost
    balanced ~11% of its two-thread decode). The rest (bf16 or non-contiguous
    outputs, mixed parts, torch stages) decode per part and are copied into place.
    """
    starts = [token_offset]
    for h in headers:
        starts.append(starts[-1] + h.tokens)
    workers = 1 if threads == 1 else min(codec_threads() if threads is None else threads, len(blobs))
    in_place = (
        k_out.is_contiguous()
        and v_out.is_contiguous()
        and all(lossless_into_supported(h) and h.dtype == k_out.dtype for h in headers)
    )
    if in_place:

        def fill(index: int) -> None:
            header, raw = open_frame(blobs[index])  # verifies the checksum; the plan only read the header
            if header != headers[index]:
                raise CorruptFrame(f"frame {index}: header changed between planning and decoding")
            decode_lossless_into(header, raw, k_out, v_out, starts[index])

        tasks: Sequence[tuple[int, int]] | range = range(len(blobs))
        run: Callable[[Any], None] = fill
    else:
        direct = (  # quantized parts straight into their slices (the kernels write fp16, bf16 and float32)
            cpu_kernels.enabled()
            and cpu_decode.writes_into(k_out.dtype)
            and k_out.is_contiguous()
            and v_out.is_contiguous()
        )

        def run_part(bounds: tuple[int, int]) -> None:
            lo, hi = bounds
            if direct and _decode_part_into(blobs, headers, lo, hi, k_out, v_out, starts):
                return
            if cpu_kernels.enabled():
                out = _decode_stacked(blobs[lo:hi], k_out.dtype)
                if isinstance(out, tuple):  # one copy per part: [n, h, t, d] into h rows of n*t tokens
                    k, v = out
                    n, h, t, d = k.shape
                    _check_fits(lo, (h, n * t, d), k_out, starts[lo])
                    k_out[:, starts[lo] : starts[lo] + n * t].view(h, n, t, d).copy_(k.transpose(0, 1))
                    v_out[:, starts[lo] : starts[lo] + n * t].view(h, n, t, d).copy_(v.transpose(0, 1))
                    return
                pairs = out
            else:
                pairs = [decode_layer(b, dtype=k_out.dtype) for b in blobs[lo:hi]]
            for index, (k, v) in enumerate(pairs, lo):
                _check_fits(index, tuple(k.shape), k_out, starts[index])
                k_out[:, starts[index] : starts[index] + k.shape[1]].copy_(k)
                v_out[:, starts[index] : starts[index] + k.shape[1]].copy_(v)

        parts = min(workers, len(blobs))
        cuts = [len(blobs) * i // parts for i in range(parts + 1)]
        tasks = [(cuts[i], cuts[i + 1]) for i in range(parts)]
        run = run_part
    if workers == 1 or len(tasks) == 1:
        for task in tasks:
            run(task)
    else:
        for _ in imap_ordered(run, tasks):
            pass


def _decode_part_into(
    blobs: Sequence[bytes | memoryview],
    headers: list[FrameHeader],
    lo: int,
    hi: int,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    starts: list[int],
) -> bool:
    """Frames ``lo:hi`` decoded by one kernel call straight into their token slices of ``k_out``/``v_out``.

    Returns False, having written nothing, when the part needs the general path:
    a lossless frame, frames that differ in heads, head_dim or rotation seed, or
    a frame that does not fit the destination (the general path then raises the
    same error, in the same order, as it always has).
    """
    first = headers[lo]
    if any(
        h.flags & FLAG_LOSSLESS
        or h.heads != first.heads
        or h.head_dim != first.head_dim
        or h.seed != first.seed
        for h in headers[lo:hi]
    ):
        return False
    opened = [open_frame(b) for b in blobs[lo:hi]]  # verifies every checksum before any write
    for index, (header, _) in enumerate(opened, lo):
        if header != headers[index]:
            raise CorruptFrame(f"frame {index}: header changed between planning and decoding")
    if not all(_fits(h.shape, k_out, starts[i]) for i, h in enumerate(headers[lo:hi], lo)):
        return False
    cpu_decode.decode_into_layer(opened, k_out, v_out, starts[lo:hi])
    return True


def decode_frames(
    blobs: Sequence[bytes | memoryview],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    threads: int | None = None,
) -> list[LayerKV]:
    """:func:`decode_layer` of every blob, in order, on the codec threads (the stage under decode_into).

    On CPU the blobs are cut into one contiguous part per thread and each part
    is decoded by one kernel call (cpu_decode.decode_batch) when its frames
    share a shape; the tensors of a part are views of one allocation.
    ``threads=1`` decodes in the calling thread only.
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
    out: list[LayerKV] = []
    for part in imap_ordered(lambda piece: _decode_part(piece, dtype), pieces):
        out.extend(part)
    return out


def _decode_part(blobs: Sequence[bytes | memoryview], dtype: torch.dtype | None) -> list[LayerKV]:
    out = _decode_stacked(blobs, dtype)
    if isinstance(out, list):
        return out
    k, v = out
    return [(k[i], v[i]) for i in range(k.shape[0])]


def _decode_stacked(
    blobs: Sequence[bytes | memoryview], dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor] | list[LayerKV]:
    """A part's frames as stacked K, V ``[n, heads, tokens, head_dim]`` in one kernel call, when they share
    shape, seed and dtype and are quantized; else one ``(k, v)`` per frame."""
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
    k, v = cpu_decode.decode_batch(opened, out_dtype)
    if k.dtype != out_dtype:
        k, v = k.to(out_dtype), v.to(out_dtype)
    return k, v
