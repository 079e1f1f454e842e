"""Decoding a quantized frame body on CPU in one compiled call.

Why a second decoder: the torch decoder (frame._decode_quantized) spends most
of a 256-token frame's time in Python and in small torch ops (about 300 calls
per frame), not on the data, and holds the GIL while it does. Here one kernel
(cpu_kernels.decode_frame) parses the tier table and precision map, decodes
each tier straight into its tokens' rows, undoes the rotation in place and adds
the means; Python only allocates the outputs and turns a status code into a
``CorruptFrame``. The result is the same float32 tensors as the torch decoder,
bit for bit (tests/unit/test_codec_golden.py runs both), and a malformed body
is refused with the same error type before any read past its end.
"""

from __future__ import annotations

import functools
from typing import cast

import numpy as np
import torch

from transfer.codec import cpu_kernels
from transfer.codec.errors import CorruptFrame
from transfer.codec.format import FrameHeader
from transfer.codec.quantize import _SCALE_TABLE
from transfer.codec.rotate import fwht_params

_TABLE = _SCALE_TABLE.numpy()


_NO_HALF = np.empty((0, 0, 0), np.uint16)


def decode_quantized(
    body: np.ndarray, header: FrameHeader, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) [heads, tokens, head_dim] from a quantized frame body (uint8 array).

    fp16 is produced inside the kernel (no separate cast); other dtypes are
    float32 here, for the caller to cast.
    """
    h, t, d = header.shape
    half = dtype == torch.float16
    if half:  # float32 is only scratch then: reuse this thread's (fresh pages cost more than the decode)
        k, v = cpu_kernels.scratch((h, t, d), "decode-k"), cpu_kernels.scratch((h, t, d), "decode-v")
    else:
        k, v = np.empty((h, t, d), np.float32), np.empty((h, t, d), np.float32)
    hk = np.empty((h, t, d), np.uint16) if half else _NO_HALF
    hv = np.empty((h, t, d), np.uint16) if half else _NO_HALF
    signs, scale = fwht_params(d, header.seed)
    err = np.zeros(2, np.int64)
    status = cpu_kernels.decode_frame(body, h, t, d, header.flags, signs, scale, _TABLE, k, v, hk, hv, err)
    if status != cpu_kernels.OK:
        raise CorruptFrame(_message(status, int(err[1]), body))
    if half:
        return torch.from_numpy(hk).view(torch.float16), torch.from_numpy(hv).view(torch.float16)
    return torch.from_numpy(k), torch.from_numpy(v)


def _message(status: cpu_kernels.Int, value: int, body: np.ndarray) -> str:
    if status == cpu_kernels.ERR_SHORT:
        return f"body ends at {body.size} bytes, needed {value}"
    if status == cpu_kernels.ERR_TABLE:
        n = int(body[0])
        table = body[1 : 1 + 4 * n].reshape(n, 4).tolist()
        return f"bad tier table {table} (group {int(body[1 + 4 * n])})"
    if status == cpu_kernels.ERR_MAP:
        return "precision map names a tier the table does not have"
    if status == cpu_kernels.ERR_TRAILING:
        return f"body has {value} trailing bytes"
    if status == cpu_kernels.ERR_ROTATION:
        return "frame says rotated but its head_dim is not a power of two"
    return f"undecodable body (status {status})"


def decode_batch(
    opened: list[tuple[FrameHeader, bytes | memoryview]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of one shape and seed (quantized, already opened) in one kernel call: K, V [n, h, t, d].

    Why: each compiled call releases and retakes the GIL, and on a busy
    2-core box every retake can wait on the other thread; one call per batch
    lets two batches decode side by side at nearly twice the speed of one.
    """
    header = opened[0][0]
    h, t, d = header.shape
    n = len(opened)
    bodies, offsets, flags = _bodies(opened)
    half = dtype == torch.float16
    shape, unused = (n, h, t, d), (1, 0, 0, 0)
    k = np.empty(unused if half else shape, np.float32)
    v = np.empty(unused if half else shape, np.float32)
    hk = np.empty(shape if half else unused, np.uint16)
    hv = np.empty(shape if half else unused, np.uint16)
    signs, scale = fwht_params(d, header.seed)
    err = np.zeros(2, np.int64)
    bad = cpu_kernels.decode_frames(
        bodies, offsets, h, t, d, flags, signs, scale, _TABLE, k, v, half, hk, hv, err
    )
    if bad >= 0:
        raise CorruptFrame(_message(int(err[0]), int(err[1]), bodies[offsets[bad] : offsets[bad + 1]]))
    if half:
        tk, tv = torch.from_numpy(hk).view(torch.float16), torch.from_numpy(hv).view(torch.float16)
    else:
        tk, tv = torch.from_numpy(k), torch.from_numpy(v)
    return tk, tv


def writes_into(dtype: torch.dtype) -> bool:
    """Whether :func:`decode_into_layer` writes ``dtype`` itself, so frames land straight in a caller's tensor.

    float32 and fp16 always; bfloat16 when the kernels' rounding is torch's on
    this machine (:func:`bf16_nan`), since a bf16 output must hold exactly what
    decoding to float32 and torch's ``.to(torch.bfloat16)`` gives.
    """
    if dtype in (torch.float16, torch.float32):
        return True
    return dtype == torch.bfloat16 and bf16_nan() is not None


