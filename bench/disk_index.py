"""What the disk tier's in-memory index costs: RAM per record, restart speed, lookup latency.

For each record count N (1,000 / 100,000 / 1,000,000; ``--quick`` stops at 100,000) it
writes N records the way the tiered store does (``put_sealed_many``, one batch per chunk
of ``--layers`` layers, 32-byte chunk keys, small sealed blobs: the index is what is
measured, not the payload; ``--segment-bytes`` of 32 MiB makes ~175,000 records a segment,
about what 1 KiB blobs make of the default 256 MiB, so a restart scans sealed segments as
well as the newest one, whose payloads it verifies) into a fresh directory, then, each in a fresh subprocess so
one measurement's heap does not pollute the next:

* ``build``: RSS after writing N records minus RSS after opening the empty tier, / N;
* ``restart``: the time to open the tier on that directory (the recovery scan, page cache
  warm: the files were just written), as records/s, and RSS after minus RSS before, / N
  (and the index arrays' own bytes / N where the tier has them);
* ``lookup``: in the restarted process, the median latency of ``exists`` (hits and
  misses) and of ``get`` (hits) over ``--samples`` random keys.

Goals (issue 23): <= 100 B per record in RAM, restart >= 1,000,000 records/s, lookup
latency flat from 1,000 to 1,000,000 records. Prints one JSON document, then a one-line
summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvstore import integrity  # noqa: E402
from kvstore.allocator import tune_allocator  # noqa: E402
from kvstore.backends.base import BlobKey  # noqa: E402
from kvstore.backends.disk import DiskBackend  # noqa: E402
from kvstore.testing import bench_args as ba  # noqa: E402

NAMESPACE = "bench/disk-index"
COUNTS = (1_000, 100_000, 1_000_000)
QUICK_MAX = 100_000
GOAL_BYTES_PER_RECORD = 100
GOAL_RESTART_RPS = 1_000_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def chunk_key(i: int) -> bytes:
    return i.to_bytes(8, "little") * 4  # 32 bytes, like a chunk hash


def record_keys(count: int, layers: int) -> list[BlobKey]:
    return [BlobKey(NAMESPACE, chunk_key(i // layers), i % layers) for i in range(count)]


SEGMENT_BYTES = 32 << 20


def open_tier(path: str) -> DiskBackend:
    segment_bytes = int(os.environ.get("_BENCH_DISK_INDEX_SEGMENT_BYTES", SEGMENT_BYTES))
    return DiskBackend(path, max_bytes=0, fsync="never", segment_bytes=segment_bytes)


def child_build(path: str, count: int, layers: int, blob_bytes: int) -> dict[str, float]:
    gc.collect()
    disk = open_tier(path)
    before = rss_bytes()
    blob = integrity.seal(os.urandom(max(blob_bytes - integrity.TRAILER_BYTES, 0)))
    keys = record_keys(count, layers)
    start = time.perf_counter()
    for i in range(0, count, layers):
        disk.put_sealed_many([(k, blob) for k in keys[i : i + layers]])
    seconds = time.perf_counter() - start
    del keys
    gc.collect()
    after = rss_bytes()
    objects = disk.usage().objects
    disk.close()
    return {
        "objects": objects,
        "put_records_per_s": count / seconds,
        "bytes_per_record": (after - before) / count,
    }


def child_restart(path: str, count: int, layers: int, samples: int) -> dict[str, float]:
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    disk = open_tier(path)
    seconds = time.perf_counter() - start
    gc.collect()
    after = rss_bytes()
    objects = disk.usage().objects
    # The index's own arrays, where the tier exposes them (not before issue 23): RSS less the
    # interpreter's fixed costs and heap left over from the recovery.
    table_bytes = getattr(disk._index, "nbytes", None)
    rng = random.Random(7)
    hits = [
        BlobKey(NAMESPACE, chunk_key(i // layers), i % layers)
        for i in rng.sample(range(count), min(samples, count))
    ]
    misses = [BlobKey(NAMESPACE, chunk_key(count + i), 0) for i in range(samples)]
    result = {
        "objects": objects,
        "restart_s": seconds,
        "restart_records_per_s": count / seconds,
        "bytes_per_record": (after - before) / count,
        # The recovery's peak: the whole process's high-water mark less its RSS before the open.
        "peak_bytes_per_record": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / count,
        **({"table_bytes_per_record": table_bytes / count} if table_bytes is not None else {}),
        "exists_hit_us": median_us(disk.exists, hits),
        "exists_miss_us": median_us(disk.exists, misses),
        "get_hit_us": median_us(disk.get, hits),
    }
    disk.close()
    return result


def median_us(fn: object, keys: list[BlobKey]) -> float:
    call = fn  # a bound method: exists or get
    times = []
    for key in keys:
        start = time.perf_counter_ns()
        call(key)  # type: ignore[operator]
        times.append(time.perf_counter_ns() - start)
    return round(statistics.median(times) / 1000, 2)


def run_child(segment_bytes: int, *args: str) -> dict[str, float]:
    env = {**os.environ, "_BENCH_DISK_INDEX_SEGMENT_BYTES": str(segment_bytes)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(
    count: int, layers: int, blob_bytes: int, samples: int, segment_bytes: int, workdir: str | None
) -> dict[str, object]:
    path = tempfile.mkdtemp(prefix="kvstore-disk-index-", dir=workdir)
    try:
        build = run_child(segment_bytes, "build", path, str(count), str(layers), str(blob_bytes))
        restart = run_child(segment_bytes, "restart", path, str(count), str(layers), str(samples))
        if build["objects"] != count or restart["objects"] != count:
            raise SystemExit(
                f"expected {count} records, built {build['objects']}, reopened {restart['objects']}"
            )
        segments = list(Path(path).glob("*.seg"))
        disk_bytes = sum(f.stat().st_size for f in segments)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return {
        "records": count,
        "disk_bytes": disk_bytes,
        "segments": len(segments),
        "build": {k: round(v, 2) for k, v in build.items()},
        "restart": {k: round(v, 2) for k, v in restart.items()},
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        # The server tunes its allocator at start-up (kvstore/malloc_tuning.py); so does each child,
        # so that RSS counts what a server's would (freed multi-MiB buffers stay in its heap).
        tune_allocator()
        mode, path, count, layers, extra = argv[1:6]
        if mode == "build":
            result = child_build(path, int(count), int(layers), int(extra))
        else:
            result = child_restart(path, int(count), int(layers), int(extra))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"record counts up to {QUICK_MAX:,} only")
    parser.add_argument(
        "--counts", type=ba.positive_int, nargs="+", default=None, help="record counts to measure"
    )
    parser.add_argument(
        "--layers", type=ba.positive_int, default=30, help="layers per chunk (one batch each)"
    )
    parser.add_argument(
        "--blob-bytes", type=ba.positive_int, default=64, help="bytes per blob, trailer included"
    )
    parser.add_argument("--samples", type=ba.positive_int, default=2000, help="keys timed per lookup figure")
    parser.add_argument(
        "--segment-bytes", type=ba.byte_size, default=SEGMENT_BYTES, help="the disk tier's segment_bytes"
    )
    parser.add_argument("--workdir", type=ba.existing_dir, default=None, help="where to write the segments")
    args = parser.parse_args(argv)
    if args.blob_bytes < 8:
        parser.error("--blob-bytes must be >= 8 (the integrity trailer)")
    counts = args.counts or [c for c in COUNTS if not args.quick or c <= QUICK_MAX]
    results = [
        measure(c, args.layers, args.blob_bytes, args.samples, args.segment_bytes, args.workdir)
        for c in counts
    ]
    report = {
        "bench": "disk_index",
        "layers": args.layers,
        "blob_bytes": args.blob_bytes,
        "segment_bytes": args.segment_bytes,
        "goals": {"bytes_per_record": GOAL_BYTES_PER_RECORD, "restart_records_per_s": GOAL_RESTART_RPS},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    parts = [
        f"{r['records']:,}: {r['restart']['bytes_per_record']:.0f} B/rec, "
        f"restart {r['restart']['restart_records_per_s']:,.0f} rec/s, "
        f"exists {r['restart']['exists_hit_us']} us"
        for r in results
    ]
    print("disk index: " + "; ".join(parts))


if __name__ == "__main__":
    main()
