"""Reliability workloads against a real kvstore server: faults, fuzzing and load.

Each workload is a function here, shared by the test suite (tests/integration/
test_fuzz.py, test_bitflips.py, test_crash_restart.py, test_concurrency.py,
test_backend_kill_under_load.py, test_backend_freeze.py run them at a small size)
and by ``bench/reliability.py`` (the same code at full size, printed as JSON), so
the figures and the assertions of the suite measure the same thing. It lives in
the package, not in bench/ or tests/, so neither of those imports the other; nothing
in the server imports it.

One module per kind of workload: :mod:`.fuzz`, :mod:`.corruption` (bit flips in
every tier and in disk records), :mod:`.faults` (crash and restart, Redis and S3
killed or frozen under load), :mod:`.load` (many clients, a stalling tenant),
:mod:`.repair` (a cluster replica SIGKILLed and back empty, repaired by the clients), and
:mod:`.calls`, the RPC helpers they share. See bench/reliability.py for what each
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
from kvstore.testing.reliability.load import run_concurrency, run_starvation
from kvstore.testing.reliability.repair import run_replica_repair

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
    "run_concurrency",
    "run_crash_restart",
    "run_disk_flips",
    "run_fuzz",
    "run_replica_repair",
    "run_starvation",
    "seed_chunks",
]
