"""``python -m mypy`` ([tool.mypy] in pyproject.toml: strict on transfer/) passes, so CI enforces the types.

CI runs ``make test``, not ``make lint``; this test is how a type error fails the build. mypy keeps its
cache in ``.mypy_cache`` at the repository root, so a rerun checks only what changed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Files whose errors are tolerated for now: they are being rewritten on another branch, and are checked
#: like every other file once it is merged (this set is temporary and is then emptied).
EXEMPT = {
    "transfer/cluster.py",
    "transfer/aio_cluster.py",
    "transfer/cluster_ops.py",
    "transfer/routing.py",
    "transfer/membership.py",
    "transfer/placement.py",
}

_ERROR = re.compile(r"^(?P<path>[^:\s]+):\d+: error: ", re.M)


def test_mypy_strict_on_transfer() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    output = proc.stdout + proc.stderr
    errors = [m.group(0) for m in _ERROR.finditer(output) if m.group("path") not in EXEMPT]
    offending = [line for line in output.splitlines() if any(line.startswith(e) for e in errors)]
    assert not offending, "mypy errors:\n" + "\n".join(offending)
    # 0: clean; 1: errors, all in exempt files; anything else (2: bad config, crash) fails
    assert proc.returncode == 0 or (proc.returncode == 1 and EXEMPT), output
