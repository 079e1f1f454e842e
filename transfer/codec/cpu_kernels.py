"""Compiled CPU kernels for the codec (numba), bit-identical to the torch stages.

Why: on CPU the torch pipeline makes a dozen passes over every element
(casts, float64 matmul for the rotation, divide, floor, clamp, add, cast, SWAR
packing), each allocating a temporary, and ~200-300 small ops per 256-token
frame that hold the GIL between them. Here a frame is decoded in one call
(:func:`decode_frame`) and encoded in one call per tier and tensor
(:func:`token_encode`, :func:`channel_tier_encode`); every loop reads its input
once, runs without the GIL (``nogil``) so frames run on all cores, and is
compiled once per machine into numba's cache (``cache=True``).

Same bytes as the torch stages, by construction:
- every float operation is the one torch performs, in the same precision and
  order, with no fused multiply-add and no reassociation (numba compiles
  without fast-math, so LLVM may not contract ``a * b + c``);
- the rotation is a fast Walsh-Hadamard transform in float64 instead of a
  float64 matmul; both compute sums of +-x that are exact in float64 for
  fp16/bf16-range inputs, so the order of additions cannot change the result;
- maxima and minima are taken on float bits mapped to integers that sort like
  the floats (integer min/max vectorizes, float min/max does not without
  fast-math); round-half-even and fp16 rounding are written out and tested
  against torch.
NaN and inf inputs are the exception: there the two paths may write
different (equally meaningless) codes.
``tests/unit/test_codec_golden.py`` pins frames and decoded tensors and runs
with and without these kernels; ``tests/unit/test_codec_kernels.py`` compares
the paths on random shapes, bit widths and malformed bodies.

CUDA tensors never come here: they keep the torch stages, which produce the
same frames. Set ``KVSTORE_CODEC_KERNELS=torch`` to force the torch stages on
CPU too (the tests switch per test, to compare).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar, cast

import numpy as np
import numpy.typing as npt

try:  # numba is a hard dependency, but the codec must keep working (slower) without it
    import numba
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None  # type: ignore[assignment]  # the one way to say "module or None" to mypy

# The kernels' Python signatures, for mypy and readers (numba ignores annotations and types each call
# by its arguments): arrays of any dtype, and scalars that are Python or numpy numbers (inside a
# kernel, an element read from an array is a numpy scalar).
Arr: TypeAlias = npt.NDArray[Any]
Int: TypeAlias = "int | np.integer[Any]"
Float: TypeAlias = "float | np.floating[Any]"
_F = TypeVar("_F", bound=Callable[..., Any])

_WANTED = os.environ.get("KVSTORE_CODEC_KERNELS", "numba").strip().lower() != "torch"
AVAILABLE = numba is not None


def enabled() -> bool:
    """Whether CPU tensors take these kernels (numba installed and not switched off)."""
    return AVAILABLE and _WANTED


def set_enabled(on: bool) -> None:
    """Switch the kernels on or off for this process (tests compare both paths)."""
    global _WANTED
    _WANTED = bool(on)


if numba is not None:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.extending import intrinsic as _numba_intrinsic

    def _intrinsic(fn: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
        """numba's ``@intrinsic``, typed as what compiled code calls: the arguments after ``typingctx``."""
        return cast("Callable[[Any], Any]", _numba_intrinsic(fn))

    @_intrinsic
    def _half_bits(
        typingctx: object, x: object
    ) -> tuple[Any, Callable[..., Any]]:  # pragma: no cover - compiled
        """float32 -> fp16 bits by LLVM's ``fptrunc`` (round to nearest even; F16C ``vcvtps2ph`` on x86)."""

        def codegen(context: object, builder: Any, signature: object, args: Sequence[Any]) -> Any:
            return builder.bitcast(builder.fptrunc(args[0], _ir.HalfType()), _ir.IntType(16))

        return _types.uint16(_types.float32), codegen

    @_intrinsic
    def _half_value(
        typingctx: object, b: object
    ) -> tuple[Any, Callable[..., Any]]:  # pragma: no cover - compiled
        """fp16 bits -> float32 by LLVM's ``fpext`` (exact)."""

        def codegen(context: object, builder: Any, signature: object, args: Sequence[Any]) -> Any:
            return builder.fpext(builder.bitcast(args[0], _ir.HalfType()), _ir.FloatType())

        return _types.float32(_types.uint16), codegen

    @_intrinsic
    def _float_bits(
        typingctx: object, x: object
    ) -> tuple[Any, Callable[..., Any]]:  # pragma: no cover - compiled
        """A float32's bit pattern as uint32 (a bitcast: no memory round trip, so loops over it vectorize)."""

        def codegen(context: object, builder: Any, signature: object, args: Sequence[Any]) -> Any:
            return builder.bitcast(args[0], _ir.IntType(32))

        return _types.uint32(_types.float32), codegen


