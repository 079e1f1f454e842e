"""The committed gRPC stubs are exactly what `make proto` generates from the proto.

A proto edit without `make proto` would ship stubs that disagree with the wire
contract; this test regenerates them into a tmp dir and compares byte for byte.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "proto/kvstore/v1/kvstore.proto"],
        cwd=ROOT, check=True, capture_output=True,
    )
    stale = [name for name in GENERATED
             if (tmp_path / "kvstore/v1" / name).read_bytes() != (ROOT / "kvstore/v1" / name).read_bytes()]
    assert not stale, f"kvstore/v1/{', '.join(stale)} are stale: run `make proto` and commit the result"
