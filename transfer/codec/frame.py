"""The frame pipeline: one chunk's layers to sealed frames (encode_group), one frame back (decode_layer).

The public entries (transfer.codec.encode / decode_into, in parallel.py) spread
these over the codec threads; this module is what one thread runs.

The pipeline is a row of small stages (see the sibling modules): choose the
precision map (saliency), center and rotate (rotate), quantize (quantize),
bit-pack (pack), lay out and entropy-code (format, zstd), seal (kvstore.integrity).
Where it runs (docs/codec.md, "What runs where"): encoding CPU input uses the
compiled kernels (cpu_encode), CUDA input the torch stages on the device, whose
only host step is the final uint8 tensor -> bytes. Decoding a quantized frame
always runs the CPU kernels (cpu_decode) and moves the result to the requested
device; a lossless frame is unshuffled by a CPU kernel for CPU output and by
torch on the device otherwise. With ``KVSTORE_CODEC_KERNELS=torch`` every stage
is torch on the requested device.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np
import torch
import zstandard

from kvstore.integrity import TRAILER_BYTES, is_intact, seal
from transfer.codec import cpu_decode, cpu_encode, cpu_kernels
from transfer.codec import quantize as qz
from transfer.codec.errors import CorruptFrame, ShapeMismatch, TruncatedFrame
from transfer.codec.format import (
    DTYPE_CODES,
    FLAG_CENTER_K,
    FLAG_CENTER_V,
    FLAG_LOSSLESS,
    FLAG_ROTATE_K,
    FLAG_ROTATE_V,
    FLAG_ZSTD,
    FORMAT_VERSION,
    HEADER_BYTES,
    FrameHeader,
    parse_header,
)
from transfer.codec.pack import pack_bits, packed_size, unpack_bits
from transfer.codec.profiles import CHANNEL, TOKEN, Profile, get_profile
from transfer.codec.rotate import can_rotate, rotate, unrotate
from transfer.codec.saliency import precision_map

#: One layer's K and V, each ``[kv_heads, tokens, head_dim]``: what the codec takes and gives.
LayerKV = tuple[torch.Tensor, torch.Tensor]

ROTATION_SEED = 0x4B5643  # fixed per format version; written in every frame anyway
_local = threading.local()  # zstd contexts are not thread-safe; one per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=False)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    decompressor: zstandard.ZstdDecompressor = _local.decompressor
    return decompressor


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _check_inputs(k: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise ShapeMismatch("k and v must be torch tensors")
    if k.dim() != 3 or k.shape != v.shape:
        raise ShapeMismatch(
            f"k and v must both be [kv_heads, tokens, head_dim]; got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != v.dtype or k.dtype not in DTYPE_CODES:
        raise ShapeMismatch(f"k and v must share a dtype among fp16/bf16/fp32; got {k.dtype} and {v.dtype}")
    if k.device != v.device:
        raise ShapeMismatch(f"k and v are on different devices ({k.device}, {v.device})")
    h, t, d = k.shape
    if h >= 1 << 16 or d >= 1 << 16 or t >= 1 << 32 or 0 in (h, d):
        raise ShapeMismatch(f"shape {tuple(k.shape)} does not fit a frame")


def encode_group(
    layers: Sequence[LayerKV],
    profile: str | Profile = "balanced",
    *,
    saliency: torch.Tensor | None = None,
    token_offset: int = 0,
    context_end: int | None = None,
) -> list[bytes]:
    """Encode the layers of one chunk in one pass on the calling thread: one sealed frame per layer.

    This is one codec thread's share of :func:`transfer.codec.encode` (the
    public entry, which documents the arguments) and the one place every
    encoder passes through, so it detaches its inputs: KV straight from a
    model called outside ``torch.no_grad()`` requires grad, and the CPU
    kernels' ``.numpy()`` (and the torch path's final one) refuse such
    tensors. ``detach()`` is a view of the same storage, never a copy, and
    the encoder only reads, so the caller's autograd graph is untouched.
    Every quantizer works per
    head row or per (head, channel), so stacking the layers into the head
    dimension gives the same bytes as encoding each alone, with ~1/L of the
    per-call overhead (which dominates at 256 tokens per frame).
    """
    if not layers:
        return []
    for k, v in layers:
        _check_inputs(k, v)
    layers = [(k.detach(), v.detach()) for k, v in layers]
    saliency = saliency.detach() if isinstance(saliency, torch.Tensor) else saliency
    k0 = layers[0][0]
    if any(k.shape != k0.shape or k.dtype != k0.dtype or k.device != k0.device for k, _ in layers):
        raise ShapeMismatch("all layers of a chunk must share shape, dtype and device")
    prof = get_profile(profile)
    if prof.lossless:  # byte planes of each layer's K and V, no shared pass
        return [_seal_frames(_shuffle_kv(k, v).view(1, -1), prof, k, FLAG_LOSSLESS)[0] for k, v in layers]
    n = len(layers)
    key_dependent = len(prof.tiers) > 2 and prof.salient_fraction > 0 and saliency is None
    if key_dependent and n > 1:  # per-layer precision maps: no shared pass
        return [
            encode_group(
                [layer], prof, saliency=saliency, token_offset=token_offset, context_end=context_end
            )[0]
            for layer in layers
        ]
    if n == 1:  # nothing to stack
        ks, vs = layers[0]
    else:
        h, t, d = k0.shape
        ks = torch.stack([k for k, _ in layers]).reshape(n * h, t, d)
        vs = torch.stack([v for _, v in layers]).reshape(n * h, t, d)
    layout = _layout_for(k0, prof, saliency, token_offset, context_end)
    flags, body = _encode_quantized(ks, vs, prof, layout, n)
    return _seal_frames(body, prof, k0, flags)


def _seal_frames(body: torch.Tensor | np.ndarray, prof: Profile, k: torch.Tensor, flags: int) -> list[bytes]:
    """Rows of ``body`` (one per frame) -> sealed frames; the only host step."""
    h, t, d = k.shape
    rows = body if isinstance(body, np.ndarray) else body.cpu().numpy()
    out = []
    for row in rows:
        raw = row.tobytes()
        stored, row_flags = raw, flags
        if prof.zstd_level is not None and raw:
            packed = _compressor(prof.zstd_level).compress(raw)
            if len(packed) < prof.zstd_max_ratio * len(raw):
                stored, row_flags = packed, flags | FLAG_ZSTD
        header = FrameHeader(
            FORMAT_VERSION, prof.profile_id, k.dtype, row_flags, h, t, d, ROTATION_SEED, len(raw), len(stored)
        )
        out.append(seal(header.pack() + stored))
    return out


def _shuffle_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _shuffle(torch.cat([_u8(k), _u8(v)]), k.element_size())


def _shuffle(data: torch.Tensor, width: int) -> torch.Tensor:
    """Byte-shuffle: all first bytes, then all second bytes... (exponents group together for zstd).

    Written as a stack of byte columns: the same bytes as ``.t().contiguous()``,
    but torch's generic transpose copy of a [n, 2] uint8 tensor is ~8x slower.
    """
    if data.device.type == "cpu" and cpu_kernels.enabled():
        if data.numel() == 0:
            return data
        src = data.contiguous().numpy()
        out = np.empty_like(src)
        if width == 2:
            cpu_kernels.shuffle2(src.view(np.uint16), out)
        elif width == 4:
            cpu_kernels.shuffle4(src.view(np.uint32), out)
        else:
            cpu_kernels.shuffle_bytes(src, width, out)
        return torch.from_numpy(out)
    return torch.stack(list(data.view(-1, width).unbind(1))).reshape(-1)


def _unshuffle(data: torch.Tensor, width: int) -> torch.Tensor:
    if data.device.type == "cpu" and cpu_kernels.enabled():
        return torch.from_numpy(_unshuffle_np(data.contiguous().numpy(), width))
    return torch.stack(list(data.view(width, -1).unbind(0)), dim=1).reshape(-1)


def _unshuffle_np(src: np.ndarray, width: int) -> np.ndarray:
    out = np.empty(src.size, np.uint8)
    if width == 2:
        cpu_kernels.unshuffle2(src, out.view(np.uint16))
    elif width == 4:
        cpu_kernels.unshuffle4(src, out.view(np.uint32))
    else:
        cpu_kernels.unshuffle_bytes(src, width, out)
    return out


def _layout(prof: Profile, tiers: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The body's head (tier table, group, packed precision map) and the token indices of each tier."""
    table = [(t.k_scheme, t.k_bits, t.v_scheme, t.v_bits) for t in prof.tiers]
    head = torch.cat(
        [
            _bytes_of([len(table), *[b for row in table for b in row], prof.group], tiers.device),
            pack_bits(tiers, 4),
        ]
    )
    return head, [torch.nonzero(tiers == i).reshape(-1) for i in range(len(table))]


