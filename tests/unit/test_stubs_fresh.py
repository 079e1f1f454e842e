"""The committed gRPC stubs are exactly what `make proto` generates from the proto.

A proto edit without `make proto` would ship stubs that disagree with the wire
contract; this test regenerates them into a tmp dir and compares byte for byte,
except the generators' own version stamps: a fresh machine installs the newest
grpcio-tools, whose stamp differs from the one that wrote the committed stubs
although the proto and the generated code are the same.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")
#: Lines that name the generator's version, not anything the proto says.
VERSION_STAMPS = (
    re.compile(rb"^GRPC_GENERATED_VERSION = .*$", re.M),
    re.compile(rb"^# Protobuf Python Version: .*$", re.M),
    re.compile(rb"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)"),
)


def _without_stamps(code: bytes) -> bytes:
    for stamp in VERSION_STAMPS:
        code = stamp.sub(b"<version stamp>", code)
    return code


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "proto/kvstore/v1/kvstore.proto",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    stale = [
        name
        for name in GENERATED
        if _without_stamps((tmp_path / "kvstore/v1" / name).read_bytes())
        != _without_stamps((ROOT / "kvstore/v1" / name).read_bytes())
    ]
    assert not stale, f"kvstore/v1/{', '.join(stale)} are stale: run `make proto` and commit the result"


def test_version_stamps_are_all_that_is_ignored() -> None:
    """A changed message must still count as stale: only the stamps are masked."""
    committed = (ROOT / "kvstore/v1/kvstore_pb2_grpc.py").read_bytes()
    assert _without_stamps(committed.replace(b"1.", b"9.", 1)) == _without_stamps(committed)
    assert _without_stamps(committed.replace(b"LookupRequest", b"LookupRequestX", 1)) != _without_stamps(
        committed
    )
