"""Storage tiers behind one :class:`~kvstore.backends.base.Backend` interface.

Backends are looked up by name through a lazy registry, so choosing "memory" or
"disk" never imports redis or boto3: those modules load only when their tier is
configured (``backend_class("s3")``). The classes are also reachable as package
attributes (``from kvstore.backends import DiskBackend``), imported on first use.
:func:`build_backend` builds a tier from its config section, choosing the layout the
section asks for (``redis.cluster: true`` is :class:`RedisClusterBackend`), so the
standalone Redis module never has to know the cluster one.
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
#: tier name -> (section switch, module, class): the layout built when the switch is on.
_VARIANTS: dict[str, tuple[str, str, str]] = {
    "redis": ("cluster", "kvstore.backends.redis_cluster", "RedisClusterBackend"),
}
_CLASSES = {cls: (name, mod) for name, (mod, cls) in _REGISTRY.items()}
_LAZY = {
    **{cls: mod for cls, (_, mod) in _CLASSES.items()},
    **{cls: mod for _, mod, cls in _VARIANTS.values()},
    "TieredStore": "kvstore.backends.tiered",
}

BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass for tier ``name``, importing its module (and its client library) now."""
    try:
        module_name, class_name = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(_REGISTRY)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def build_backend(name: str, section: Any) -> Backend:
    """Tier ``name`` built from its config section (a dataclass in kvstore/config.py).

    The one place that chooses between layouts of a tier: Redis with ``cluster: true`` is
    :class:`~kvstore.backends.redis_cluster.RedisClusterBackend`, else :class:`RedisBackend`.
    """
    cls = backend_class(name)
    variant = _VARIANTS.get(name)
    if variant is not None:
        switch, module_name, class_name = variant
        if getattr(section, switch, False):
            cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_config(section)


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
    "build_backend",
    "DiskBackend",
    "MemoryBackend",
    "RedisBackend",
    "RedisClusterBackend",
    "S3Backend",
    "TieredStore",
]
