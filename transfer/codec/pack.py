"""Bit-packing of small unsigned codes into bytes, in torch so it runs on any device.

Codes of ``bits`` bits (1..8) are packed eight at a time into ``bits`` bytes,
little-endian within each group: code ``i`` of a group occupies bits
``[bits*i, bits*(i+1))`` of a 64-bit word whose low ``bits`` bytes are written.
One rule for every width keeps the format simple (3-bit codes need no special
case) and the layout identical on CPU and CUDA.

Speed: widths that divide 8 (1, 2, 4) never cross a byte, so they are packed
with a few uint8 shifts and ORs; the others (3, 5, 6, 7) build each group's word
in the narrowest integer type that holds it (int32 for 3 bits) and take its
low bytes through a byte view of the words (every torch device is little-endian).
"""

from __future__ import annotations

import functools
import sys

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"


@functools.lru_cache(maxsize=64)
def _shifts(bits: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[0, bits, 2*bits, ...]`` (n entries), one copy per (dtype, device)."""
    return (torch.arange(n, dtype=torch.int64) * bits).to(dtype=dtype, device=device)


def _word_dtype(bits: int) -> tuple[torch.dtype, int]:
    return (torch.int32, 4) if bits * 8 <= 32 else (torch.int64, 8)


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits (padded to a group of eight; 8-bit codes are bytes)."""
    if bits == 8:
        return count
    return (count + 7) // 8 * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat integer tensor of codes in ``[0, 2**bits)`` into a uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if 8 % bits == 0:  # whole codes per byte
        per = 8 // bits
        g = flat.to(torch.uint8).view(-1, per)
        out = g[:, 0].clone()
        for i in range(1, per):
            out |= g[:, i] << (bits * i)
        return out
    wdtype, wbytes = _word_dtype(bits)
    words = (flat.to(wdtype).view(-1, 8) << _shifts(bits, 8, wdtype, flat.device)).sum(dim=1, dtype=wdtype)
    if _LITTLE_ENDIAN:
        return words.view(torch.uint8).view(-1, wbytes)[:, :bits].reshape(-1)
    out = (words.unsqueeze(1) >> _shifts(8, bits, wdtype, flat.device)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(data: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes (as many bytes as packed_size), as ``dtype``.

    Decoders ask for uint8 so no int64 temporary is made; the default keeps the
    int64 result of the original API.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return data[:count].to(dtype)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        codes = (data.unsqueeze(1) >> _shifts(bits, per, torch.uint8, data.device)) & mask
        return codes.reshape(-1)[:count].to(dtype)
    wdtype, wbytes = _word_dtype(bits)
    groups = data.view(-1, bits)
    if _LITTLE_ENDIAN:
        buf = torch.zeros((groups.shape[0], wbytes), dtype=torch.uint8, device=data.device)
        buf[:, :bits] = groups
        words = buf.view(wdtype).reshape(-1)
    else:
        words = (groups.to(wdtype) << _shifts(8, bits, wdtype, data.device)).sum(dim=1, dtype=wdtype)
    codes = (words.unsqueeze(1) >> _shifts(bits, 8, wdtype, data.device)) & mask
    return codes.reshape(-1)[:count].to(dtype)
