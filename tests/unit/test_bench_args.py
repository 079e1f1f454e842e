"""Bench scripts check their arguments: a bad value is one argparse error (exit 2), never a traceback.

``bench/offload_1m.py --workdir`` of a missing folder used to end in a
FileNotFoundError traceback from ``tempfile.mkdtemp`` (issue 24). Each script's
``main`` gets one bad value and must exit 2 with argparse's error naming the option,
before any model is loaded or server started; the reported case also runs as a
script, as an operator would run it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kvstore.testing import bench_args as ba

REPO = Path(__file__).resolve().parents[2]

#: (script, bad arguments, the option the error must name, a phrase it must hold)
CASES = [
    ("offload_1m", ["--workdir", "/nonexistent/kvstore-bench"], "--workdir", "no such directory"),
    ("offload_1m", ["--workdir", "pyproject.toml"], "--workdir", "not a directory"),
    ("offload_1m", ["--parallel", "0"], "--parallel", "must be >= 1"),
    ("offload_1m", ["--profiles", "lossless,fp8"], "--profiles", "unknown codec profile 'fp8'"),
    ("offload_1m", ["--baseline-bytes", "lots"], "--baseline-bytes", "not a byte size"),
    (
        "offload_1m",
        ["--quick", "--distinct-tokens", "300"],
        "--distinct-tokens",
        "multiple of --chunk-tokens",
    ),
    ("store_throughput", ["--tiers", "memory,ram"], "--tiers", "unknown tier 'ram'"),
    ("store_throughput", ["--sizes", "2MiB"], "--sizes", "unknown size '2MiB'"),
    ("store_throughput", ["--streams", "-2"], "--streams", "must be >= 1"),
    ("client_overhead", ["--calls", "0"], "--calls", "must be >= 1"),
    ("codec_throughput", ["--chunks", "many"], "--chunks", "not a whole number"),
    ("codec_fidelity", ["--json", "/nonexistent/out.json"], "--json", "no such directory"),
    ("layerwise", ["--profile", "fp8"], "--profile", "invalid choice"),
    ("prefix_reuse", ["--repeats", "0"], "--repeats", "must be >= 1"),
    ("slow_readers_memory", ["--readers", "0"], "--readers", "must be >= 1"),
]


def _bench(script: str) -> ModuleType:
    """Import bench/<script>.py as a module (bench/ is scripts, not a package)."""
    name = f"bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("script,args,option,phrase", CASES, ids=[f"{c[0]}{c[1][0]}" for c in CASES])
def test_a_bad_bench_argument_is_an_argparse_error(
    script: str, args: list[str], option: str, phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main = _bench(script).main
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error and option in error and phrase in error, error


def test_offload_1m_workdir_of_a_missing_folder_run_as_a_script() -> None:
    """The reported case, as an operator runs it: exit 2, one error line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "bench/offload_1m.py", "--quick", "--workdir", "/nonexistent/kvstore-bench"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "offload_1m.py: error: argument --workdir: no such directory: '/nonexistent/kvstore-bench' "
        "(create it first)"
    )


def test_the_argument_types() -> None:
    assert ba.positive_int("1_000") == 1000 and ba.non_negative_int("0") == 0
    assert ba.byte_size("64MiB") == 64 << 20 and ba.non_negative_float("0.5") == 0.5
    assert ba.names(["a", "b"], "thing")(" b, a ,") == "b,a"
    for parse, text in [
        (ba.positive_int, "0"),
        (ba.non_negative_int, "-1"),
        (ba.non_negative_float, "nan"),
        (ba.non_negative_float, "inf"),
        (ba.byte_size, "0"),
        (ba.names(["a"], "thing"), ","),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_existing_dir_and_file_in_existing_dir(tmp_path: Path) -> None:
    assert ba.existing_dir(str(tmp_path)) == str(tmp_path)
    assert ba.file_in_existing_dir(str(tmp_path / "out.json")) == tmp_path / "out.json"
    with pytest.raises(argparse.ArgumentTypeError, match="no such directory"):
        ba.existing_dir(str(tmp_path / "missing"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        ba.file_in_existing_dir(str(tmp_path))
