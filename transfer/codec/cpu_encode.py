"""Encoding quantized frame bodies on CPU with fused kernels, byte for byte what the torch encoder writes.

Why: the torch encoder (frame._encode_quantized) runs ~200 small torch ops per
call; at 256-token frames that overhead is most of the time. Here Python only
lays out the body (every offset follows from the shapes and the tier table)
and each tier of each tensor is one kernel that quantizes, packs and writes
its bytes in place (ranges, fp16 channel maxima and scale bytes included), so
no torch op runs between the cast to float32 and the sealed bytes. Profiles that center a tensor (none of the
defaults) or clip scales keep the torch encoder.
"""

from __future__ import annotations

import numpy as np
import torch

from transfer.codec import cpu_kernels
from transfer.codec.pack import packed_size
from transfer.codec.profiles import TOKEN, Profile
from transfer.codec.quantize import _SCALE_TABLE
from transfer.codec.rotate import fwht_params

_TABLE = _SCALE_TABLE.numpy()


def handles(prof: Profile, x: torch.Tensor) -> bool:
    """Whether this encoder covers the profile and input (else the torch encoder runs)."""
    return (
        x.device.type == "cpu"
        and cpu_kernels.enabled()
        and not prof.center_k
        and not prof.center_v
        and prof.clip == 1.0
    )


def _tier_size(scheme: int, bits: int, h: int, n: int, d: int, group: int) -> int:
    if scheme == TOKEN:
        return 1 + h * n + packed_size(h * n * d, bits)
    groups = (n + group - 1) // group
    return 2 * h * d + 2 * h * groups * d + packed_size(h * n * d, bits)


def encode_body(
    k: torch.Tensor,
    v: torch.Tensor,
    prof: Profile,
    head: torch.Tensor,
    order: list[torch.Tensor],
    rotate: tuple[bool, bool],
    layers: int,
    seed: int,
) -> np.ndarray:
    """Body rows [layers, bytes] for K and V stacked as [layers*heads, tokens, dim]."""
    rows, t, d = k.shape
    h = rows // layers
    table = [(tier.k_scheme, tier.k_bits, tier.v_scheme, tier.v_bits) for tier in prof.tiers]
    idx = [i.numpy() for i in order]
    head_np = head.numpy()
    total = head_np.size + sum(
        _tier_size(row[col], row[col + 1], h, i.size, d, prof.group)
        for col in (0, 2)
        for row, i in zip(table, idx, strict=True)
        if i.size
    )
    body = np.empty((layers, total), np.uint8)
    body[:, : head_np.size] = head_np
    off = head_np.size
    for slot, (x, col, rot) in enumerate(((k, 0, rotate[0]), (v, 2, rotate[1]))):
        xs = _as_float32(x, slot)
        if rot and xs.size:
            flat = xs.reshape(-1, d)
            signs, scale = fwht_params(d, seed)
            cpu_kernels.hadamard_rows(flat, signs, scale, True, flat)  # in place
        for row, i in zip(table, idx, strict=True):
            if not i.size:
                continue
            scheme, bits = row[col], row[col + 1]
            if scheme == TOKEN:
                cpu_kernels.token_encode(xs, xs.view(np.uint32), h, i, bits, _TABLE, body, off)
            else:
                cpu_kernels.channel_tier_encode(xs, xs.view(np.int32), h, i, bits, prof.group, body, off)
            off += _tier_size(scheme, bits, h, i.size, d, prof.group)
    return body


def _as_float32(x: torch.Tensor, slot: int) -> np.ndarray:
    """``x`` widened to float32 in this thread's scratch buffer ``slot`` (the rotation works in place on it).

    fp16 is widened by a kernel (``fpext``); torch's cast into a fresh array
    measured ~3 ns per element here, mostly page faults (see cpu_kernels.scratch).
    """
    out = cpu_kernels.scratch(tuple(x.shape), f"encode-{slot}")
    if x.dtype == torch.float16:
        cpu_kernels.from_half(
            x.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1), out.reshape(-1)
        )
    else:
        np.copyto(out, x.contiguous().to(torch.float32).numpy())
    return out