_local = threading.local()


def scratch(shape: tuple[int, ...], key: str) -> np.ndarray:
    """This thread's reusable float32 buffer ``key``, viewed as ``shape``.

    Why: a fresh multi-MB array per frame is fresh pages, and on a VM the
    first-touch page faults cost more than the conversion that fills them.
    Only for buffers that never leave the call that took them.
    """
    cache = _local.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = cache[key] = np.empty(max(size, 1), np.float32)
    return buf[:size].reshape(shape)


#: ``bf16_nan`` value that makes the kernels' 16-bit outputs fp16 bits (any other value: bfloat16 bits).
FP16 = -1


def _jit(fn: _F) -> _F:
    """Compiled without the GIL, cached; typed as the Python function (same arguments, same results)."""
    if numba is None:  # pragma: no cover
        return fn
    return cast(_F, numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")(fn))


# ---------------------------------------------------------------- rotation
@_jit
def _fwht_block(buf: Arr, d: Int, nb: Int) -> None:  # pragma: no cover - compiled
    """In-place FWHT of the ``nb`` columns of ``buf`` [d, block] (float64, exact for our inputs)."""
    h = 1
    while 4 * h <= d:  # stages h and 2h fused (radix 4): half the passes over buf, same sums
        for i0 in range(0, d, 4 * h):
            for j in range(i0, i0 + h):
                r0_ = buf[j]
                r1_ = buf[j + h]
                r2_ = buf[j + 2 * h]
                r3_ = buf[j + 3 * h]
                for c in range(nb):
                    a = r0_[c]
                    b = r1_[c]
                    e = r2_[c]
                    f = r3_[c]
                    s0 = a + b
                    s1 = a - b
                    s2 = e + f
                    s3 = e - f
                    r0_[c] = s0 + s2
                    r1_[c] = s1 + s3
                    r2_[c] = s0 - s2
                    r3_[c] = s1 - s3
        h *= 4
    if h < d:  # odd number of stages: one radix-2 stage left
        for j in range(h):
            top = buf[j]
            bot = buf[j + h]
            for c in range(nb):
                a = top[c]
                b = bot[c]
                top[c] = a + b
                bot[c] = a - b


@_jit
def hadamard_rows(
    x: Arr, signs: Arr, scale: Float, pre_signs: bool, out: Arr
) -> None:  # pragma: no cover - compiled
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
        _fwht_block(buf, d, nb)
        for i in range(nb):
            for j in range(d):
                y = buf[j, i] * post[j]
                # an exact zero is +0, as the matmul's sum of products (a sign flip would make -0)
                out[r0 + i, j] = np.float32(y) if y != 0.0 else np.float32(0.0)


@_jit
def unrotate_rows_to_half(
    x: Arr, signs: Arr, scale: Float, out_half: Arr, bf16_nan: Int
) -> None:  # pragma: no cover - compiled
    """:func:`hadamard_rows` (inverse, signs after) straight to 16-bit bits: ``half(float32(y))``.

    The decoder's last two passes in one, for a tensor with nothing to add after
    the rotation: the same float32 value is rounded to fp16 as ``to_half`` would
    (``bf16_nan`` is :data:`FP16`), or to bfloat16 as ``to_bf16`` would.
    """
    rows, d = x.shape
    block = 32
    buf = np.empty((d, block), np.float64)
    post = np.empty(d, np.float64)
    for j in range(d):
        post[j] = signs[j] * scale
    for r0 in range(0, rows, block):
        nb = min(block, rows - r0)
        for i in range(nb):
            for j in range(d):
                buf[j, i] = np.float64(x[r0 + i, j])
        _fwht_block(buf, d, nb)
        for i in range(nb):
            if bf16_nan == FP16:
                for j in range(d):
                    y = buf[j, i] * post[j]
                    out_half[r0 + i, j] = _half_bits(np.float32(y) if y != 0.0 else np.float32(0.0))
            else:
                for j in range(d):
                    y = buf[j, i] * post[j]
                    out_half[r0 + i, j] = _bf16_bits(np.float32(y) if y != 0.0 else np.float32(0.0), bf16_nan)


# ---------------------------------------------------------------- bit packing
@_jit
def pack(codes: Arr, bits: Int, out: Arr) -> None:  # pragma: no cover - compiled
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
def unpack(data: Arr, bits: Int, count: Int, out: Arr) -> None:  # pragma: no cover - compiled
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
def _words_row(
    body: Arr, gb: Int, bits: Int, d: Int, rowc: Arr
) -> None:  # pragma: no cover - compiled (inlined)
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


def _row_codes(
    body: Arr, cpos: Int, bits: Int, c0: Int, d: Int, rowc: Arr
) -> None:  # pragma: no cover - compiled (inlined)
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
    _words_row = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")(
        _words_row
    )
    _row_codes = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")(
        _row_codes
    )


