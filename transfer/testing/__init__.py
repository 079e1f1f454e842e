"""Workloads that drive a real kvstore server through the client, for tests and benchmarks.

The client side's counterpart of :mod:`kvstore.testing`: the reliability workloads
that need the client (:mod:`.load`: many clients at once, a tenant that stalls its
streams; :mod:`.replica_repair`: a cluster replica SIGKILLed and back empty, repaired
by the clients) live here, above the client, so that nothing in kvstore/ imports
transfer/. They stand on :mod:`kvstore.testing` (server processes, the RPC helpers
every workload shares) and, like it, are shared by the test suite
(tests/integration/test_concurrency.py, test_cluster.py run them at a small size)
and ``bench/reliability.py`` (full size, printed as JSON). Nothing in the client
imports this package (tests/unit/test_layering.py checks it).
"""

from __future__ import annotations

from transfer.testing.load import run_concurrency, run_starvation
from transfer.testing.replica_repair import run_replica_repair

__all__ = ["run_concurrency", "run_replica_repair", "run_starvation"]
