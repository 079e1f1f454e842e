"""Reliability workloads against a real kvstore server: faults and fuzzing, over raw gRPC.

Each workload is a function here, shared by the test suite (tests/integration/
test_fuzz.py, test_bitflips.py, test_crash_restart.py,
test_backend_kill_under_load.py, test_backend_freeze.py run them at a small size)
and by ``bench/reliability.py`` (the same code at full size, printed as JSON), so
the figures and the assertions of the suite measure the same thing. It lives in
the package, not in bench/ or tests/, so neither of those imports the other; nothing
in the server imports it.

One module per kind of workload: :mod:`.fuzz`, :mod:`.corruption` (bit flips in
every tier and in disk records), :mod:`.faults` (crash and restart, Redis and S3
killed or frozen under load), and :mod:`.calls`, the RPC helpers they share. The
workloads that drive the client (many clients at once, a stalling tenant, a cluster
replica repaired by its clients) are on the client's side, in :mod:`transfer.testing`:
nothing in kvstore/ imports transfer/. See bench/reliability.py for what each
workload counts.
"""

from __future__ import annotations

from kvstore.testing.reliability.calls import (
    PRECISE,
    committed,
    percentile,
    roundtrip_ok,
    rpc_code,
    seed_chunks,
)
from kvstore.testing.reliability.corruption import FlipReport, TierCorruptor, run_bitflips, run_disk_flips
from kvstore.testing.reliability.faults import run_backend_freeze, run_backend_kill, run_crash_restart
from kvstore.testing.reliability.fuzz import (
    Case,
    FuzzGenerator,
    Limits,
    RawCaller,
    fuzz_server_args,
    run_fuzz,
)

__all__ = [
    "PRECISE",
    "Case",
    "FlipReport",
    "FuzzGenerator",
    "Limits",
    "RawCaller",
    "TierCorruptor",
    "committed",
    "fuzz_server_args",
    "percentile",
    "roundtrip_ok",
    "rpc_code",
    "run_backend_freeze",
    "run_backend_kill",
    "run_bitflips",
    "run_crash_restart",
    "run_disk_flips",
    "run_fuzz",
    "seed_chunks",
]