@_jit
def token_tier(
    body: Arr,
    pos: Int,
    bits: Int,
    h: Int,
    n: Int,
    d: Int,
    base_factor: Float,
    table: Arr,
    idx: Arr,
    out: Arr,
    at: Int,
) -> Int:  # pragma: no cover - compiled
    """One TOKEN tier of a frame body into ``out[:, at + idx]``: scale bytes at ``pos``, then packed codes.

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
            orow = out[a, at + idx[i]]
            for j in range(d):
                orow[j] = ((rowc[j] - hf) + p5) * s
    return end


@_jit
def channel_tier(
    body: Arr, pos: Int, bits: Int, h: Int, n: Int, d: Int, group: Int, cmax: Arr, idx: Arr, out: Arr, at: Int
) -> Int:  # pragma: no cover - compiled
    """One CHANNEL tier into ``out[:, at + idx]``: int8 lows and highs per group at ``pos``, then codes.

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
                orow = out[a, at + idx[i]]
                for j in range(d):
                    orow[j] = rowc[j] * step[j] + lo[j]
    return end


# ---------------------------------------------------------------- fused frame encoding
@_jit
def _emit(codes: Arr, bits: Int, out: Arr) -> None:  # pragma: no cover - compiled
    """Codes into ``out``: packed, or copied as bytes at 8 bits."""
    if bits == 8:
        out[: codes.size] = codes
    else:
        pack(codes, bits, out)


def _rint(y: Float) -> np.float32:  # pragma: no cover - compiled (inlined)
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
def _search(table: Arr, value: Float) -> Int:  # pragma: no cover - compiled
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
def token_encode(
    x: Arr, xbits: Arr, h: Int, idx: Arr, bits: Int, table: Arr, body: Arr, off: Int
) -> None:  # pragma: no cover - compiled
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
        _emit(codes, bits, body[layer, off + 1 + h * n :])


@_jit
def channel_encode(
    x: Arr, h: Int, idx: Arr, bits: Int, group: Int, gmin: Arr, gmax: Arr, cmax: Arr, body: Arr, off: Int
) -> None:  # pragma: no cover - compiled
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
        _emit(codes, bits, out[hi_pos + h * groups * d :])


# ---------------------------------------------------------------- one call per frame (decode)
# decode_frame's status codes; cpu_decode turns them into CorruptFrame messages
OK, ERR_SHORT, ERR_TABLE, ERR_MAP, ERR_TRAILING, ERR_ROTATION = 0, 1, 2, 3, 4, 5


@_jit
def half_to_float(bits: Int) -> np.float32:  # pragma: no cover - compiled
    """An fp16 bit pattern (as an integer) widened to float32, exactly (NaN payloads kept)."""
    sign = (bits >> 15) & 1
    exp = (bits >> 10) & 0x1F
    man = bits & 0x3FF
    if exp == 31:
        scratch = np.empty(1, np.uint32)
        scratch[0] = np.uint32((sign << 31) | 0x7F800000 | (man << 13))
        return scratch.view(np.float32)[0]
    if exp == 0:
        val = np.float32(man) * np.float32(5.960464477539063e-08)  # man * 2**-24, exact
    else:
        val = np.float32(1024 + man) * np.float32(math.ldexp(1.0, exp - 25))
    return -val if sign else val


@_jit
def _half_at(body: Arr, pos: Int) -> np.float32:  # pragma: no cover - compiled
    return half_to_float(np.int64(body[pos]) | (np.int64(body[pos + 1]) << 8))


@_jit
def _packed(count: Int, bits: Int) -> Int:  # pragma: no cover - compiled
    return count if bits == 8 else (count + 7) // 8 * bits


