"""Malformed and oversize requests never crash the server and each get a precise status.

Runs the fuzzer of bench/reliability.py (which runs >= 10,000 cases) at suite size
against ``kvstore serve`` as a child process, so a crash is an exit, not a dead
test runner. "Precise" means the status each case allows (INVALID_ARGUMENT for a
bad namespace, RESOURCE_EXHAUSTED for an oversize blob, ...); UNKNOWN, INTERNAL
and UNAVAILABLE are never allowed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore.testing.reliability import PRECISE, FuzzGenerator, Limits, RawCaller, fuzz_server_args, run_fuzz
from kvstore.v1 import kvstore_pb2 as pb
from tests.fixtures.store import ServerProcess, start_server_process

LIMITS = Limits()
TOKEN = "fuzz-token"


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """``kvstore serve`` as a child process with the fuzzer's limits and token; killed after the test."""
    server = start_server_process(fuzz_server_args(tmp_path, LIMITS, TOKEN, "fuzz"), workdir=tmp_path)
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def _raw_calls(server: ServerProcess, seed: int) -> Iterator[tuple[RawCaller, FuzzGenerator]]:
    """A raw caller on ``server`` and a generator to build the one malformed case a test needs."""
    with grpc.insecure_channel(server.target) as channel:
        yield (
            RawCaller(channel, TOKEN),
            FuzzGenerator(random.Random(seed), LIMITS, "fuzz/m/p", None, [], auth=True),
        )


def test_fuzz_cases_get_precise_statuses_and_server_survives(fuzz_server: ServerProcess) -> None:
    report = run_fuzz(
        fuzz_server.target,
        1200,
        seed=7,
        token=TOKEN,
        limits=LIMITS,
        alive=lambda: fuzz_server.proc.poll() is None,
    )
    assert fuzz_server.proc.poll() is None, f"server died during fuzzing:\n{fuzz_server.log()[-3000:]}"
    assert not report["crashed"]
    assert report["violations"] == 0, report["violations_by_kind"]
    assert report["roundtrip_ok_after"], "server stopped serving valid requests after the fuzz run"
    assert "INTERNAL" not in report["by_code"] and "UNKNOWN" not in report["by_code"]
    # Every family of cases actually ran.
    assert len(report["by_case"]) >= 20, report["by_case"]


def test_undecodable_bytes_are_invalid_argument(fuzz_server: ServerProcess) -> None:
    """Bytes that are not a protobuf message are the caller's fault, on every method."""
    with _raw_calls(fuzz_server, seed=1) as (caller, gen):
        garbage = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # an over-long varint tag
        for method in ("Lookup", "Put", "Get", "Delete", "Stats"):
            case = gen._raw_case("garbage", method, garbage)
            code, details = caller.call(case)
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)


def test_namespace_with_trailing_newline_is_rejected(fuzz_server: ServerProcess) -> None:
    """'fuzz/m/p\\n' is not 'fuzz/m/p': two spellings of one namespace would alias keys."""
    with _raw_calls(fuzz_server, seed=2) as (caller, gen):
        req = pb.LookupRequest(namespace="fuzz/m/p\n", keys=[gen.key()], num_layers=1)
        code, details = caller.call(gen._raw_case("newline", "Lookup", req.SerializeToString()))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)


def test_precise_set_excludes_server_faults() -> None:
    assert not {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE} & PRECISE
