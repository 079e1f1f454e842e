"""glibc malloc settings for processes that move multi-MiB blobs.

Every blob passes through a few short-lived buffers of its own size (a gRPC
message, a Redis command, a decoded frame). With glibc's defaults each buffer
over 128 KiB is a fresh ``mmap``: every byte then also costs a page fault and a
page clear, which measured on the 2-core VM as much as the copy itself (server
CPU per GB served by Get 3.1 s -> 1.0 s; redis-py SET of 1 MiB values 0.7 ->
0.3 s per GB on the client). Raising the mmap and trim thresholds lets freed
buffers be reused instead.

Two ways in: :func:`tune_allocator` changes the running process (``kvstore
serve`` and the benches call it), and :data:`ALLOCATOR_ENV` does the same for a
process not yet started (glibc reads it at start-up): the Ray workers get it
through their runtime environment, the images through ``ENV``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024

#: The same settings as environment variables (glibc's ``mallopt`` tunables).
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}


def tune_allocator() -> bool:
    """Apply the settings to this process; False where they do not apply (not glibc/Linux).

    Process-wide, so only entrypoints call it, never library code.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD))
    ok &= bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
    ok &= bool(mallopt(m_top_pad, TOP_PAD))
    return ok
