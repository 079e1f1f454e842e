"""Per-token symmetric quantization with a per-token bit width and 8-bit log scales.

Each (head, token) row of ``head_dim`` values gets one scale; each token gets its
own bit width (the precision map), so sinks, recent and salient tokens can keep
8 bits while the bulk keeps 3 or 4, in one vectorized pass. The quantizer is
mid-rise: ``2**b`` levels at ``(q + 1/2) * s`` for ``q`` in ``[-2**(b-1), 2**(b-1))``,
so the range is symmetric and no level is wasted. Rows are expected roughly
zero-mean and Gaussian (centered and Hadamard-rotated upstream).

Scales are stored as one byte: ``s = 2**(base + u/16)`` with ``u`` in 0..255
and ``base`` one integer exponent per tensor and frame, so 255 steps of 4.4%
cover 16 octaves above the smallest scale in the frame. The byte is found by
``searchsorted`` in a constant table rather than by ``log2``, and the frame base
by ``frexp``; both are exact, so CPU and CUDA pick the same bytes.
"""

from __future__ import annotations

import functools

import torch

SCALE_STEPS_PER_OCTAVE = 16
_SCALE_TABLE = torch.pow(2.0, torch.arange(256, dtype=torch.float64) / SCALE_STEPS_PER_OCTAVE).to(
    torch.float32
)
_MIN_BASE, _MAX_BASE = -100, 100  # 2**base stays a normal float32


@functools.lru_cache(maxsize=16)
def _table(device: torch.device) -> torch.Tensor:  # one copy per device
    return _SCALE_TABLE.to(device)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0**exponent`` (float32) for integer exponents in [-126, 127], built from the bits."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def scale_bases(scales: torch.Tensor, layers: int = 1) -> torch.Tensor:
    """Per layer (rows are layer-major), the floor of log2 of the smallest positive needed scale."""
    flat = scales.reshape(layers, -1).to(torch.float32)
    if flat.shape[1] == 0:
        return torch.full((layers,), _MIN_BASE, dtype=torch.int64, device=scales.device)
    low = torch.where(flat > 0, flat, torch.full_like(flat, float("inf"))).amin(dim=1)
    finite = torch.isfinite(low)
    _, exponent = torch.frexp(torch.where(finite, low, torch.ones_like(low)))
    base = (exponent.to(torch.int64) - 1).clamp(_MIN_BASE, _MAX_BASE)
    # all-zero layers: the tiniest scale, so they decode to ~0
    return torch.where(finite, base, torch.full_like(base, _MIN_BASE))


