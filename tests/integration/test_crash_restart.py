"""SIGKILL under load loses no acknowledged block of the disk tier.

``kvstore serve`` runs as a child process with ``disk.fsync=always`` (a Put is
acknowledged only after its bytes are fsynced, so not even a power cut loses it;
a SIGKILL alone would also spare anything written with ``batch``/``never``, since
the kernel keeps the page cache). Writers put chunks and delete some, the server
is SIGKILLed at a random moment, restarted on the same directory, and every
acknowledged chunk must read back byte for byte, every acknowledged delete must
stay deleted. bench/reliability.py runs more rounds, for ``always`` and ``batch``.
"""

from __future__ import annotations

from pathlib import Path

from kvstore.testing.reliability import run_crash_restart
from tests.fixtures.store import ServerProcess, start_server_process


def test_sigkill_loses_no_acknowledged_block(tmp_path: Path) -> None:
    args = [
        "--disk-path",
        str(tmp_path / "disk"),
        "--fsync",
        "always",
        "--log-level",
        "WARNING",
        "--memory-bytes",
        "64MiB",
    ]

    def start() -> ServerProcess:
        return start_server_process(args, workdir=tmp_path)

    report = run_crash_restart(start, rounds=2, seed=11, writers=2, layers=4, blob_bytes=4096)
    assert report["kills"] == 2
    assert report["puts_acked"] > 10, report  # the crash really came under load
    assert report["acked_blocks_checked"] > 40, report
    assert report["acked_blocks_lost"] == 0, report
    assert report["acked_blocks_corrupt"] == 0, report
    assert report["deleted_resurrected"] == 0, report
