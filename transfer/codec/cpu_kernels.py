"""Compiled CPU kernels for the codec's per-element stages (numba), bit-identical to the torch stages.

Why: on CPU the torch pipeline makes a dozen passes over every element
(casts, float64 matmul for the rotation, divide, floor, clamp, add, cast, SWAR
packing), each allocating a temporary; at 256-token frames that costs ~10 ns
per element. Here each stage is one loop that reads its input once and writes
its output once, releases the GIL (``nogil``) so frames can run on all cores,
and is compiled once per machine (``cache=True``).

Same bytes as the torch stages, by construction:
- every float operation is the one torch performs, in the same precision and
  order, with no fused multiply-add and no reassociation (numba compiles
  without fast-math, so LLVM may not contract ``a * b + c``);
- the rotation is a fast Walsh-Hadamard transform in float64 instead of a
  float64 matmul; both compute sums of +-x that are exact in float64 for
  fp16/bf16-range inputs, so the order of additions cannot change the result.
``tests/unit/test_codec_golden.py`` pins frames and decoded tensors and runs
with and without these kernels; ``tests/unit/test_codec_kernels.py`` compares
them stage by stage with torch on random data.

CUDA tensors never come here: they keep the torch stages, which produce the
same frames. Set ``KVSTORE_CODEC_KERNELS=torch`` to force the torch stages on
CPU too (the tests do, to compare).
"""

from __future__ import annotations

import math
import os

import numpy as np

try:  # numba is a hard dependency, but the codec must keep working (slower) without it
    import numba
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None

_WANTED = os.environ.get("KVSTORE_CODEC_KERNELS", "numba").strip().lower() != "torch"
AVAILABLE = numba is not None


def enabled() -> bool:
    """Whether CPU tensors take these kernels (numba installed and not switched off)."""
    return AVAILABLE and _WANTED


def set_enabled(on: bool) -> None:
    """Switch the kernels on or off for this process (tests compare both paths)."""
    global _WANTED
    _WANTED = bool(on)


def _jit(fn):
    if numba is None:  # pragma: no cover
        return fn
    return numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")(fn)


# ---------------------------------------------------------------- rotation
@_jit
def hadamard_rows(x, signs, scale, pre_signs, out):  # pragma: no cover - compiled
    """``out[r] = float32(FWHT(x[r] * s) * scale)`` (rotate) or ``float32(FWHT(x[r]) * s * scale)``.

    ``x`` [rows, d] float32, ``d`` a power of two; ``signs`` float64 +-1;
    ``scale`` float64. With ``pre_signs`` the signs multiply the input
    (x @ diag(s) H), else the output (y @ H diag(s)).

    Rows are transformed in blocks held transposed ([d, block]), so each
    butterfly is a vector add/sub over the block's rows instead of a scalar
    step along one row.
    """
    rows, d = x.shape
    block = 32
    buf = np.empty((d, block), np.float64)
    pre = np.empty(d, np.float64)
    post = np.empty(d, np.float64)
    for j in range(d):
        pre[j] = signs[j] if pre_signs else 1.0
        post[j] = scale if pre_signs else signs[j] * scale
    for r0 in range(0, rows, block):
        nb = min(block, rows - r0)
        for i in range(nb):
            for j in range(d):
                buf[j, i] = np.float64(x[r0 + i, j]) * pre[j]
        h = 1
        while h < d:
            for i0 in range(0, d, 2 * h):
                for j in range(i0, i0 + h):
                    top = buf[j]
                    bot = buf[j + h]
                    for c in range(nb):
                        a = top[c]
                        b = bot[c]
                        top[c] = a + b
                        bot[c] = a - b
            h *= 2
        for i in range(nb):
            for j in range(d):
                y = buf[j, i] * post[j]
                # an exact zero is +0, as the matmul's sum of products (a sign flip would make -0)
                out[r0 + i, j] = np.float32(y) if y != 0.0 else np.float32(0.0)