@_jit
def _decode_tiers(
    body: Arr,
    pos: Int,
    size: Int,
    col: Int,
    table: Arr,
    n_tiers: Int,
    group: Int,
    counts: Arr,
    order: Arr,
    starts: Arr,
    h: Int,
    d: Int,
    scales: Arr,
    out: Arr,
    at: Int,
    write: bool,
    err: Arr,
) -> Int:  # pragma: no cover - compiled
    """The tiers of K (col 0) or V (col 2) into ``out[:, at + token]``; returns the new position, or -1 with
    ``err`` set. With ``write`` False it only checks the lengths (the pass that runs before any write)."""
    for tier in range(n_tiers):
        n = counts[tier]
        if n == 0:
            continue
        scheme = table[tier, col]
        bits = table[tier, col + 1]
        idx = order[starts[tier] : starts[tier] + n]
        count = h * n * d
        if scheme == 0:  # TOKEN: base, scale bytes, codes
            need = pos + 1 + h * n + _packed(count, bits)
            if pos + 1 > size:
                err[0], err[1] = ERR_SHORT, pos + 1
                return -1
            if need > size:
                err[0], err[1] = ERR_SHORT, need
                return -1
            if not write:
                pos = need
                continue
            base = np.int64(np.int8(body[pos]))
            factor = np.float32(math.ldexp(1.0, base)) if -126 <= base <= 127 else _bits_pow2(base)
            pos = token_tier(body, pos + 1, bits, h, n, d, factor, scales, idx, out, at)
        else:  # CHANNEL: fp16 maxima, int8 lows and highs, codes
            groups = (n + group - 1) // group
            if pos + h * d * 2 > size:
                err[0], err[1] = ERR_SHORT, pos + h * d * 2
                return -1
            need = pos + h * d * 2 + 2 * h * groups * d + _packed(count, bits)
            if need > size:
                err[0], err[1] = ERR_SHORT, need
                return -1
            if not write:
                pos = need
                continue
            cmax = np.empty((h, d), np.float32)
            for a in range(h):
                for j in range(d):
                    cmax[a, j] = _half_at(body, pos + 2 * (a * d + j))
            pos = channel_tier(body, pos + h * d * 2, bits, h, n, d, group, cmax, idx, out, at)
    return pos


@_jit
def _bits_pow2(exponent: Int) -> np.float32:  # pragma: no cover - compiled
    """quantize.pow2's bit construction for exponents outside the normal range (only corrupt frames)."""
    scratch = np.empty(1, np.int32)
    scratch[0] = np.int32((exponent + 127) << 23)
    return scratch.view(np.float32)[0]


@_jit
def _walk_tensors(
    body: Arr,
    pos: Int,
    h: Int,
    d: Int,
    flags: Int,
    signs: Arr,
    scale: Float,
    scales: Arr,
    plan: tuple[Arr, Int, Arr, Arr, Arr],
    outs: tuple[Arr, Arr, Int],
    halves: tuple[Arr, Arr, Int, Int],
    write: bool,
    err: Arr,
) -> Int:  # pragma: no cover - compiled
    """K then V of a body from ``pos``: checked only (``write`` False), or decoded into the outputs.

    Decoding: each tensor's tiers into float32 ``out[:, at : at + t]``, then per
    head the inverse rotation and the fp16 means, and, when ``half_*`` are not
    empty, 16-bit values into ``half[:, half_at : half_at + t]``: fp16 bits when
    ``bf16_nan`` is :data:`FP16`, else bfloat16 bits (a rotated tensor with no
    means goes straight to them: the same float32 value rounded as ``to_half`` /
    ``to_bf16`` would). Returns the end position, or -1 with ``err`` set.
    """
    table, group, counts, order, starts = plan  # from _decode_body's parse of the tier table and map
    out_k, out_v, at = outs
    half_k, half_v, half_at, bf16_nan = halves
    n_tiers = table.shape[0]
    t = order.size
    size = body.size
    for col, out, half, center_flag, rotate_flag in ((0, out_k, half_k, 8, 2), (2, out_v, half_v, 16, 4)):
        mean_pos: Int = -1
        if flags & center_flag:  # the tensor's fp16 means come first, are added last
            if pos + h * d * 2 > size:
                err[0], err[1] = ERR_SHORT, pos + h * d * 2
                return -1
            mean_pos = pos
            pos += h * d * 2
        pos = _decode_tiers(
            body,
            pos,
            size,
            col,
            table,
            n_tiers,
            group,
            counts,
            order,
            starts,
            h,
            d,
            scales,
            out,
            at,
            write,
            err,
        )
        if pos < 0:
            return -1
        rotated = flags & rotate_flag
        if rotated and signs.size != d:
            err[0] = ERR_ROTATION
            return -1
        if not write:
            continue
        for a in range(h):
            rows = out[a, at : at + t]
            if rotated:
                if mean_pos < 0 and half.size:  # nothing to add after: rotate straight into the 16-bit output
                    unrotate_rows_to_half(rows, signs, scale, half[a, half_at : half_at + t], bf16_nan)
                    continue
                hadamard_rows(rows, signs, scale, False, rows)  # in place: each block is read before written
            if mean_pos >= 0:
                for j in range(d):
                    m = _half_at(body, mean_pos + 2 * (a * d + j))
                    for i in range(t):
                        rows[i, j] += m
            if half.size and bf16_nan == FP16:
                to_half(rows.reshape(t * d), half[a, half_at : half_at + t].reshape(t * d))
            elif half.size:
                to_bf16(rows.reshape(t * d), half[a, half_at : half_at + t].reshape(t * d), bf16_nan)
    return pos


