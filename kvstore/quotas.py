"""Per-tenant byte quotas.

A quota bounds how many bytes of blobs one tenant may have stored, so one noisy
tenant cannot evict everyone else's cache or fill a shared disk. The ledger is
the accounting; the server decides when to charge and release:

- **charge** the size of every new blob the server accepts (the full blob, trailer
  included) *before* it is written, so a refused Put stores nothing;
- on an **overwrite** of a key the server already holds, charge only the growth
  (``replace(tenant, old, new)`` charges ``new - old`` or releases the shrink);
- **release** on Delete (and on eviction, where the tiered store reports it).

A limit of 0 means unlimited. Usage lives in memory: after a restart it starts
at 0 unless the server seeds it (``set_usage``) from what the tiers hold, so a
quota is a guard against runaway writers, not a billing record. Over-quota is
never a silent drop: ``charge`` raises QuotaExceeded with the figures.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from kvstore.errors import QuotaExceeded


class QuotaLedger:
    """Thread-safe bytes-in-use per tenant against per-tenant limits."""

    def __init__(self, default_max_bytes: int = 0, per_tenant: Mapping[str, int] | None = None) -> None:
        if default_max_bytes < 0:
            raise ValueError(f"quotas.default_max_bytes must be >= 0, got {default_max_bytes}")
        limits = dict(per_tenant or {})
        for tenant, limit in limits.items():
            if limit < 0:
                raise ValueError(f"quota for tenant {tenant!r} must be >= 0, got {limit}")
        self._default = int(default_max_bytes)
        self._limits = limits
        self._usage: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """False when every tenant is unlimited (the server may skip accounting)."""
        return self._default > 0 or any(v > 0 for v in self._limits.values())

    def limit(self, tenant: str) -> int:
        """The byte limit of ``tenant``; 0 is unlimited."""
        return self._limits.get(tenant, self._default)

    def charge(self, tenant: str, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``tenant`` or raise QuotaExceeded (nothing reserved)."""
        if nbytes < 0:
            raise ValueError(f"cannot charge a negative size ({nbytes}); use release()")
        with self._lock:
            used = self._usage.get(tenant, 0)
            limit = self.limit(tenant)
            if limit and used + nbytes > limit:
                raise QuotaExceeded(
                    f"tenant {tenant!r} is over its storage quota: {used} bytes in use + {nbytes} "
                    f"requested > limit {limit} bytes; delete unused blocks or ask the operator to "
                    f"raise quotas.per_tenant[{tenant!r}]"
                )
            self._usage[tenant] = used + nbytes

    def release(self, tenant: str, nbytes: int) -> None:
        """Give back ``nbytes``; never goes below 0 (a restart may have reset usage)."""
        if nbytes < 0:
            raise ValueError(f"cannot release a negative size ({nbytes}); use charge()")
        with self._lock:
            left = self._usage.get(tenant, 0) - nbytes
            if left > 0:
                self._usage[tenant] = left
            else:
                self._usage.pop(tenant, None)

    def replace(self, tenant: str, old_nbytes: int, new_nbytes: int) -> None:
        """Account an overwrite: charge the growth or release the shrink."""
        if new_nbytes >= old_nbytes:
            self.charge(tenant, new_nbytes - old_nbytes)
        else:
            self.release(tenant, old_nbytes - new_nbytes)

    def usage(self, tenant: str) -> int:
        with self._lock:
            return self._usage.get(tenant, 0)

    def set_usage(self, tenant: str, nbytes: int) -> None:
        """Seed usage (e.g. from the tiers at startup); not checked against the limit."""
        if nbytes < 0:
            raise ValueError(f"usage must be >= 0, got {nbytes}")
        with self._lock:
            self._usage[tenant] = nbytes

    def snapshot(self) -> dict[str, int]:
        """Usage of every tenant with bytes in use, for stats and metrics."""
        with self._lock:
            return dict(self._usage)