@functools.lru_cache(maxsize=256)
def _position_layout(
    prof: Profile, tokens: int, token_offset: int, context_end: int | None, device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Layouts that depend only on positions, computed once: every chunk-layer of a context reuses them."""
    probe = torch.empty((1, tokens, 0), device=device)  # precision_map reads only the shape and device
    return _layout(prof, precision_map(probe, prof, None, token_offset, context_end))


def _layout_for(
    k: torch.Tensor, prof: Profile, saliency: torch.Tensor | None, token_offset: int, context_end: int | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if saliency is None and not (len(prof.tiers) > 2 and prof.salient_fraction > 0):
        return _position_layout(prof, k.shape[1], token_offset, context_end, k.device)
    return _layout(prof, precision_map(k, prof, saliency, token_offset, context_end))


def _encode_quantized(
    k: torch.Tensor,
    v: torch.Tensor,
    prof: Profile,
    layout: tuple[torch.Tensor, list[torch.Tensor]],
    layers: int,
) -> tuple[int, torch.Tensor | np.ndarray]:
    """Body rows [layers, bytes] for K and V of ``layers`` frames stacked as [layers*heads, tokens, dim]."""
    dim = k.shape[-1]
    rot_k, rot_v = prof.rotate_k and can_rotate(dim), prof.rotate_v and can_rotate(dim)
    flags = (
        (FLAG_ROTATE_K if rot_k else 0)
        | (FLAG_ROTATE_V if rot_v else 0)
        | (FLAG_CENTER_K if prof.center_k else 0)
        | (FLAG_CENTER_V if prof.center_v else 0)
    )
    table = [(t.k_scheme, t.k_bits, t.v_scheme, t.v_bits) for t in prof.tiers]
    head, order = layout
    if cpu_encode.handles(prof, k):
        return flags, cpu_encode.encode_body(k, v, prof, head, order, (rot_k, rot_v), layers, ROTATION_SEED)
    parts = [head.view(1, -1).expand(layers, -1)]
    for x, col, center, rot in ((k, 0, prof.center_k, rot_k), (v, 2, prof.center_v, rot_v)):
        x = x.to(torch.float32)  # (then float64 in rotate: faster than fp16 -> float64 in one cast)
        if center:
            mean = x.to(torch.float64).mean(dim=1, keepdim=True).to(torch.float16)
            parts.append(_u8(mean).view(layers, -1))
            x = x - mean.to(torch.float32)
        if rot:
            x = rotate(x, ROTATION_SEED)
        for row, idx in zip(table, order, strict=True):
            if idx.numel():
                xt = x if idx.numel() == x.shape[1] else x[:, idx]  # one tier: no gather copy
                parts.extend(_encode_tier(xt, row[col], row[col + 1], prof, layers))
    return flags, torch.cat(parts, dim=1)


def _bytes_of(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _pack_rows(codes: torch.Tensor, bits: int, layers: int) -> torch.Tensor:
    """Packed codes per layer [layers, bytes]; one call when each layer fills whole packing groups."""
    if bits == 8 or (codes.numel() // layers) % 8 == 0:
        return pack_bits(codes, bits).view(layers, -1)
    return torch.stack([pack_bits(c, bits) for c in codes.reshape(layers, -1)])


def _encode_tier(x: torch.Tensor, scheme: int, bits: int, prof: Profile, layers: int) -> list[torch.Tensor]:
    if scheme == TOKEN:
        codes, u, base = qz.quantize(x, bits, prof.clip, layers)
        return [
            _u8(base.to(torch.int8)).view(layers, 1),
            u.reshape(layers, -1),
            _pack_rows(codes, bits, layers),
        ]
    if scheme == CHANNEL:
        codes, cmax, lo, hi = qz.quantize_channels(x, bits, prof.group)
        return [
            _u8(cmax).view(layers, -1),
            _u8(lo).view(layers, -1),
            _u8(hi).view(layers, -1),
            _pack_rows(codes, bits, layers),
        ]
    raise ValueError(f"unknown quantization scheme {scheme}")


def read_header(blob: bytes | memoryview) -> FrameHeader:
    """Shape, dtype, profile and version of a frame without decoding (or verifying) it."""
    return parse_header(
        memoryview(blob)[:-TRAILER_BYTES] if len(blob) >= HEADER_BYTES + TRAILER_BYTES else memoryview(blob)
    )


def _verified_header(blob: bytes | memoryview) -> FrameHeader:
    size = len(blob)
    if size < HEADER_BYTES + TRAILER_BYTES:
        raise TruncatedFrame(
            f"frame of {size} bytes is shorter than header and trailer ({HEADER_BYTES + TRAILER_BYTES} bytes)"
        )
    if not is_intact(blob):
        try:
            header = parse_header(memoryview(blob))
        except Exception:
            header = None
        if header is not None and HEADER_BYTES + header.stored_len + TRAILER_BYTES > size:
            raise TruncatedFrame(
                f"frame of {size} bytes is shorter than the "
                f"{HEADER_BYTES + header.stored_len + TRAILER_BYTES} bytes its header declares"
            )
        raise CorruptFrame("frame checksum mismatch (XXH3-64 trailer does not match its content)")
    header = parse_header(memoryview(blob)[:-TRAILER_BYTES])
    if HEADER_BYTES + header.stored_len + TRAILER_BYTES != size:
        raise CorruptFrame(
            f"frame is {size} bytes but its header declares "
            f"{HEADER_BYTES + header.stored_len + TRAILER_BYTES}"
        )
    return header


def open_frame(blob: bytes | memoryview) -> tuple[FrameHeader, bytes | memoryview]:
    """Verify a frame's checksum and lengths and return its header and raw (decompressed) body."""
    header = _verified_header(blob)
    stored = memoryview(blob)[HEADER_BYTES : HEADER_BYTES + header.stored_len]
    raw: bytes | memoryview
    if header.flags & FLAG_ZSTD:
        try:
            raw = _decompressor().decompress(stored, max_output_size=header.raw_len)
        except zstandard.ZstdError as exc:
            raise CorruptFrame(f"zstd body does not decompress: {exc}") from exc
    else:
        raw = stored
    if len(raw) != header.raw_len:
        raise CorruptFrame(f"body is {len(raw)} bytes, header declares {header.raw_len}")
    return header, raw


def decode_layer(
    blob: bytes | memoryview, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LayerKV:
    """Verify and decode one frame into (K, V) on ``device``, in ``dtype`` (default: the source dtype).

    :func:`transfer.codec.decode_into` of a single frame without a destination is exactly this.
    """
    header, raw = open_frame(blob)
    return decode_opened(header, raw, device, dtype)


def decode_opened(
    header: FrameHeader,
    raw: bytes | memoryview,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a body that :func:`open_frame` has verified (checksum, lengths, zstd)."""
    out_dtype = dtype or header.dtype
    if not header.flags & FLAG_LOSSLESS and cpu_kernels.enabled():
        # CPU kernels decode the body in place (no copy), then the tensors move to ``device``
        k, v = cpu_decode.decode_quantized(np.frombuffer(raw, dtype=np.uint8), header, out_dtype)
        return k.to(device=device, dtype=out_dtype), v.to(device=device, dtype=out_dtype)
    if header.flags & FLAG_LOSSLESS and cpu_kernels.enabled() and torch.device(device).type == "cpu":
        k, v = _decode_lossless_cpu(np.frombuffer(raw, dtype=np.uint8), header)  # no copy before the kernel
        return k.to(out_dtype), v.to(out_dtype)
    raw = bytes(raw)
    body = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    body = body.to(device)
    if header.flags & FLAG_LOSSLESS:
        k, v = _decode_lossless(body, header)
    else:
        k, v = _decode_quantized(body, header)
    return k.to(out_dtype), v.to(out_dtype)


def _decode_lossless(body: torch.Tensor, header: FrameHeader) -> tuple[torch.Tensor, torch.Tensor]:
    width = torch.empty(0, dtype=header.dtype).element_size()
    n = header.heads * header.tokens * header.head_dim
    if body.numel() != 2 * n * width:
        raise CorruptFrame(f"lossless body is {body.numel()} bytes, expected {2 * n * width}")
    data = _unshuffle(body, width).view(header.dtype)
    return data[:n].view(header.shape), data[n:].view(header.shape)


def _decode_lossless_cpu(body: np.ndarray, header: FrameHeader) -> tuple[torch.Tensor, torch.Tensor]:
    width = torch.empty(0, dtype=header.dtype).element_size()
    n = header.heads * header.tokens * header.head_dim
    if body.size != 2 * n * width:
        raise CorruptFrame(f"lossless body is {body.size} bytes, expected {2 * n * width}")
    if n == 0:
        return torch.empty(header.shape, dtype=header.dtype), torch.empty(header.shape, dtype=header.dtype)
    data = torch.from_numpy(_unshuffle_np(body, width)).view(header.dtype)
    return data[:n].view(header.shape), data[n:].view(header.shape)


#: Lossless element widths whose words the CPU kernels move: torch view dtype, numpy word dtype, kernel.
_INTO_KERNELS = {
    2: (torch.int16, np.uint16, cpu_kernels.unshuffle2_into),
    4: (torch.int32, np.uint32, cpu_kernels.unshuffle4_into),
}


def lossless_into_supported(header: FrameHeader) -> bool:
    """Whether :func:`decode_lossless_into` takes this frame (a lossless 16- or 32-bit frame, CPU kernels on)."""
    width = torch.empty(0, dtype=header.dtype).element_size()
    return bool(header.flags & FLAG_LOSSLESS) and width in _INTO_KERNELS and cpu_kernels.enabled()


def decode_lossless_into(
    header: FrameHeader,
    raw: bytes | memoryview,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    token_offset: int = 0,
) -> None:
    """Unshuffle a verified lossless body (from :func:`open_frame`) straight into ``k_out``/``v_out``.

    The outputs are a whole layer's contiguous CPU tensors ``[heads, T, head_dim]``
    in the frame's dtype; the frame's tokens land at ``token_offset``. A layer
    assembled from many chunks is thus written once, instead of decoded per
    chunk and then concatenated.
    """
    width = torch.empty(0, dtype=header.dtype).element_size()
    if not lossless_into_supported(header):
        raise ValueError(
            "decode_lossless_into takes lossless frames of 16- or 32-bit elements, with CPU kernels on"
        )
    heads, tokens, dim = header.shape
    for name, out in (("k_out", k_out), ("v_out", v_out)):
        if (
            out.dim() != 3
            or out.shape[0] != heads
            or out.shape[2] != dim
            or out.dtype != header.dtype
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise ShapeMismatch(
                f"{name} is {tuple(out.shape)} {out.dtype} on {out.device}; the frame needs a "
                f"contiguous CPU [{heads}, T, {dim}] {header.dtype} tensor"
            )
    if not 0 <= token_offset <= k_out.shape[1] - tokens or k_out.shape != v_out.shape:
        raise ShapeMismatch(
            f"tokens {token_offset}..{token_offset + tokens} do not fit outputs "
            f"{tuple(k_out.shape)} / {tuple(v_out.shape)}"
        )
    body = np.frombuffer(raw, dtype=np.uint8)
    n = heads * tokens * dim
    if body.size != 2 * n * width:
        raise CorruptFrame(f"lossless body is {body.size} bytes, expected {2 * n * width}")
    if n == 0:
        return
    view_dtype, word, kernel = _INTO_KERNELS[width]
    kernel(
        body,
        k_out.view(view_dtype).numpy().view(word).reshape(-1),
        v_out.view(view_dtype).numpy().view(word).reshape(-1),
        heads,
        k_out.shape[1] * dim,
        token_offset * dim,
    )


class _Reader:
    """Cursor over the body that turns every overrun into CorruptFrame."""

    def __init__(self, body: torch.Tensor) -> None:
        self.body, self.pos = body, 0

    def take(self, count: int) -> torch.Tensor:
        if self.pos + count > self.body.numel():
            raise CorruptFrame(f"body ends at {self.body.numel()} bytes, needed {self.pos + count}")
        out = self.body[self.pos : self.pos + count]
        self.pos += count
        return out


def _decode_quantized(body: torch.Tensor, header: FrameHeader) -> tuple[torch.Tensor, torch.Tensor]:
    h, t, d = header.shape
    r = _Reader(body)
    n_tiers = int(r.take(1).item())
    table = r.take(4 * n_tiers).view(n_tiers, 4).tolist()
    group = int(r.take(1).item())
    if (
        n_tiers == 0
        or group == 0
        or any(
            row[0] not in (TOKEN, CHANNEL)
            or row[2] not in (TOKEN, CHANNEL)
            or not 1 <= row[1] <= 8
            or not 1 <= row[3] <= 8
            for row in table
        )
    ):
        raise CorruptFrame(f"bad tier table {table} (group {group})")
    tiers = unpack_bits(r.take(packed_size(t, 4)), 4, t)
    if t and int(tiers.max().item()) >= n_tiers:
        raise CorruptFrame("precision map names a tier the table does not have")
    order = [torch.nonzero(tiers == i).reshape(-1) for i in range(n_tiers)]
    out = []
    for col, center_flag, rot_flag in ((0, FLAG_CENTER_K, FLAG_ROTATE_K), (2, FLAG_CENTER_V, FLAG_ROTATE_V)):
        mean = None
        if header.flags & center_flag:
            mean = r.take(h * d * 2).clone().view(torch.float16).view(h, 1, d).to(torch.float32)
        x = None
        for row, idx in zip(table, order, strict=True):
            if not idx.numel():
                continue
            if idx.numel() == t:  # one tier holds every token: no scatter
                x = _decode_tier(r, row[col], row[col + 1], h, t, d, group)
            else:
                if x is None:
                    x = torch.empty((h, t, d), dtype=torch.float32, device=body.device)
                x[:, idx] = _decode_tier(r, row[col], row[col + 1], h, idx.numel(), d, group)
        if x is None:
            x = torch.empty((h, t, d), dtype=torch.float32, device=body.device)
        if header.flags & rot_flag:
            if not can_rotate(d):
                raise CorruptFrame("frame says rotated but its head_dim is not a power of two")
            x = unrotate(x, header.seed)
        if mean is not None:
            x = x.add_(mean)
        out.append(x)
    if r.pos != body.numel():
        raise CorruptFrame(f"body has {body.numel() - r.pos} trailing bytes")
    return out[0], out[1]


def _decode_tier(r: _Reader, scheme: int, bits: int, h: int, n: int, d: int, group: int) -> torch.Tensor:
    count = h * n * d
    if scheme == TOKEN:
        base = int(r.take(1).clone().view(torch.int8).item())
        u = r.take(h * n).view(h, n)
        codes = unpack_bits(r.take(packed_size(count, bits)), bits, count, torch.uint8).view(h, n, d)
        return qz.dequantize(codes, u, base, bits)
    groups = (n + group - 1) // group
    cmax = r.take(h * d * 2).clone().view(torch.float16).view(h, d)
    lo = r.take(h * groups * d).clone().view(torch.int8).view(h, groups, d)
    hi = r.take(h * groups * d).clone().view(torch.int8).view(h, groups, d)
    codes = unpack_bits(r.take(packed_size(count, bits)), bits, count, torch.uint8).view(h, n, d)
    return qz.dequantize_channels(codes, cmax, lo, hi, bits, group)