@_jit
def _decode_body(
    body: Arr,
    h: Int,
    t: Int,
    d: Int,
    flags: Int,
    signs: Arr,
    scale: Float,
    scales: Arr,
    out_k: Arr,
    out_v: Arr,
    at: Int,
    half_k: Arr,
    half_v: Arr,
    half_at: Int,
    bf16_nan: Int,
    err: Arr,
) -> Int:  # pragma: no cover - compiled
    """A whole quantized frame body into its ``t`` token rows of the outputs, checked whole before any write.

    Float32 rows go to ``out_k``/``out_v`` ``[h, *, d]`` at token ``at``; when
    ``half_k``/``half_v`` are not empty the result is 16-bit there at token
    ``half_at`` (fp16 bits, or bfloat16 bits unless ``bf16_nan`` is
    :data:`FP16`) and ``out_*`` are scratch. The outputs may be a whole layer
    (a frame's rows at its offset, no copy afterwards) or one frame's tensors.

    Parses the tier table and precision map, decodes every tier of K and V,
    undoes the rotation and adds the means, exactly as frame._decode_quantized
    does. A malformed body returns a status (ERR_*, ``err[1]`` the byte count it
    needed) after a pass that only checks lengths, so it writes nothing at all:
    the outputs a frame shares with its neighbours never hold garbage.
    ``signs`` is the rotation's +-1 vector (empty when head_dim is not a power
    of two), ``scales`` the scale-byte table.
    """
    size = body.size
    if size < 1:
        err[0], err[1] = ERR_SHORT, 1
        return ERR_SHORT
    n_tiers = np.int64(body[0])
    if 1 + 4 * n_tiers + 1 > size:
        err[0], err[1] = ERR_SHORT, 1 + 4 * n_tiers + 1
        return ERR_SHORT
    table = np.empty((max(n_tiers, 1), 4), np.int64)
    for r in range(n_tiers):
        for c in range(4):
            table[r, c] = body[1 + 4 * r + c]
    group = np.int64(body[1 + 4 * n_tiers])
    bad = n_tiers == 0 or group == 0
    for r in range(n_tiers):
        for c in (0, 2):
            if table[r, c] > 1 or table[r, c + 1] < 1 or table[r, c + 1] > 8:
                bad = True
    if bad:
        err[0] = ERR_TABLE
        return ERR_TABLE
    pos = 2 + 4 * n_tiers
    map_bytes = (t + 7) // 8 * 4
    if pos + map_bytes > size:
        err[0], err[1] = ERR_SHORT, pos + map_bytes
        return ERR_SHORT
    tiers = np.empty(t, np.uint8)
    if t:
        unpack(body[pos : pos + map_bytes], 4, t, tiers)
    pos += map_bytes
    slots = max(n_tiers, 16)  # the map names tiers 0..15; a longer table's other tiers hold no tokens
    counts = np.zeros(slots, np.int64)
    for i in range(t):
        if tiers[i] >= n_tiers:
            err[0] = ERR_MAP
            return ERR_MAP
        counts[tiers[i]] += 1
    starts = np.zeros(slots, np.int64)
    for r in range(1, slots):
        starts[r] = starts[r - 1] + counts[r - 1]
    fill = starts.copy()
    order = np.empty(t, np.int64)
    for i in range(t):
        order[fill[tiers[i]]] = i
        fill[tiers[i]] += 1
    plan, outs = (table, group, counts, order, starts), (out_k, out_v, at)
    halves = (half_k, half_v, half_at, bf16_nan)
    for write in (False, True):  # check the whole body, then write
        end = _walk_tensors(body, pos, h, d, flags, signs, scale, scales, plan, outs, halves, write, err)
        if end < 0:
            return err[0]
        if end != size:
            err[0], err[1] = ERR_TRAILING, size - end
            return ERR_TRAILING
    return OK


@_jit
def decode_frame(
    body: Arr,
    h: Int,
    t: Int,
    d: Int,
    flags: Int,
    signs: Arr,
    scale: Float,
    scales: Arr,
    out_k: Arr,
    out_v: Arr,
    half_k: Arr,
    half_v: Arr,
    err: Arr,
) -> Int:  # pragma: no cover - compiled
    """A whole quantized frame body into float32 ``out_k``/``out_v`` [h, t, d] in one call.

    When ``half_k``/``half_v`` are not empty, the result is written there as fp16
    bits (the frame's usual output dtype), in the same call, and ``out_k``/``out_v``
    are scratch. Returns OK or a status (ERR_*, see :func:`_decode_body`).
    """
    return _decode_body(
        body, h, t, d, flags, signs, scale, scales, out_k, out_v, 0, half_k, half_v, 0, FP16, err
    )


