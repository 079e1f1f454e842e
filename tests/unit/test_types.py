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
    errors = [line for line in output.splitlines() if _ERROR.match(line)]
    assert not errors, "mypy errors:\n" + "\n".join(errors)
    assert proc.returncode == 0, output  # 2: a bad config or a crash
