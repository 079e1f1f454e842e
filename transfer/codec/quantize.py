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
_SCALE_TABLE = torch.pow(2.0, torch.arange(256, dtype=torch.float64) / SCALE_STEPS_PER_OCTAVE).to(torch.float32)
_MIN_BASE, _MAX_BASE = -100, 100  # 2**base stays a normal float32


@functools.lru_cache(maxsize=16)
def _table(device: torch.device) -> torch.Tensor:  # one copy per device
    return _SCALE_TABLE.to(device)


def scale_base(scales: torch.Tensor) -> int:
    """The frame's base exponent: the floor of log2 of the smallest positive needed scale."""
    positive = scales[scales > 0]
    if positive.numel() == 0:  # all-zero rows: the tiniest scale, so they decode to ~0
        return _MIN_BASE
    _, exponent = torch.frexp(positive.min())
    return int(min(max(int(exponent.item()) - 1, _MIN_BASE), _MAX_BASE))


def encode_scales(scales: torch.Tensor, base: int) -> torch.Tensor:
    """Smallest table entry >= each needed scale (so nothing clips), as uint8."""
    ratio = scales.to(torch.float32) * (2.0 ** -base)
    u = torch.searchsorted(_table(scales.device), ratio.contiguous().reshape(-1)).clamp_(0, 255)
    return u.to(torch.uint8).reshape(scales.shape)


def decode_scales(u: torch.Tensor, base: int) -> torch.Tensor:
    return _table(u.device)[u.to(torch.int64)] * (2.0 ** base)


def quantize(x: torch.Tensor, bits: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Quantize ``x`` [heads, tokens, dim] with ``bits`` [tokens] per token.

    Returns unsigned codes (int64, in ``[0, 2**bits)``), the uint8 scale codes
    [heads, tokens] and the frame's scale base exponent. ``clip`` < 1 trades
    clipping of the largest value in a row for a finer step everywhere else.
    """
    half = torch.pow(2.0, bits.to(torch.float32) - 1).view(1, -1, 1)
    amax = x.abs().amax(dim=-1, keepdim=True)
    needed = amax * clip / half
    base = scale_base(needed)
    u = encode_scales(needed.squeeze(-1), base)
    s = decode_scales(u, base).unsqueeze(-1)
    q = torch.floor(x / s).clamp_(-half, half - 1) + half
    return q.to(torch.int64), u, base


def dequantize(codes: torch.Tensor, u: torch.Tensor, base: int, bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize` up to quantization error, as float32."""
    half = torch.pow(2.0, bits.to(torch.float32) - 1).view(1, -1, 1)
    s = decode_scales(u, base).unsqueeze(-1)
    return (codes.to(torch.float32) - half + 0.5) * s


def quantize_channels(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, ...]:
    """KIVI-style keys: asymmetric per-channel quantization over groups of ``group`` tokens.

    Post-RoPE keys have channels whose values sit far from zero but move slowly
    from token to token; a range per (channel, group of nearby tokens) is much
    tighter than a range per token. To keep the range cheap (two bytes per group
    instead of two fp16), each channel's low and high ends are stored as int8
    fractions of that channel's absolute maximum in the frame (one fp16 per
    channel), rounded outwards so nothing clips.

    ``x`` is [heads, tokens, dim]; the last group may be shorter. Returns codes
    (int64 [heads, tokens, dim]), the channel maxima (fp16 [heads, dim]) and the
    int8 lows and highs ([heads, groups, dim] each).
    """
    h, t, d = x.shape
    groups = (t + group - 1) // group
    pad = groups * group - t
    xp = torch.cat([x, x[:, -1:].expand(h, pad, d)], 1) if pad else x
    xg = xp.view(h, groups, group, d)
    cmax = x.abs().amax(dim=1).to(torch.float16)  # [h, d]
    unit = (cmax.to(torch.float32) / 127).clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(1)
    lo_q = torch.floor(xg.amin(dim=2) / unit).clamp_(-127, 127)
    hi_q = torch.ceil(xg.amax(dim=2) / unit).clamp_(-127, 127)
    codes = _channel_codes(xg, lo_q, hi_q, unit, bits)
    return (codes.reshape(h, groups * group, d)[:, :t], cmax, lo_q.to(torch.int8), hi_q.to(torch.int8))


def _channel_grid(lo_q, hi_q, unit, bits):
    levels = 2**bits - 1
    lo = (lo_q * unit).unsqueeze(2)
    step = ((hi_q - lo_q) * unit / levels).clamp_min(1e-30).unsqueeze(2)
    return lo, step, levels


def _channel_codes(xg, lo_q, hi_q, unit, bits):
    lo, step, levels = _channel_grid(lo_q, hi_q, unit, bits)
    return torch.round((xg - lo) / step).clamp_(0, levels).to(torch.int64)


def dequantize_channels(codes: torch.Tensor, cmax: torch.Tensor, lo_q: torch.Tensor, hi_q: torch.Tensor,
                        bits: int, group: int) -> torch.Tensor:
    """Inverse of :func:`quantize_channels` up to quantization error, as float32."""
    h, t, d = codes.shape
    groups = lo_q.shape[1]
    pad = groups * group - t
    cp = torch.cat([codes, codes.new_zeros(h, pad, d)], 1) if pad else codes
    unit = (cmax.to(torch.float32) / 127).clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(1)
    lo, step, _ = _channel_grid(lo_q.to(torch.float32), hi_q.to(torch.float32), unit, bits)
    x = cp.view(h, groups, group, d).to(torch.float32) * step + lo
    return x.reshape(h, groups * group, d)[:, :t]