def _row_factor(base: torch.Tensor | int, rows: int, device: torch.device) -> torch.Tensor:
    b = torch.as_tensor(base, dtype=torch.int64, device=device).reshape(-1)
    return pow2(b).repeat_interleave(rows // b.numel()).view(rows, 1)


def encode_scales(scales: torch.Tensor, base: torch.Tensor | int) -> torch.Tensor:
    """Smallest table entry >= each needed scale [rows, n] (so nothing clips), as uint8."""
    rows = scales.shape[0]
    neg = -torch.as_tensor(base, dtype=torch.int64, device=scales.device)
    ratio = scales.to(torch.float32).reshape(rows, -1) * _row_factor(neg, rows, scales.device)
    u = torch.searchsorted(_table(scales.device), ratio.contiguous().reshape(-1)).clamp_(0, 255)
    return u.to(torch.uint8).reshape(scales.shape)


def decode_scales(u: torch.Tensor, base: torch.Tensor | int) -> torch.Tensor:
    rows = u.shape[0]
    return (
        _table(u.device)[u.to(torch.int64)].reshape(rows, -1) * _row_factor(base, rows, u.device)
    ).reshape(u.shape)


def _half(bits: torch.Tensor | int) -> torch.Tensor | float:
    """``2**(bits-1)`` per token [1, tokens, 1], or one float when every token has the same width.

    A scalar is the same float32 value (a power of two) but lets clamp and add
    skip broadcasting a tensor, which is several times faster.
    """
    if isinstance(bits, int):
        return float(2 ** (bits - 1))
    return torch.pow(2.0, bits.to(torch.float32) - 1).view(1, -1, 1)


def quantize(
    x: torch.Tensor, bits: torch.Tensor | int, clip: float = 1.0, layers: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [rows, tokens, dim] with ``bits`` [tokens] per token (or one int for all).

    Rows are heads, or ``layers`` stacks of heads (layer-major) when several
    frames are encoded at once; each layer gets its own base, so the bytes do
    not depend on the batching. Returns unsigned codes (uint8, in
    ``[0, 2**bits)``), the uint8 scale codes [rows, tokens] and the base
    exponents [layers]. ``clip`` < 1 trades clipping of the largest value in a
    row for a finer step everywhere else.
    """
    half = _half(bits)
    amax = x.abs().amax(dim=-1, keepdim=True)
    needed = (amax * clip if clip != 1.0 else amax) / half  # x * 1.0 == x exactly
    base = scale_bases(needed, layers)
    u = encode_scales(needed.squeeze(-1), base)
    s = decode_scales(u, base).unsqueeze(-1)
    # torch's clamp_ takes both bounds as tensors or both as numbers: they are both of half's kind here.
    q = torch.div(x, s).floor_().clamp_(-half, half - 1).add_(half)  # type: ignore[arg-type]
    return q.to(torch.uint8), u, base


def dequantize(
    codes: torch.Tensor, u: torch.Tensor, base: torch.Tensor | int, bits: torch.Tensor | int
) -> torch.Tensor:
    """Inverse of :func:`quantize` up to quantization error, as float32."""
    half = _half(bits)
    s = decode_scales(u, base).unsqueeze(-1)
    return codes.to(torch.float32).sub_(half).add_(0.5).mul_(s)


def quantize_channels(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, ...]:
    """KIVI-style keys: asymmetric per-channel quantization over groups of ``group`` tokens.

    Post-RoPE keys have channels whose values sit far from zero but move slowly
    from token to token; a range per (channel, group of nearby tokens) is much
    tighter than a range per token. To keep the range cheap (two bytes per group
    instead of two fp16), each channel's low and high ends are stored as int8
    fractions of that channel's absolute maximum in the frame (one fp16 per
    channel), rounded outwards so nothing clips.

    ``x`` is [heads, tokens, dim]; the last group may be shorter. Returns codes
    (uint8 [heads, tokens, dim]), the channel maxima (fp16 [heads, dim]) and the
    int8 lows and highs ([heads, groups, dim] each).
    """
    h, t, d = x.shape
    groups = (t + group - 1) // group
    xg, gmin, gmax, cmax = channel_ranges(x, group)
    unit = (cmax.to(torch.float32) / 127).clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(1)
    lo_q = torch.floor(gmin / unit).clamp_(-127, 127)
    hi_q = torch.ceil(gmax / unit).clamp_(-127, 127)
    codes = _channel_codes(xg, lo_q, hi_q, unit, bits)
    return (codes.reshape(h, groups * group, d)[:, :t], cmax, lo_q.to(torch.int8), hi_q.to(torch.int8))


def channel_ranges(x: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """``x`` padded and grouped [h, groups, group, d], its group lows and highs, and the fp16 channel maxima.

    The last group is padded with copies of the last token, which changes no
    low or high. (cpu_kernels.channel_tier_encode computes the same on CPU.)
    """
    h, t, d = x.shape
    groups = (t + group - 1) // group
    pad = groups * group - t
    xp = torch.cat([x, x[:, -1:].expand(h, pad, d)], 1) if pad else x
    xg = xp.view(h, groups, group, d)
    gmin, gmax = xg.amin(dim=2), xg.amax(dim=2)  # (torch.aminmax is ~3x slower on CPU)
    # |x| max per channel from the group ends
    cmax = torch.maximum(gmax.amax(dim=1), gmin.amin(dim=1).neg_()).abs_().to(torch.float16)  # [h, d]
    return xg, gmin, gmax, cmax


def _channel_grid(
    lo_q: torch.Tensor, hi_q: torch.Tensor, unit: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    levels = 2**bits - 1
    lo = (lo_q * unit).unsqueeze(2)
    step = ((hi_q - lo_q) * unit / levels).clamp_min(1e-30).unsqueeze(2)
    return lo, step, levels


def _channel_codes(
    xg: torch.Tensor, lo_q: torch.Tensor, hi_q: torch.Tensor, unit: torch.Tensor, bits: int
) -> torch.Tensor:
    lo, step, levels = _channel_grid(lo_q, hi_q, unit, bits)
    return torch.sub(xg, lo).div_(step).round_().clamp_(0, levels).to(torch.uint8)


def dequantize_channels(
    codes: torch.Tensor, cmax: torch.Tensor, lo_q: torch.Tensor, hi_q: torch.Tensor, bits: int, group: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_channels` up to quantization error, as float32."""
    h, t, d = codes.shape
    groups = lo_q.shape[1]
    pad = groups * group - t
    cp = torch.cat([codes, codes.new_zeros(h, pad, d)], 1) if pad else codes
    unit = (cmax.to(torch.float32) / 127).clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(1)
    lo, step, _ = _channel_grid(lo_q.to(torch.float32), hi_q.to(torch.float32), unit, bits)
    x = cp.view(h, groups, group, d).to(torch.float32).mul_(step).add_(lo)
    return x.reshape(h, groups * group, d)[:, :t]
