"""Argument types for the bench/ scripts: a bad value is an argparse error, not a traceback.

Each is an ``argparse`` ``type=`` callable. It raises ``ArgumentTypeError``, so argparse
prints ``usage: ... error: argument --workdir: ...`` and exits 2 before the script
loads a model or starts a server; before, ``--workdir`` of a missing folder ended in
a ``FileNotFoundError`` traceback from ``tempfile.mkdtemp`` (issue 24) and a
``--parallel 0`` in a hang or a ``ZeroDivisionError``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from kvstore.config import parse_bytes


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, sizes, repeats)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (0 usually means "the default", e.g. torch's thread count)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def byte_size(text: str) -> int:
    """A positive byte size: ``1048576``, ``64MiB``, ``2GiB``, ``500MB``."""
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def existing_dir(text: str) -> str:
    """A directory that exists and that this process may write in (a work or output folder)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r} (create it first)")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {text!r}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {text!r} is not writable")
    return text


def file_in_existing_dir(text: str) -> Path:
    """A file to write, in a directory that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    existing_dir(str(path.parent))
    return path


def names(known: Iterable[str], what: str) -> Callable[[str], str]:
    """A comma-separated list, each entry one of ``known`` (e.g. codec profiles, tiers).

    Returns the entries joined by commas again (blanks dropped), so a script splits
    the value as it did before it was checked.
    """
    allowed = list(known)

    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"give at least one {what} (known: {', '.join(allowed)})")
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown))} (known: {', '.join(allowed)})"
            )
        return ",".join(items)

    return parse


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