@_jit
def decode_frames(
    bodies: Arr,
    offsets: Arr,
    h: Int,
    t: Int,
    d: Int,
    flags: Arr,
    signs: Arr,
    scale: Float,
    scales: Arr,
    out_k: Arr,
    out_v: Arr,
    want_half: bool,
    half_k: Arr,
    half_v: Arr,
    err: Arr,
) -> Int:  # pragma: no cover - compiled
    """:func:`decode_frame` for ``n`` same-shaped frames in one call (one GIL release for all of them).

    ``bodies`` holds the raw bodies back to back, frame ``i`` at
    ``offsets[i]:offsets[i+1]``; outputs are [n, h, t, d] (``half_k``/``half_v``
    when ``want_half``, else ``out_k``/``out_v``; the other pair is not
    touched and may be empty). Stops at the first
    malformed body and returns its index (``err`` holds its status), else -1.
    """
    none = np.empty((0, 0, 0), np.uint16)
    scratch_k = np.empty((h, t, d), np.float32)  # fp16 output: float32 only as per-frame scratch, reused
    scratch_v = np.empty((h, t, d), np.float32)
    for i in range(offsets.size - 1):
        body = bodies[offsets[i] : offsets[i + 1]]
        if want_half:
            status = decode_frame(
                body, h, t, d, flags[i], signs, scale, scales, scratch_k, scratch_v, half_k[i], half_v[i], err
            )
        else:
            status = decode_frame(
                body, h, t, d, flags[i], signs, scale, scales, out_k[i], out_v[i], none, none, err
            )
        if status != OK:
            return i
    return -1


@_jit
def decode_frames_into(
    bodies: Arr,
    offsets: Arr,
    tokens: Arr,
    at: Arr,
    h: Int,
    d: Int,
    flags: Arr,
    signs: Arr,
    scale: Float,
    scales: Arr,
    out_k: Arr,
    out_v: Arr,
    want_half: bool,
    half_k: Arr,
    half_v: Arr,
    bf16_nan: Int,
    err: Arr,
) -> Int:  # pragma: no cover - compiled
    """Frames of one layer straight into its tensors: frame ``i``'s tokens at ``at[i] .. at[i] + tokens[i]``.

    The outputs are the whole layer ``[h, T, d]``: float32 ``out_k``/``out_v``,
    or with ``want_half`` 16-bit ``half_k``/``half_v`` (fp16 bits when
    ``bf16_nan`` is :data:`FP16`, else bfloat16 bits, see :func:`to_bf16`;
    ``out_*`` are then float32 scratch of at least ``max(tokens)`` rows per head). Frames may differ
    in tokens (a layer's last chunk is often short), not in heads or head_dim.
    Each frame is checked whole before it writes (see :func:`_decode_body`);
    stops at the first malformed body and returns its index, with frames before
    it written and nothing from it or after it, else -1.
    """
    none = np.empty((0, 0, 0), np.uint16)
    for i in range(offsets.size - 1):
        body = bodies[offsets[i] : offsets[i + 1]]
        t = tokens[i]
        if want_half:  # float32 scratch from its row 0, the 16-bit words at the frame's rows
            row, hk, hv, hrow = 0, half_k, half_v, at[i]
        else:
            row, hk, hv, hrow = at[i], none, none, 0
        status = _decode_body(
            body, h, t, d, flags[i], signs, scale, scales, out_k, out_v, row, hk, hv, hrow, bf16_nan, err
        )
        if status != OK:
            return i
    return -1


@_jit
def to_half(src: Arr, dst: Arr) -> None:  # pragma: no cover - compiled
    """float32 -> fp16 bits, elementwise (vectorized ``vcvtps2ph``)."""
    for i in range(src.size):
        dst[i] = _half_bits(src[i])


@_jit
def _bf16_bits(x: Float, nan: Int) -> np.uint16:  # pragma: no cover - compiled (inlined)
    """float32 -> bfloat16 bits as torch rounds: to nearest even on the float32 bits; a NaN becomes ``nan``.

    Adding ``0x7FFF`` plus the kept part's lowest bit and dropping the low 16
    bits rounds every non-NaN value (subnormals, a carry up to inf included);
    the NaN pattern is torch's, found at run time (cpu_decode.bf16_nan).
    """
    b = _float_bits(x)
    rounded = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return np.uint16(nan) if x != x else rounded


@_jit
def to_bf16(src: Arr, dst: Arr, nan: Int) -> None:  # pragma: no cover - compiled
    """float32 -> bfloat16 bits, elementwise (:func:`_bf16_bits`; integer ops, vectorized)."""
    for i in range(src.size):
        dst[i] = _bf16_bits(src[i], nan)


