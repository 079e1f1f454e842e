"""glibc malloc settings for processes that move multi-MiB blobs.

Every blob passes through a few short-lived buffers of its own size (a gRPC
message, a Redis command, a decoded frame). With glibc's defaults each buffer
over 128 KiB is a fresh ``mmap``: every byte then also costs a page fault and a
page clear, which measured on the 2-core VM as much as the copy itself (server
CPU per GB served by Get 3.1 s -> 1.0 s; redis-py SET of 1 MiB values 0.7 ->
0.3 s per GB on the client). Raising the mmap and trim thresholds lets freed
buffers be reused instead.

A RAM tier that grows pays a page fault and a page clear for every byte it
stores (~0.35 s per GB here, as much as the rest of a Put's server CPU).
:func:`prefault_heap` pays that once at start-up for the tier's whole budget
(``memory.prefault``): the heap keeps the pages, and blobs reuse them.

Two ways in: :func:`tune_allocator` changes the running process (``kvstore
serve`` and the benches call it), and :data:`ALLOCATOR_ENV` does the same for a
process not yet started (glibc reads it at start-up): the Ray workers get it
through their runtime environment, the images through ``ENV``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024

#: The same settings as environment variables (glibc's ``mallopt`` tunables).
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}


def _mallopt() -> Any:
    """glibc's ``mallopt``, or None where there is none (not Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Apply the settings to this process; False where they do not apply (not glibc/Linux).

    Process-wide, so only entrypoints call it, never library code.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD))
    ok &= bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
    ok &= bool(mallopt(m_top_pad, TOP_PAD))
    return ok


def release_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the OS (glibc ``malloc_trim(0)``).

    With :func:`tune_allocator`'s thresholds, freed multi-MiB buffers stay in the
    heap for reuse, which is the point for steady traffic. After a spike they stay
    too: 100 Get streams whose readers stalled held ~8 MiB each (the message in
    flight, serialised, and gRPC's copy of it) and the server's RSS stayed 800 MiB
    up after they had left (bench/slow_readers_memory.py). The server calls this a
    moment after such streams end; it costs a walk of the free lists and the page
    faults of the next allocations that reuse the range. False where it does not
    apply (not glibc/Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


_PREFAULT_STEP = 16 * 1024 * 1024  # under MMAP_THRESHOLD, so the steps come from (and return to) the heap


def prefault_heap(nbytes: int) -> int:
    """Fault ``nbytes`` of heap in now and keep it mapped for later allocations; returns bytes done.

    Needs :func:`tune_allocator` first (else the steps are separate mmaps and go
    straight back). Also limits malloc to one arena: otherwise each thread that
    allocates a blob may use an arena of its own, which the prefaulted main heap
    does not help. Call it before threads start; 0 where it does not apply.
    """
    mallopt = _mallopt()
    if nbytes <= 0 or mallopt is None:
        return 0
    m_trim_threshold, m_arena_max = -1, -8
    # mallopt takes an int: a budget over 2 GiB cannot be a threshold, so trimming is switched off
    # (-1, as mallopt(3) documents): the pages are what the RAM tier is for, they stay.
    if not (mallopt(m_arena_max, 1) and mallopt(m_trim_threshold, -1)):
        return 0
    steps = [bytearray(_PREFAULT_STEP) for _ in range(-(-nbytes // _PREFAULT_STEP))]  # zero-filled: touched
    done = len(steps) * _PREFAULT_STEP
    del steps  # freed into one free chunk at the top of the heap, below the trim threshold: kept
    return done
