"""Helpers for tests and benchmarks: real servers on free loopback ports.

Nothing here is imported by the server; it is shipped in the package so that the
test suite, ``bench/`` and downstream projects start Redis and S3 the same way
(:mod:`.services`), run a kvstore server in or out of process (:mod:`.store`) and
run the same reliability workloads (:mod:`.reliability`; those that drive the client
are in :mod:`transfer.testing`, on the client's side), without tests and bench
importing each other. Nothing here imports transfer/.
"""

from __future__ import annotations

from kvstore.testing.services import RedisProcess, S3Process, ServiceError, free_port

__all__ = ["RedisProcess", "S3Process", "ServiceError", "free_port"]