@_jit
def from_half(src: Arr, dst: Arr) -> None:  # pragma: no cover - compiled
    """fp16 bits -> float32, elementwise."""
    for i in range(src.size):
        dst[i] = _half_value(src[i])


# ---------------------------------------------------------------- channel tier encoding in one call
@_jit
def float_to_half_bits(f: Float) -> Int:  # pragma: no cover - compiled
    """float32 -> fp16 bit pattern, rounded to nearest even (what torch's ``.to(float16)`` does)."""
    scratch = np.empty(1, np.float32)
    scratch[0] = f
    b = np.int64(scratch.view(np.uint32)[0])
    sign = (b >> 16) & 0x8000
    e = (b >> 23) & 0xFF
    m = b & 0x7FFFFF
    if e == 255:  # inf, or NaN (quiet, top payload bits kept)
        return sign | 0x7C00 | ((0x200 | (m >> 13)) if m else 0)
    exp = e - 112  # the fp16 exponent field this value would have
    if exp >= 31:
        return sign | 0x7C00
    if exp <= 0:  # fp16 subnormal (or zero)
        if exp < -10:
            return sign
        full = m | 0x800000
        shift = 14 - exp
        hm = full >> shift
        rem = full & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (hm & 1)):
            hm += 1
        return sign | hm
    hm = m >> 13
    rem = m & 0x1FFF
    res = (exp << 10) + hm
    if rem > 0x1000 or (rem == 0x1000 and (hm & 1)):
        res += 1  # a carry into the exponent is right, up to inf
    return sign | res


@_jit
def channel_tier_encode(
    x: Arr, xbits: Arr, h: Int, idx: Arr, bits: Int, group: Int, body: Arr, off: Int
) -> None:  # pragma: no cover - compiled
    """A CHANNEL tier of every layer: ranges, fp16 channel maxima, lows, highs and codes, in one call.

    The group lows and highs are taken on the float bits mapped to integers that
    sort like the floats (integer min/max vectorizes, float min/max does not
    without fast-math); the channel maximum is
    ``abs(max(max over groups of highs, -(min over groups of lows)))`` rounded
    to fp16, as quantize.channel_ranges computes it. ``xbits`` is ``x`` viewed
    as int32.
    """
    rows, t, d = x.shape
    n = idx.size
    groups = (n + group - 1) // group
    layers = rows // h
    kmin = np.empty((rows, groups, d), np.int32)
    kmax = np.empty((rows, groups, d), np.int32)
    for r in range(rows):
        for g in range(groups):
            lo = kmin[r, g]
            hi = kmax[r, g]
            first = xbits[r, idx[g * group]]
            for j in range(d):
                b = first[j]
                k = b ^ ((b >> 31) & 0x7FFFFFFF)
                lo[j] = k
                hi[j] = k
            for i in range(g * group + 1, min(g * group + group, n)):
                row = xbits[r, idx[i]]
                for j in range(d):
                    b = row[j]
                    k = b ^ ((b >> 31) & 0x7FFFFFFF)
                    lo[j] = min(lo[j], k)
                    hi[j] = max(hi[j], k)
    gmin = np.empty((rows, groups, d), np.int32)
    gmax = np.empty((rows, groups, d), np.int32)
    for r in range(rows):
        for g in range(groups):
            for j in range(d):
                k = kmin[r, g, j]
                gmin[r, g, j] = k ^ ((k >> 31) & 0x7FFFFFFF)  # the same map is its own inverse
                k = kmax[r, g, j]
                gmax[r, g, j] = k ^ ((k >> 31) & 0x7FFFFFFF)
    fmin = gmin.view(np.float32)
    fmax = gmax.view(np.float32)
    cmax = np.empty((rows, d), np.float32)
    for layer in range(layers):
        out = body[layer]
        for a in range(h):
            r = layer * h + a
            for j in range(d):
                top = fmax[r, 0, j]
                bottom = fmin[r, 0, j]
                for g in range(1, groups):
                    top = max(top, fmax[r, g, j])
                    bottom = min(bottom, fmin[r, g, j])
                c = abs(max(top, -bottom))
                hb = float_to_half_bits(c)
                out[off + 2 * (a * d + j)] = np.uint8(hb & 0xFF)
                out[off + 2 * (a * d + j) + 1] = np.uint8((hb >> 8) & 0xFF)
                cmax[r, j] = half_to_float(hb)
    channel_encode(x, h, idx, bits, group, fmin, fmax, cmax, body, off + 2 * h * d)


