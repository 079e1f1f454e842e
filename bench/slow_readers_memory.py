"""Server memory held for slow Get readers, and whether it is given back once they leave.

Starts a real ``kvstore serve`` (RAM tier only), stores ``--keys`` chunks of one
``--blob-mib`` blob each, then opens ``--readers`` Get streams of every key whose
clients read one message and stop: each server-side write then waits on flow
control, holding a message. The server's RSS (``/proc/PID/status`` VmRSS) is read
at four points (MiB): after the Puts (``stored``), while every reader is stalled
(``stalled``), after they have all left (``left``: cancelled, channels closed, the
server's open streams back to 0, then ``--settle-s`` for any deferred release),
and after one more ordinary Get of everything (``reused``, memory the allocator
kept is reused, not added to). ``held_per_stream`` is (stalled - stored) /
readers and ``kept_after_leave`` is left - stored, in MiB.

Issue 24 reported 615 MiB left after 100 slow readers (4 MiB each) had gone.

    python bench/slow_readers_memory.py                      # 100 readers, 4 MiB blobs
    python bench/slow_readers_memory.py --quick             # 20 readers, 16 keys
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvstore.testing import bench_args as ba  # noqa: E402
from kvstore.testing import slow_readers as slow  # noqa: E402
from kvstore.testing.store import start_server_process  # noqa: E402
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc  # noqa: E402

MiB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readers", type=ba.positive_int, default=100, help="slow Get streams (100)")
    p.add_argument("--keys", type=ba.positive_int, default=32, help="chunks stored and read by each Get (32)")
    p.add_argument("--blob-mib", type=ba.positive_int, default=4, help="size of each blob in MiB (4)")
    p.add_argument("--settle-s", type=ba.non_negative_float, default=2.0, help="wait after they leave (2)")
    p.add_argument("--quick", action="store_true", help="20 readers, 16 keys")
    p.add_argument("--serve-arg", action="append", default=[], help="extra 'kvstore serve' flag (repeatable)")
    args = p.parse_args(argv)
    if args.quick:
        args.readers, args.keys = 20, 16
    return args


def _mib(pid: int) -> float:
    return round(slow.rss_bytes(pid) / MiB, 1)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    blob_bytes = args.blob_mib * MiB
    budget = args.keys * blob_bytes * 2
    work = Path(tempfile.mkdtemp(prefix="kvstore-slow-readers-"))
    server = start_server_process(["--no-disk", "--memory-bytes", str(budget), *args.serve_arg], workdir=work)
    result: dict[str, object] = {"readers": args.readers, "keys": args.keys, "blob_mib": args.blob_mib}
    try:
        pid = server.proc.pid
        with grpc.insecure_channel(server.target) as control:
            stub = pb_grpc.KVStoreStub(control)
            request = slow.store(stub, args.keys, blob_bytes)
            result["stored_mib"] = start = _mib(pid)
            readers = slow.stall(server.target, stub, request, args.readers, blob_bytes)
            result["stalled_mib"] = stalled = _mib(pid)
            slow.leave(readers, stub)
            time.sleep(args.settle_s)  # a measurement after a fixed time, not a wait for readiness
            result["left_mib"] = left = _mib(pid)
            options = slow.reader_options(blob_bytes)
            options.pop()  # an ordinary reader: BDP probing on
            with grpc.insecure_channel(server.target, options=options) as channel:
                got = sum(1 for _ in pb_grpc.KVStoreStub(channel).Get(request, timeout=120))
            if got != args.keys:
                raise RuntimeError(f"a Get after the readers left returned {got} of {args.keys} blobs")
            result["reused_mib"] = _mib(pid)
    finally:
        server.stop()
    result["held_per_stream_mib"] = round((stalled - start) / args.readers, 2)
    result["kept_after_leave_mib"] = round(left - start, 1)
    return result


if __name__ == "__main__":
    out = main()
    print(json.dumps(out, indent=2))
    print(
        f"{out['readers']} slow readers held {out['held_per_stream_mib']} MiB each; "
        f"{out['kept_after_leave_mib']} MiB still held after they left"
    )
