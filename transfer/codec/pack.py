"""Bit-packing of small unsigned codes into bytes, in torch so it runs on any device.

Codes of ``bits`` bits (1..8) are packed eight at a time into ``bits`` bytes,
little-endian within each group: code ``i`` of a group occupies bits
``[bits*i, bits*(i+1))`` of a 64-bit word whose low ``bits`` bytes are written.
One rule for every width keeps the format simple (3-bit codes need no special
case) and the layout identical on CPU and CUDA.

Speed: a group of eight uint8 codes *is* a little-endian 64-bit word with code
``i`` at bit ``8*i``, so packing is three SWAR steps on that word (merge pairs,
then quads, then the two halves, each one shift, OR and mask) and unpacking
the same steps backwards: nine int64 ops on one word per eight codes instead
of shifts and sums over every code. Every torch device (x86, ARM, CUDA) is
little-endian; a big-endian host falls back to the plain shift-and-sum form.
"""

from __future__ import annotations

import functools
import sys

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"
_SHIFTS = torch.arange(8, dtype=torch.int64)


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits (padded to a group of eight; 8-bit codes are bytes)."""
    if bits == 8:
        return count
    return (count + 7) // 8 * bits


@functools.lru_cache(maxsize=8)
def _levels(bits: int) -> tuple[tuple[int, int, int], ...]:
    """(half, width, mask) per merge level: lanes of 16, 32, 64 bits whose two halves (``half`` bits
    apart) each hold ``width`` bits of codes; ``mask`` selects the low ``width`` bits of every lane."""
    out = []
    for lane, codes in ((16, 1), (32, 2), (64, 4)):
        width = bits * codes
        out.append((lane // 2, width, sum(((1 << width) - 1) << off for off in range(0, 64, lane))))
    return tuple(out)


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
    if not _LITTLE_ENDIAN:
        return _pack_reference(flat, bits)
    flat = flat.to(torch.uint8)
    if flat.storage_offset() % 8:
        flat = flat.clone()
    words = flat.view(torch.int64)  # code i of a group at bit 8*i; codes < 128, so words are >= 0
    for half, width, mask in _levels(bits):  # the high half moves down to sit right above the low half
        if half >= 2 * width:  # the shifted copy of the low half falls below bit 0: one mask suffices
            words = (words | (words >> (half - width))) & (mask | (mask << width))
        else:
            words = (words & mask) | ((words >> (half - width)) & (mask << width))
    if 8 % bits == 0:  # 1, 2 or 4 bytes per word: one strided copy of a wider type
        wide = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[bits]
        low = words.view(wide).view(-1, 8 // bits)[:, 0]
        return torch.empty(low.shape, dtype=wide, device=low.device).copy_(low).view(torch.uint8)
    return words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)


def unpack_bits(data: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes (as many bytes as packed_size), as ``dtype``.

    Decoders ask for uint8 so no int64 temporary per code is made; the default
    keeps the int64 result of the original API.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return data[:count].to(dtype)
    groups = data.view(-1, bits)
    if not _LITTLE_ENDIAN:
        return _unpack_reference(groups, bits)[:count].to(dtype)
    buf = torch.zeros((groups.shape[0], 8), dtype=torch.uint8, device=data.device)
    buf[:, :bits] = groups
    words = buf.view(torch.int64).reshape(-1)  # bits*8 <= 56 bits used: never negative
    for half, width, mask in reversed(_levels(bits)):  # and back up, last merge first
        if half >= 2 * width:  # the shifted copy of the low half lands outside both masks
            words = (words | (words << (half - width))) & (mask | (mask << half))
        else:
            words = (words & mask) | ((words << (half - width)) & (mask << half))
    return words.view(torch.uint8)[:count].to(dtype)


def _pack_reference(flat: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = _SHIFTS.to(flat.device)
    words = (flat.to(torch.int64).view(-1, 8) << (shifts * bits)).sum(dim=1)
    out = (words.unsqueeze(1) >> (shifts[:bits] * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def _unpack_reference(groups: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = _SHIFTS.to(groups.device)
    words = (groups.to(torch.int64) << (shifts[:bits] * 8)).sum(dim=1)
    return ((words.unsqueeze(1) >> (shifts * bits)) & ((1 << bits) - 1)).reshape(-1)