# ---------------------------------------------------------------- lossless byte planes
@_jit
def shuffle2(src: Arr, dst: Arr) -> None:  # pragma: no cover - compiled
    """uint16 words -> all low bytes, then all high bytes (the lossless profile's byte planes)."""
    n = src.size
    for i in range(n):
        w = src[i]
        dst[i] = np.uint8(w & 0xFF)
        dst[n + i] = np.uint8(w >> 8)


@_jit
def unshuffle2(src: Arr, dst: Arr) -> None:  # pragma: no cover - compiled
    """Inverse of :func:`shuffle2`: byte planes back into uint16 words."""
    n = dst.size
    for i in range(n):
        dst[i] = np.uint16(src[i]) | (np.uint16(src[n + i]) << np.uint16(8))


@_jit
def shuffle_bytes(src: Arr, width: Int, dst: Arr) -> None:  # pragma: no cover - compiled
    """Any element width: byte ``b`` of element ``i`` goes to ``dst[b * n + i]``."""
    n = src.size // width
    for i in range(n):
        for b in range(width):
            dst[b * n + i] = src[i * width + b]


@_jit
def unshuffle_bytes(src: Arr, width: Int, dst: Arr) -> None:  # pragma: no cover - compiled
    n = src.size // width
    for b in range(width):
        for i in range(n):
            dst[i * width + b] = src[b * n + i]


@_jit
def shuffle4(src: Arr, dst: Arr) -> None:  # pragma: no cover - compiled
    """uint32 words -> byte planes 0..3 (fp32's lossless layout); the generic loop ran at 1/3 the speed."""
    n = src.size
    for i in range(n):
        w = src[i]
        dst[i] = np.uint8(w & 0xFF)
        dst[n + i] = np.uint8((w >> 8) & 0xFF)
        dst[2 * n + i] = np.uint8((w >> 16) & 0xFF)
        dst[3 * n + i] = np.uint8(w >> 24)


@_jit
def unshuffle4(src: Arr, dst: Arr) -> None:  # pragma: no cover - compiled
    """Inverse of :func:`shuffle4`: four byte planes back into uint32 words."""
    _planes4_to_words(src, 0, dst.size, dst, 0, dst.size)


@_jit
def _planes2_to_words(
    src: Arr, start: Int, plane: Int, dst: Arr, at: Int, count: Int
) -> None:  # pragma: no cover - compiled
    # Slices, not index arithmetic in the loop: numba vectorizes this form (20x faster, measured).
    p0 = src[start : start + count]
    p1 = src[start + plane : start + plane + count]
    d = dst[at : at + count]
    for j in range(count):
        d[j] = np.uint16(p0[j]) | (np.uint16(p1[j]) << np.uint16(8))


@_jit
def _planes4_to_words(
    src: Arr, start: Int, plane: Int, dst: Arr, at: Int, count: Int
) -> None:  # pragma: no cover - compiled
    p0 = src[start : start + count]
    p1 = src[start + plane : start + plane + count]
    p2 = src[start + 2 * plane : start + 2 * plane + count]
    p3 = src[start + 3 * plane : start + 3 * plane + count]
    d = dst[at : at + count]
    for j in range(count):
        d[j] = (
            np.uint32(p0[j])
            | (np.uint32(p1[j]) << np.uint32(8))
            | (np.uint32(p2[j]) << np.uint32(16))
            | (np.uint32(p3[j]) << np.uint32(24))
        )


@_jit
def unshuffle2_into(
    src: Arr, k_dst: Arr, v_dst: Arr, heads: Int, row_stride: Int, offset: Int
) -> None:  # pragma: no cover - compiled
    """A lossless body of 16-bit words ([K then V], byte planes) written straight into K and V.

    ``k_dst``/``v_dst`` are a whole layer's ``[heads, tokens, head_dim]`` words,
    flattened (``row_stride`` = tokens * head_dim); this frame's heads land at
    ``offset`` within each head's row, so a layer of many chunks needs no
    concatenation afterwards.
    """
    n = src.size // 4
    per_head = n // heads
    for h in range(heads):
        _planes2_to_words(src, h * per_head, 2 * n, k_dst, h * row_stride + offset, per_head)
        _planes2_to_words(src, n + h * per_head, 2 * n, v_dst, h * row_stride + offset, per_head)


@_jit
def unshuffle4_into(
    src: Arr, k_dst: Arr, v_dst: Arr, heads: Int, row_stride: Int, offset: Int
) -> None:  # pragma: no cover - compiled
    """:func:`unshuffle2_into` for 32-bit words (fp32 KV)."""
    n = src.size // 8
    per_head = n // heads
    for h in range(heads):
        _planes4_to_words(src, h * per_head, 2 * n, k_dst, h * row_stride + offset, per_head)
        _planes4_to_words(src, n + h * per_head, 2 * n, v_dst, h * row_stride + offset, per_head)