# ---------------------------------------------------------------- bit packing
@_jit
def pack(codes, bits, out):  # pragma: no cover - compiled
    """Codes (uint8, < 2**bits) eight at a time into ``bits`` bytes, code i at bit ``bits*i`` (little-endian)."""
    n = codes.size
    groups = (n + 7) // 8
    for g in range(groups):
        word = np.uint64(0)
        base = g * 8
        for i in range(8):
            k = base + i
            if k < n:
                word |= np.uint64(codes[k]) << np.uint64(bits * i)
        o = g * bits
        for b in range(bits):
            out[o + b] = np.uint8((word >> np.uint64(8 * b)) & np.uint64(0xFF))


@_jit
def unpack(data, bits, count, out):  # pragma: no cover - compiled
    """Inverse of :func:`pack`: ``count`` codes into ``out`` (uint8)."""
    mask = np.uint64((1 << bits) - 1)
    groups = (count + 7) // 8
    for g in range(groups):
        o = g * bits
        word = np.uint64(0)
        for b in range(bits):
            word |= np.uint64(data[o + b]) << np.uint64(8 * b)
        base = g * 8
        for i in range(8):
            k = base + i
            if k < count:
                out[k] = np.uint8((word >> np.uint64(bits * i)) & mask)


# ---------------------------------------------------------------- fused frame decoding
def _words_row(body, gb, bits, d, rowc):  # pragma: no cover - compiled (inlined)
    """``d`` codes (d a multiple of 8) from whole packing words at byte ``gb`` into ``rowc``.

    Inlined with ``bits`` a literal (see _row_codes), so the byte and shift
    loops unroll into constant shifts.
    """
    mask = np.uint64((1 << bits) - 1)
    for g8 in range(d // 8):
        word = np.uint64(0)
        for b in range(bits):
            word |= np.uint64(body[gb + b]) << np.uint64(8 * b)
        gb += bits
        for k in range(8):
            rowc[g8 * 8 + k] = np.float32((word >> np.uint64(bits * k)) & mask)


def _row_codes(body, cpos, bits, c0, d, rowc):  # pragma: no cover - compiled (inlined)
    """Codes ``c0 .. c0+d`` of a packed stream at ``cpos`` as float32 into ``rowc``."""
    if bits == 8:
        for j in range(d):
            rowc[j] = np.float32(body[cpos + c0 + j])
        return
    if c0 % 8 == 0 and d % 8 == 0:  # the row starts a packing group: whole words
        gb = cpos + (c0 // 8) * bits
        if bits == 4:
            _words_row(body, gb, 4, d, rowc)
        elif bits == 3:
            _words_row(body, gb, 3, d, rowc)
        elif bits == 2:
            _words_row(body, gb, 2, d, rowc)
        else:
            _words_row(body, gb, bits, d, rowc)
        return
    mask = np.uint64((1 << bits) - 1)
    for j in range(d):  # general case: one code at a time
        f = c0 + j
        bit = (f // 8) * bits * 8 + (f % 8) * bits
        byte = cpos + bit // 8
        shift = bit % 8
        pair = np.uint64(body[byte])
        if shift + bits > 8:
            pair |= np.uint64(body[byte + 1]) << np.uint64(8)
        rowc[j] = np.float32((pair >> np.uint64(shift)) & mask)


if numba is not None:
    _words_row = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy",
                            inline="always")(_words_row)
    _row_codes = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")(_row_codes)


@_jit
def token_tier(body, pos, bits, h, n, d, base_factor, table, idx, out):  # pragma: no cover - compiled
    """One TOKEN tier of a frame body into ``out[:, idx]``: scale bytes at ``pos``, then packed codes.

    Value = ``((code - half) + 0.5) * (table[u] * 2**base)``, the ops of
    quantize.dequantize in the same order. Returns the position after the tier.
    """
    count = h * n * d
    cpos = pos + h * n
    end = cpos + (count if bits == 8 else (count + 7) // 8 * bits)
    hf = np.float32(1 << (bits - 1))
    p5 = np.float32(0.5)
    rowc = np.empty(d, np.float32)
    for a in range(h):
        for i in range(n):
            s = table[body[pos + a * n + i]] * base_factor
            _row_codes(body, cpos, bits, (a * n + i) * d, d, rowc)
            orow = out[a, idx[i]]
            for j in range(d):
                orow[j] = ((rowc[j] - hf) + p5) * s
    return end


@_jit
def channel_tier(body, pos, bits, h, n, d, group, cmax, idx, out):  # pragma: no cover - compiled
    """One CHANNEL tier into ``out[:, idx]``: int8 lows and highs per group at ``pos``, then codes.

    ``cmax`` [h, d] float32 (the stored fp16 maxima, widened). Grid and value
    follow quantize.dequantize_channels op for op. Returns the end position.
    """
    groups = (n + group - 1) // group
    lo_pos = pos
    hi_pos = pos + h * groups * d
    cpos = hi_pos + h * groups * d
    count = h * n * d
    end = cpos + (count if bits == 8 else (count + 7) // 8 * bits)
    levels = np.float32((1 << bits) - 1)
    tiny = np.float32(6.103515625e-05)  # torch.finfo(torch.float16).tiny
    floor = np.float32(1e-30)
    c127 = np.float32(127.0)
    lo = np.empty(d, np.float32)
    step = np.empty(d, np.float32)
    rowc = np.empty(d, np.float32)
    for a in range(h):
        for g in range(groups):
            for j in range(d):
                unit = cmax[a, j] / c127
                if unit < tiny:
                    unit = tiny
                lq = np.float32(np.int8(body[lo_pos + (a * groups + g) * d + j]))
                hq = np.float32(np.int8(body[hi_pos + (a * groups + g) * d + j]))
                lo[j] = lq * unit
                st = (hq - lq) * unit / levels
                step[j] = floor if st < floor else st
            for i in range(g * group, min(g * group + group, n)):
                _row_codes(body, cpos, bits, (a * n + i) * d, d, rowc)
                orow = out[a, idx[i]]
                for j in range(d):
                    orow[j] = rowc[j] * step[j] + lo[j]
    return end


# ---------------------------------------------------------------- fused frame encoding
@_jit
def _emit(codes, bits, out):  # pragma: no cover - compiled
    """Codes into ``out``: packed, or copied as bytes at 8 bits."""
    if bits == 8:
        out[:codes.size] = codes
    else:
        pack(codes, bits, out)


def _rint(y):  # pragma: no cover - compiled (inlined)
    """Round half to even (torch.round) as adds that vectorize; np.rint compiles to a libm call here.

    For |y| < 2**23, ``|y| + 2**23`` lands where the float32 spacing is 1, so
    the addition itself rounds to the nearest integer, ties to even; larger
    values are already integers. The sign goes back on at the end (NaN stays NaN).
    """
    a = abs(y)
    r = (a + _TWO23) - _TWO23 if a < _TWO23 else a
    return np.float32(math.copysign(r, y))


_TWO23 = np.float32(8388608.0)
if numba is not None:
    _rint = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")(_rint)


@_jit
def _search(table, value):  # pragma: no cover - compiled
    """``torch.searchsorted(table, value)`` (left): first index with table[i] >= value; NaN -> len."""
    if value != value:
        return table.size
    lo, hi = 0, table.size
    while lo < hi:
        mid = (lo + hi) // 2
        if table[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@_jit
def token_encode(x, xbits, h, idx, bits, table, body, off):  # pragma: no cover - compiled
    """A TOKEN tier of every layer in ``x`` [layers*h, t, d] into ``body[layer, off:]``.

    Writes the base exponent (int8), the scale bytes [h, n] and the packed codes,
    computing exactly what quantize.quantize computes (per-layer base from the
    smallest positive needed scale, scale byte by searchsorted, floor(x/s)).
    ``xbits`` is ``x`` viewed as uint32 (row maxima as integer maxima vectorize;
    float maxima do not without fast-math).
    """
    scratch = np.empty(1, np.uint32)
    as_float = scratch.view(np.float32)
    rows, t, d = x.shape
    layers = rows // h
    n = idx.size
    half = np.float32(1 << (bits - 1))
    lo_c = np.float32(-half)
    hi_c = np.float32(half - 1.0)
    needed = np.empty(h * n, np.float32)
    codes = np.empty(h * n * d, np.uint8)
    for layer in range(layers):
        low = np.float32(np.inf)
        for a in range(h):
            for i in range(n):
                row = xbits[layer * h + a, idx[i]]
                m = np.uint32(0)  # |x| as bits: positive floats order as integers; NaN above inf
                for j in range(d):
                    b = row[j] & np.uint32(0x7FFFFFFF)
                    m = b if b > m else m
                scratch[0] = m
                nd = (np.float32(np.nan) if m > np.uint32(0x7F800000) else as_float[0]) / half
                needed[a * n + i] = nd
                if nd > 0 and nd < low:
                    low = nd
        if low < np.float32(np.inf):
            base = math.frexp(np.float64(low))[1] - 1
            base = min(max(base, -100), 100)
        else:
            base = -100
        body[layer, off] = np.uint8(base & 0xFF)
        neg = np.float32(math.ldexp(1.0, -base))
        pos_f = np.float32(math.ldexp(1.0, base))
        for r in range(h * n):
            u = _search(table, needed[r] * neg)
            if u > 255:
                u = 255
            body[layer, off + 1 + r] = np.uint8(u)
            needed[r] = table[u] * pos_f
        for a in range(h):
            for i in range(n):
                s = needed[a * n + i]
                row = x[layer * h + a, idx[i]]
                c0 = (a * n + i) * d
                for j in range(d):  # selects, no branches: the loop vectorizes
                    q = np.floor(row[j] / s)
                    q = lo_c if q < lo_c else q
                    q = hi_c if q > hi_c else q
                    codes[c0 + j] = np.uint8(np.int32(q + half))
        _emit(codes, bits, body[layer, off + 1 + h * n:])


@_jit
def channel_encode(x, h, idx, bits, group, gmin, gmax, cmax, body, off):  # pragma: no cover - compiled
    """A CHANNEL tier of every layer into ``body[layer, off:]``: int8 lows, highs, then packed codes.

    ``cmax`` [layers*h, d] float32 holds the fp16-rounded channel maxima (the
    caller writes their fp16 bytes first); grid and codes follow
    quantize.quantize_channels op for op.
    """
    rows, t, d = x.shape
    layers = rows // h
    n = idx.size
    groups = gmin.shape[1]
    levels = np.float32((1 << bits) - 1)
    tiny = np.float32(6.103515625e-05)
    floor_step = np.float32(1e-30)
    c127 = np.float32(127.0)
    zero = np.float32(0.0)
    lo = np.empty(d, np.float32)
    step = np.empty(d, np.float32)
    unit = np.empty(d, np.float32)
    codes = np.empty(h * n * d, np.uint8)
    for layer in range(layers):
        out = body[layer]
        lo_pos = off
        hi_pos = off + h * groups * d
        for a in range(h):
            r = layer * h + a
            for j in range(d):
                u = cmax[r, j] / c127
                unit[j] = tiny if u < tiny else u
            for g in range(groups):
                for j in range(d):
                    lq = np.floor(gmin[r, g, j] / unit[j])
                    lq = min(max(lq, np.float32(-127.0)), np.float32(127.0)) if lq == lq else lq
                    hq = np.ceil(gmax[r, g, j] / unit[j])
                    hq = min(max(hq, np.float32(-127.0)), np.float32(127.0)) if hq == hq else hq
                    k = (a * groups + g) * d + j
                    out[lo_pos + k] = np.uint8(np.int8(lq) & 0xFF) if lq == lq else 0
                    out[hi_pos + k] = np.uint8(np.int8(hq) & 0xFF) if hq == hq else 0
                    lo[j] = lq * unit[j]
                    st = (hq - lq) * unit[j] / levels
                    step[j] = floor_step if st < floor_step else st
                for i in range(g * group, min(g * group + group, n)):
                    row = x[r, idx[i]]
                    c0 = (a * n + i) * d
                    for j in range(d):  # selects, no branches: the loop vectorizes
                        q = _rint((row[j] - lo[j]) / step[j])
                        q = zero if q < zero else q
                        q = levels if q > levels else q
                        codes[c0 + j] = np.uint8(np.int32(q))
        _emit(codes, bits, out[hi_pos + h * groups * d:])
