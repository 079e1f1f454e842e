"""The Python examples of README.md and docs/*.md run, so a broken example fails CI.

Every ```python block is run as a reader would: the blocks of one page in order, in one fresh
interpreter (names defined by an earlier block are there for the later ones, as on the page), against
real ``kvstore serve`` processes started here on free ports. The examples name their servers
``127.0.0.1:50051``, ``127.0.0.1:50052``, ...; that string is the only thing rewritten, to the address of
the server started for it. Nothing else is provided: an example that uses a name it never defines, or
calls an API that changed, fails here with the page's own file and line numbers in the traceback.

A block that cannot run on a CI machine (it needs Kubernetes, an existing Ray cluster, vLLM...) says so
on the line right above its fence::

    <!-- doc-example: not run: needs an existing Ray cluster to join -->

The reason is required, and at most ``MAX_NOT_RUN`` blocks may carry one, so the list stays short.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.store import REPO_ROOT, ServerProcess, start_server_process

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*doc-example:\s*not run:(?P<reason>.*?)-->")
TARGET = re.compile(r"127\.0\.0\.1:(5005[0-9])")
MAX_NOT_RUN = 2
SERVE_ARGS = ["--memory-bytes", "512MiB", "--disk-bytes", "2GiB", "--log-level", "WARNING"]

# Runs in the child: every block of one page in one namespace, compiled under the page's path with its
# real line numbers, so a traceback points into the markdown file.
_RUNNER = """
import json, sys
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for block in blocks:
    print(f"--- {block['path']}:{block['line']}", flush=True)
    code = compile("\\n" * block["line"] + block["code"], block["path"], "exec")
    exec(code, namespace)
print("--- all blocks ran", flush=True)
"""


@dataclass(frozen=True)
class Block:
    """One ```python block: where its code starts (1-based line of the fence) and why it is not run, if so."""

    path: Path
    line: int
    code: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, indented ones (in list items) dedented."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```") and not stripped.startswith("```python"):
            i = _end_of_fence(lines, i)  # skip other languages whole: their bodies may hold ``` lines
            continue
        if stripped == "```python":
            end = _end_of_fence(lines, i) - 1
            marker = MARKER.search(lines[i - 1]) if i > 0 else None
            if marker and not marker.group("reason").strip():
                raise ValueError(f"{path}:{i}: a not-run marker must say why")
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            blocks.append(Block(path, i + 1, code, marker.group("reason").strip() if marker else None))
            i = end + 1
            continue
        if MARKER.search(lines[i]) and not (i + 1 < len(lines) and lines[i + 1].strip() == "```python"):
            raise ValueError(f"{path}:{i + 1}: a not-run marker must stand right above a ```python fence")
        i += 1
    return blocks


def _end_of_fence(lines: list[str], start: int) -> int:
    """Index just past the fence that opens at ``start``."""
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```":
            return j + 1
    raise ValueError(f"unclosed code fence at line {start + 1}")


def run_page(blocks: list[Block], servers: dict[str, str], tmp_path: Path, timeout_s: float) -> str:
    """Run the runnable blocks of one page in a fresh interpreter; the output, or AssertionError with it."""
    payload = [
        {"path": str(b.path), "line": b.line, "code": TARGET.sub(lambda m: servers[m.group(0)], b.code)}
        for b in blocks
        if b.not_run is None
    ]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(payload))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "--- all blocks ran" not in proc.stdout:
        raise AssertionError(f"an example failed (exit {proc.returncode}):\n{output[-6000:]}")
    return output


@pytest.fixture
def doc_servers(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``serve(name)``: the address of a real server for the one an example names (``127.0.0.1:5005N``),
    started on first use (RAM + disk in a temp dir, a free port) and stopped after the test."""
    started: dict[str, ServerProcess] = {}

    def serve(name: str) -> str:
        if name not in started:
            disk = tmp_path / f"disk-{len(started)}"
            started[name] = start_server_process([*SERVE_ARGS, "--disk-path", str(disk)], workdir=tmp_path)
        return started[name].target

    try:
        yield serve
    finally:
        for server in started.values():
            server.stop()


def _pages() -> list[Path]:
    return [p for p in DOCS if any(b.not_run is None for b in python_blocks(p))]


def test_every_page_is_found_and_few_blocks_are_left_out() -> None:
    blocks = [b for page in DOCS for b in python_blocks(page)]
    assert any(b.path.name == "README.md" for b in blocks), "the README's example must be collected"
    left_out = {b.where: b.not_run for b in blocks if b.not_run}
    assert len(left_out) <= MAX_NOT_RUN, f"too many examples left out: {left_out}"


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_page_examples_run(page: Path, doc_servers: Callable[[str], str], tmp_path: Path) -> None:
    blocks = python_blocks(page)
    names = {m.group(0) for b in blocks if b.not_run is None for m in TARGET.finditer(b.code)}
    output = run_page(blocks, {name: doc_servers(name) for name in sorted(names)}, tmp_path, timeout_s=540)
    started = re.findall(r"^--- (.+:\d+)$", output, re.MULTILINE)
    assert len(started) == sum(b.not_run is None for b in blocks), output[-3000:]


def test_a_failing_or_broken_example_fails_the_test(tmp_path: Path) -> None:
    """The harness itself can fail: an exception, an undefined name and a bad marker are each caught."""
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2, 'wrong'\n```\n")
    with pytest.raises(AssertionError, match=r"(?s)page\.md\", line 10, .*AssertionError: wrong"):
        run_page(python_blocks(page), {}, tmp_path, timeout_s=60)
    page.write_text("```python\nprint(undefined_name)\n```\n")
    with pytest.raises(AssertionError, match="NameError"):
        run_page(python_blocks(page), {}, tmp_path, timeout_s=60)
    page.write_text("<!-- doc-example: not run: -->\n```python\n1/0\n```\n")
    with pytest.raises(ValueError, match="must say why"):
        python_blocks(page)
    page.write_text("<!-- doc-example: not run: a reason -->\n\n```python\n1/0\n```\n")
    with pytest.raises(ValueError, match="right above"):
        python_blocks(page)
    page.write_text(
        "<!-- doc-example: not run: needs a cluster -->\n```python\n1/0\n```\n```python\ny = 3\n```\n"
    )
    blocks = python_blocks(page)
    assert [b.not_run for b in blocks] == ["needs a cluster", None]
    assert "all blocks ran" in run_page(blocks, {}, tmp_path, timeout_s=60)