# float32 bit patterns torch's float32 -> bfloat16 cast is checked on: NaNs of both signs (quiet, signalling,
# payloads), zeros, infinities, the largest finite values (which round up to inf), ties to even and odd
# both ways, and subnormals; repeated so they sit both in vector lanes and in a tail.
_BF16_PROBE = np.array(
    [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFA5A5A5, 0x7FC0ABCD]
    + [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000]
    + [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F808001, 0x3F807FFF, 0x3F800000, 0x47800000]
    + [0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x807FFFFF, 0x80008001, 0x00800000, 0x3DCCCCCD],
    np.uint32,
)


@functools.cache
def bf16_nan() -> int | None:
    """The bfloat16 bits torch writes for a float32 NaN, or None where the kernels cannot match torch.

    torch's rounding of non-NaN values is round-to-nearest-even on the float32
    bits everywhere, but its NaN differs by build and CPU (0xFFFF from the
    AVX2/AVX-512 loops, 0x7FC0 from the scalar one), so it is read off torch
    here, once, and the kernels' conversion (cpu_kernels.to_bf16) is checked
    against torch's on the probe values: on any difference bf16 outputs keep
    the decode-then-cast path.
    """
    values = np.tile(_BF16_PROBE, 7).view(np.float32)  # 224 values: whole vectors and a ragged tail
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    for n in (1, 3, 17):  # short arrays take torch's tail code alone
        head = (
            torch.from_numpy(values[:n].copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        )
        if not np.array_equal(head, expected[:n]):
            return None
    nans = np.unique(expected[np.isnan(values)])
    if nans.size != 1:
        return None
    nan = int(nans[0])
    got = np.empty_like(expected)
    cpu_kernels.to_bf16(values, got, nan)
    return nan if np.array_equal(got, expected) else None


def decode_into_layer(
    opened: list[tuple[FrameHeader, bytes | memoryview]],
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    starts: list[int],
) -> None:
    """Quantized frames (already opened) straight into their token slices of a layer's tensors, in one call.

    ``k_out``/``v_out``: contiguous CPU ``[heads, T, head_dim]`` of a dtype
    :func:`writes_into` accepts; frame ``i``'s tokens land at ``starts[i]``. The frames
    share heads, head_dim and rotation seed (not tokens: a layer's last chunk
    is often short), and the caller has checked that each fits. Why: decoding
    a part into its own tensor and copying it into place cost ~11% of a
    two-thread balanced decode; this writes every value once, where it belongs.
    A malformed body raises ``CorruptFrame`` having written nothing from itself
    or the frames after it (frames before it are in place).
    """
    header = opened[0][0]
    h, _, d = header.shape
    n = len(opened)
    tokens = np.fromiter((hd.tokens for hd, _ in opened), np.int64, n)
    at = np.asarray(starts[:n], np.int64)
    bodies, offsets, flags = _bodies(opened)
    if not writes_into(k_out.dtype):
        raise ValueError(f"the kernels do not write {k_out.dtype} outputs here (see writes_into)")
    half = k_out.dtype != torch.float32  # fp16 or bf16 bits, rounded from float32 scratch
    # not None for bfloat16: writes_into checked it
    nan = cast(int, bf16_nan()) if k_out.dtype == torch.bfloat16 else cpu_kernels.FP16
    if half:  # float32 is per-frame scratch: this thread's, reused (fresh pages cost more than the decode)
        rows = int(tokens.max())
        k = cpu_kernels.scratch((h, rows, d), "decode-k")
        v = cpu_kernels.scratch((h, rows, d), "decode-v")
        hk, hv = (
            k_out.view(torch.int16).numpy().view(np.uint16),
            v_out.view(torch.int16).numpy().view(np.uint16),
        )
    else:
        k, v, hk, hv = k_out.numpy(), v_out.numpy(), _NO_HALF, _NO_HALF
    signs, scale = fwht_params(d, header.seed)
    err = np.zeros(2, np.int64)
    bad = cpu_kernels.decode_frames_into(
        bodies, offsets, tokens, at, h, d, flags, signs, scale, _TABLE, k, v, half, hk, hv, nan, err
    )
    if bad >= 0:
        raise CorruptFrame(_message(int(err[0]), int(err[1]), bodies[offsets[bad] : offsets[bad + 1]]))


def _bodies(
    opened: list[tuple[FrameHeader, bytes | memoryview]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw bodies back to back (one array for one kernel call), their offsets and each frame's flags."""
    n = len(opened)
    sizes = np.fromiter((len(raw) for _, raw in opened), np.int64, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    bodies = np.empty(int(offsets[-1]), np.uint8)
    for i, (_, raw) in enumerate(opened):
        bodies[offsets[i] : offsets[i + 1]] = np.frombuffer(raw, np.uint8)
    return bodies, offsets, np.fromiter((hd.flags for hd, _ in opened), np.int64, n)
