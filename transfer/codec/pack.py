"""Bit-packing of small unsigned codes into bytes, in torch so it runs on any device.

Codes of ``bits`` bits (1..8) are packed eight at a time into ``bits`` bytes,
little-endian within each group: code ``i`` of a group occupies bits
``[bits*i, bits*(i+1))`` of a 64-bit word whose low ``bits`` bytes are written.
One rule for every width keeps the format simple (3-bit codes need no special
case) and the layout identical on CPU and CUDA.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.int64)


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
    shifts = _SHIFTS.to(flat.device)
    words = (flat.to(torch.int64).view(-1, 8) << (shifts * bits)).sum(dim=1)
    out = (words.unsqueeze(1) >> (shifts[:bits] * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes as int64 (as many bytes as packed_size)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return data[:count].to(torch.int64)
    shifts = _SHIFTS.to(data.device)
    groups = data.to(torch.int64).view(-1, bits)
    words = (groups << (shifts[:bits] * 8)).sum(dim=1)
    codes = (words.unsqueeze(1) >> (shifts * bits)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]
