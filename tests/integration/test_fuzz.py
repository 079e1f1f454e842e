"""Malformed and oversize requests never crash the server and each get a precise status.

Runs the fuzzer of bench/reliability.py (which runs >= 10,000 cases) at suite size
against ``kvstore serve`` as a child process, so a crash is an exit, not a dead
test runner. "Precise" means the status each case allows (INVALID_ARGUMENT for a
bad namespace, RESOURCE_EXHAUSTED for an oversize blob, ...); UNKNOWN, INTERNAL
and UNAVAILABLE are never allowed.
"""

from __future__ import annotations

import random
from pathlib import Path

import grpc

from kvstore.testing.reliability import PRECISE, FuzzGenerator, Limits, RawCaller, fuzz_server_args, run_fuzz
from kvstore.v1 import kvstore_pb2 as pb
from tests.fixtures.store import start_server_process

LIMITS = Limits()


def test_fuzz_cases_get_precise_statuses_and_server_survives(tmp_path: Path) -> None:
    server = start_server_process(fuzz_server_args(tmp_path, LIMITS, "fuzz-token", "fuzz"), workdir=tmp_path)
    try:
        report = run_fuzz(
            server.target,
            1200,
            seed=7,
            token="fuzz-token",
            limits=LIMITS,
            alive=lambda: server.proc.poll() is None,
        )
    finally:
        alive = server.proc.poll() is None
        server.kill()
    assert alive, f"server died during fuzzing:\n{server.log()[-3000:]}"
    assert not report["crashed"]
    assert report["violations"] == 0, report["violations_by_kind"]
    assert report["roundtrip_ok_after"], "server stopped serving valid requests after the fuzz run"
    assert "INTERNAL" not in report["by_code"] and "UNKNOWN" not in report["by_code"]
    # Every family of cases actually ran.
    assert len(report["by_case"]) >= 20, report["by_case"]


def test_undecodable_bytes_are_invalid_argument(tmp_path: Path) -> None:
    """Bytes that are not a protobuf message are the caller's fault, on every method."""
    server = start_server_process(fuzz_server_args(tmp_path, LIMITS, "fuzz-token", "fuzz"), workdir=tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            caller = RawCaller(channel, "fuzz-token")
            gen = FuzzGenerator(random.Random(1), LIMITS, "fuzz/m/p", None, [], auth=True)
            garbage = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # an over-long varint tag
            for method in ("Lookup", "Put", "Get", "Delete", "Stats"):
                case = gen._raw_case("garbage", method, garbage)
                code, details = caller.call(case)
                assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
    finally:
        server.kill()


def test_namespace_with_trailing_newline_is_rejected(tmp_path: Path) -> None:
    """'fuzz/m/p\\n' is not 'fuzz/m/p': two spellings of one namespace would alias keys."""
    server = start_server_process(fuzz_server_args(tmp_path, LIMITS, "fuzz-token", "fuzz"), workdir=tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            caller = RawCaller(channel, "fuzz-token")
            gen = FuzzGenerator(random.Random(2), LIMITS, "fuzz/m/p", None, [], auth=True)
            req = pb.LookupRequest(namespace="fuzz/m/p\n", keys=[gen.key()], num_layers=1)
            code, details = caller.call(gen._raw_case("newline", "Lookup", req.SerializeToString()))
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    finally:
        server.kill()


def test_precise_set_excludes_server_faults() -> None:
    assert not {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE} & PRECISE
