"""Old name of :mod:`kvstore.malloc_tuning` (glibc malloc settings), kept for its importers.

``workers/pipeline.py`` and the benches import it by this name; new code imports
:mod:`kvstore.malloc_tuning`.
"""

from __future__ import annotations

from kvstore.malloc_tuning import (
    ALLOCATOR_ENV,
    MMAP_THRESHOLD,
    TOP_PAD,
    TRIM_THRESHOLD,
    prefault_heap,
    release_free_memory,
    tune_allocator,
)

__all__ = [
    "ALLOCATOR_ENV",
    "MMAP_THRESHOLD",
    "TOP_PAD",
    "TRIM_THRESHOLD",
    "prefault_heap",
    "release_free_memory",
    "tune_allocator",
]
