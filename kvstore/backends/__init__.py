"""Storage tiers behind one :class:`~kvstore.backends.base.Backend` interface.

Backends are looked up by name through a lazy registry, so choosing "memory" or
"disk" never imports redis or boto3: those modules load only when their tier is
configured (``backend_class("s3")``). The classes are also reachable as package
attributes (``from kvstore.backends import DiskBackend``), imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvstore.backends.base import Backend, BackendCounters, BackendUsage, BlobKey

#: tier name -> (module, class). Order is the default read order, fastest first.
_REGISTRY: dict[str, tuple[str, str]] = {
    "memory": ("kvstore.backends.memory", "MemoryBackend"),
    "disk": ("kvstore.backends.disk", "DiskBackend"),
    "redis": ("kvstore.backends.redis", "RedisBackend"),
    "s3": ("kvstore.backends.s3", "S3Backend"),
}
_CLASSES = {cls: (name, mod) for name, (mod, cls) in _REGISTRY.items()}
_LAZY = {**{cls: mod for cls, (_, mod) in _CLASSES.items()}, "TieredStore": "kvstore.backends.tiered"}

BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass for tier ``name``, importing its module (and its client library) now."""
    try:
        module_name, class_name = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(_REGISTRY)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def __getattr__(attr: str) -> Any:
    module_name = _LAZY.get(attr)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    return getattr(importlib.import_module(module_name), attr)


__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendCounters",
    "BackendUsage",
    "BlobKey",
    "backend_class",
    "DiskBackend",
    "MemoryBackend",
    "RedisBackend",
    "S3Backend",
    "TieredStore",
]
