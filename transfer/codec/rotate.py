"""Orthogonal rotation along head_dim: a normalized Hadamard matrix with seeded signs.

Rotating a vector by ``R = diag(s) H / sqrt(d)`` spreads an outlier channel over
every channel, so a per-token scale no longer has to cover one huge coordinate,
and the rotated coordinates are close to Gaussian, which a uniform quantizer
followed by an entropy coder handles well. ``R`` is orthogonal, so the decoder
undoes it with ``R^T`` and quantization error keeps its norm. The signs come
from a seed written in the frame, so any decoder rebuilds the same ``R``.

Same bytes on every device: the matrix entries are +-1, products of float32
inputs with +-1 are exact, and their sums are taken in float64 (exact for any
realistic spread of magnitudes), so CPU and CUDA agree on the rotated values
regardless of how their matmul kernels order the additions. The 1/sqrt(d)
normalization is one correctly rounded multiply afterwards.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


def can_rotate(dim: int) -> bool:
    """Only power-of-two head dims have a Sylvester Hadamard matrix; others are stored unrotated."""
    return dim > 0 and dim & (dim - 1) == 0


@functools.lru_cache(maxsize=32)
def _signs(dim: int, seed: int) -> torch.Tensor:
    if not can_rotate(dim):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {dim}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1


@functools.lru_cache(maxsize=32)
def _signed_hadamard(dim: int, seed: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return _signs(dim, seed)[:, None] * h  # entries are exactly +-1


@functools.lru_cache(maxsize=64)
def _scaled(dim: int, seed: int, device: torch.device, transpose: bool) -> tuple[torch.Tensor, float]:
    """The matrix to multiply by and the factor still to apply afterwards.

    When ``1/sqrt(dim)`` is a power of two (dim = 4, 16, 64, 256...), it is
    folded into the +-1 entries: scaling every product by a power of two
    scales every partial sum exactly, so ``x @ (c*R)`` is bit-identical to
    ``(x @ R) * c`` and saves a pass over the output.
    """
    m = _signed_hadamard(dim, seed)
    m = m.T if transpose else m
    scale = 1.0 / math.sqrt(dim)
    if math.frexp(scale)[0] == 0.5:
        return (m * scale).contiguous().to(device), 1.0
    return m.contiguous().to(device), scale


def _apply(x: torch.Tensor, seed: int, transpose: bool) -> torch.Tensor:
    dim = x.shape[-1]
    m, scale = _scaled(dim, seed, x.device, transpose)
    y = x.to(torch.float64) @ m  # any float input: the float64 copy is exact
    if scale != 1.0:
        y.mul_(scale)
    return y.to(torch.float32)


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x @ R`` along the last dim, as float32 (``x`` may be any float dtype)."""
    return _apply(x, seed, False)


def unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """``y @ R^T`` along the last dim, as float32: the inverse of :func:`rotate`."""
    return _apply(y, seed, True)


@functools.lru_cache(maxsize=64)
def fwht_params(dim: int, seed: int) -> tuple[np.ndarray, float]:
    """The CPU kernels' view of the rotation: +-1 signs as a float64 numpy array and 1/sqrt(dim).

    Empty signs when ``dim`` is not a power of two (such frames are never rotated).
    """
    if not can_rotate(dim):
        return torch.empty(0, dtype=torch.float64).numpy(), 1.0
    return _signs(dim, seed).numpy(), 1.0 / math.sqrt(dim)
