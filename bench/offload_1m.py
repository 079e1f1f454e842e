"""A million-token context offloaded to disk through the store and read back layer by layer.

What it answers: can a context far bigger than one message (1,000,000 tokens of
SmolLM2-135M KV: 30 layers x 3 KV heads x head_dim 64, ~23 GB in fp16) go to
the store's disk tier and come back layer by layer with client and server both
in bounded memory, and how close is that to what this machine's disk can do?

In one run it measures

* ``disk_baseline``: the raw device: a file written in 8 MiB blocks and
  fsynced, then read back with ``O_DIRECT`` (or, where that is refused, after
  ``POSIX_FADV_DONTNEED``), so neither number is the page cache;
* ``codec``: per profile, the codec alone: encode and decode GB/s
  (fp16-equivalent) and the ratio, on the distinct real chunks;
* ``store``: per profile, ``kvstore serve`` as a subprocess (RAM tier 16 MiB, so
  everything lands on disk; disk tier in a temp dir, ``fsync=batch``), the
  context written chunk by chunk with :func:`transfer.engines.longctx.offload_frames`
  and read back with :func:`transfer.engines.longctx.stream_layers` (every chunk of
  layer 0, then layer 1, ...), every blob compared byte for byte with what was
  written. Before the read the segment files are fsynced and dropped from the
  page cache, so the read is a cold one. Reported: GB/s fp16-equivalent and on
  the wire each way, bytes on disk, peak RSS (``VmHWM``) of client and server
  per phase.

The KV is real: the model runs once on ``--distinct-tokens`` tokens of text from
bench/data, and those chunks are tiled (under distinct, chained chunk keys) to
the requested length. Encoding 117k frames would take the codec far longer than
the store needs to move them on a 2-core machine, so each distinct (chunk,
layer) is encoded once and its frame reused for every tile: the store numbers
are transport + disk, the codec's own speed is reported next to them.

Prints one JSON document, then a one-line summary. ``--quick`` runs 32k tokens
(under a minute on an idle 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvstore import integrity
from kvstore.keys import DEFAULT_CHUNK_TOKENS, chunk_keys
from kvstore.testing import bench_args as ba
from kvstore.testing.store import start_server_process
from transfer.codec import codec_threads
from transfer.codec.profiles import PROFILES
from transfer.engines import longctx
from transfer.rpc.client import KVClient

ROOT = Path(__file__).resolve().parent.parent

MiB = 1 << 20
GiB = 1 << 30
NUM_LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
TENANT, MODEL = "bench", "smollm2-135m-offload"
BLOCK = 8 * MiB


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- KV source


def kv_cache_path(num_tokens: int) -> Path:
    from workers.model import cache_root

    return cache_root() / "bench" / f"offload-kv-{num_tokens}.pt"


def real_kv(
    num_tokens: int, n: int = DEFAULT_CHUNK_TOKENS
) -> tuple[list[int], list[list[tuple[Any, Any]]], str]:
    """Token ids and per-chunk, per-layer fp16 (k, v) of the model run on ``num_tokens`` tokens of text.

    The model's output is kept in the user cache (~23 MB per 1k tokens), so
    later runs skip the model load and forward pass (about a minute on a busy
    2-core machine); returns where the KV came from.
    """
    import torch

    path = kv_cache_path(num_tokens)
    source = f"cached model output ({path})"
    try:
        saved = torch.load(path, weights_only=True)
        ids, layers = saved["ids"], saved["layers"]
    except (OSError, KeyError, RuntimeError):
        saved = None
    if saved is None:
        from workers.model import cache_to_layers, load_model

        model, tokenizer = load_model()
        text = "\n\n".join(
            p.read_text(errors="replace") for p in sorted((ROOT / "bench" / "data").glob("prose_*.txt"))
        )
        tokens = tokenizer(text, return_tensors="pt").input_ids[:, :num_tokens]
        if tokens.shape[1] < num_tokens:
            raise SystemExit(
                f"bench/data holds only {tokens.shape[1]} tokens of prose, asked for {num_tokens}"
            )
        with torch.no_grad():
            out = model(tokens, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        layers = [
            (k.to(torch.float16).contiguous(), v.to(torch.float16).contiguous())
            for k, v in cache_to_layers(cache)
        ]
        ids = tokens[0].tolist()
        del model, out, cache
        gc.collect()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"ids": ids, "layers": layers}, tmp)
        os.replace(tmp, path)
        source = "model output (SmolLM2-135M, computed this run)"
    chunks = [
        [(k[:, c * n : (c + 1) * n].clone(), v[:, c * n : (c + 1) * n].clone()) for k, v in layers]
        for c in range(num_tokens // n)
    ]
    return list(ids), chunks, source


def raw_frames(chunks: list[list[tuple[Any, Any]]]) -> list[list[bytes]]:
    """The store-only yardstick: fp16 K||V sealed with the integrity trailer, no codec."""
    return [[integrity.seal(k.numpy().tobytes() + v.numpy().tobytes()) for k, v in chunk] for chunk in chunks]


def codec_frames(
    chunks: list[list[tuple[Any, Any]]],
    profile: str,
    n: int = DEFAULT_CHUNK_TOKENS,
    decode_sample: int = NUM_LAYERS,
) -> tuple[list[list[bytes]], dict[str, Any]]:
    """Encode every distinct (chunk, layer) once (timed); time decoding a sample and measure its error."""
    from transfer.codec import decode_layer, encode_layer

    layer_fp16 = longctx.fp16_bytes(n, 1, KV_HEADS, HEAD_DIM)
    k0, v0 = chunks[0][0]
    decode_layer(encode_layer(k0, v0, profile))  # warm up: the kernels load from numba's cache on first use
    started = time.perf_counter()
    frames = [
        [encode_layer(k, v, profile, token_offset=c * n) for k, v in chunk] for c, chunk in enumerate(chunks)
    ]
    encode_s = time.perf_counter() - started
    pairs = [
        (kv, frame)
        for chunk, fr in zip(chunks, frames, strict=True)
        for kv, frame in zip(chunk, fr, strict=True)
    ]
    sample = pairs[:: max(1, len(pairs) // decode_sample)][:decode_sample]
    max_err = decode_s = 0.0
    for (k, v), frame in sample:
        t0 = time.perf_counter()
        dk, dv = decode_layer(frame)
        decode_s += time.perf_counter() - t0
        max_err = max(
            max_err, (dk.float() - k.float()).abs().max().item(), (dv.float() - v.float()).abs().max().item()
        )
    stored = sum(len(f) for fr in frames for f in fr)
    return frames, {
        "encode_mbps_fp16": round(len(pairs) * layer_fp16 / encode_s / 1e6, 1),
        "decode_mbps_fp16": round(len(sample) * layer_fp16 / decode_s / 1e6, 1),
        "ratio_vs_fp16": round(len(pairs) * layer_fp16 / stored, 3),
        "max_abs_error": max_err,
        "frames_encoded": len(pairs),
        "frames_decoded": len(sample),
    }


# ----------------------------------------------------------------------------- raw disk


def disk_baseline(directory: str, nbytes: int) -> dict[str, Any]:
    """Sequential write+fsync and cold read of ``nbytes`` in 8 MiB blocks, in ``directory``."""
    path = os.path.join(directory, "baseline.bin")
    block = os.urandom(BLOCK)
    blocks = max(1, nbytes // BLOCK)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        started = time.perf_counter()
        try:
            for _ in range(blocks):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.perf_counter() - started
        total = blocks * BLOCK
        mode = "O_DIRECT"
        buf = mmap.mmap(-1, BLOCK)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            mode = "fadvise_dontneed"
            longctx.page_cache_drop(path)
            fd = os.open(path, os.O_RDONLY)
        started = time.perf_counter()
        try:
            read = 0
            while (n := os.readv(fd, [buf])) > 0:
                read += n
        finally:
            os.close(fd)
            buf.close()
        read_s = time.perf_counter() - started
        return {
            "bytes": total,
            "write_fsync_gbps": gbps(total, write_s),
            "read_gbps": gbps(read, read_s),
            "read_mode": mode,
        }
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ----------------------------------------------------------------------------- server


@contextlib.contextmanager
def fresh_store(
    disk_dir: str, wire_bytes: int, run_dir: str
) -> Iterator[tuple[KVClient, subprocess.Popen[bytes]]]:
    """``kvstore serve`` with a 16 MiB RAM tier and the disk tier in ``disk_dir`` (room for twice
    ``wire_bytes``, 1 GiB at least); yields a ready client of it and the server process."""
    disk_bytes = max(2 * wire_bytes, 1 * GiB)
    server = start_server_process(
        [
            "--memory-bytes",
            str(16 * MiB),
            "--disk-path",
            disk_dir,
            "--disk-bytes",
            str(disk_bytes),
            "--fsync",
            "batch",
            "--workers",
            "8",
            "--log-level",
            "WARNING",
        ],
        workdir=run_dir,
    )
    try:
        with KVClient(server.target, timeout_s=60, stream_timeout_s=3600) as client:
            client.wait_ready(30)
            yield client, server.proc
    finally:
        server.stop()


def drop_segments(disk_dir: str) -> int:
    """fsync every segment file and drop it from the page cache; returns their total size."""
    total = 0
    for seg in sorted(Path(disk_dir).glob("*.seg")):
        fd = os.open(seg, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


class Phase:
    """Wall time, CPU seconds and peak RSS of this process (client) and the server over one phase."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        longctx.reset_peak_rss()
        longctx.reset_peak_rss(server_pid)
        self.c0, self.s0 = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
        self.started = time.perf_counter()

    def done(self, fp16: int, **extra: Any) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        return {
            "seconds": round(seconds, 2),
            "gbps_fp16": gbps(fp16, seconds),
            **extra,
            "client_cpu_s": round(cpu_seconds(os.getpid()) - self.c0, 1),
            "server_cpu_s": round(cpu_seconds(self.server_pid) - self.s0, 1),
            "client_peak_rss": longctx.peak_rss_bytes(),
            "server_peak_rss": longctx.peak_rss_bytes(self.server_pid),
        }


def _tiling(
    profile: str, frames: list[list[bytes]], token_ids: list[int], num_chunks: int, n: int
) -> tuple[str, list[Any], int, int]:
    """Namespace, chained keys of ``num_chunks`` tiles of ``n`` tokens, their fp16 size and wire size."""
    namespace = f"{TENANT}/{MODEL}/{profile}"
    ids = token_ids * math.ceil(num_chunks * n / len(token_ids))
    keys = chunk_keys(ids[: num_chunks * n], namespace, n)
    fp16 = longctx.fp16_bytes(num_chunks * n, NUM_LAYERS, KV_HEADS, HEAD_DIM)
    wire = sum(sum(len(f) for f in frames[c % len(frames)]) for c in range(num_chunks))
    return namespace, keys, fp16, wire


def store_run(
    profile: str,
    frames: list[list[bytes]],
    token_ids: list[int],
    num_chunks: int,
    work: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Write ``num_chunks`` tiles of ``frames`` through a fresh server, read them back cold, layer by layer."""
    n = args.chunk_tokens
    namespace, keys, fp16, wire = _tiling(profile, frames, token_ids, num_chunks, n)
    distinct = len(frames)
    disk_dir = tempfile.mkdtemp(prefix=f"disk-{profile}-", dir=work)
    out: dict[str, Any] = {
        "profile": profile,
        "chunks": num_chunks,
        "blobs": num_chunks * NUM_LAYERS,
        "fp16_bytes": fp16,
        "wire_bytes": wire,
    }
    try:
        with fresh_store(disk_dir, wire, work) as (client, proc):
            phase = Phase(proc.pid)
            result = longctx.offload_frames(
                client,
                namespace,
                keys,
                (frames[c % distinct] for c in range(num_chunks)),
                batch_bytes=args.batch_mib * MiB,
                parallel=args.parallel,
            )
            out["write"] = phase.done(fp16, put_streams=result.num_requests)
            out["write"]["gbps_wire"] = gbps(result.bytes_stored, out["write"]["seconds"])
            if result.num_blobs != num_chunks * NUM_LAYERS:
                raise RuntimeError(f"stored {result.num_blobs} blobs, expected {num_chunks * NUM_LAYERS}")
            stats = client.stats()
            out["disk_tier_bytes"] = next((t.bytes for t in stats.tiers if t.name == "disk"), 0)
            out["bytes_on_disk"] = drop_segments(disk_dir)
            out["segments"] = len(list(Path(disk_dir).glob("*.seg")))
            phase = Phase(proc.pid)
            mismatches = read = 0
            for window in longctx.stream_layers(
                client, namespace, keys, 0, NUM_LAYERS, window_keys=args.window_keys, prefetch=args.prefetch
            ):
                for j, blob in enumerate(window.blobs):
                    read += len(blob)
                    if blob != frames[(window.first_chunk + j) % distinct][window.layer]:
                        mismatches += 1
            out["read"] = phase.done(fp16, cold=True, mismatched_blobs=mismatches)
            out["read"]["gbps_wire"] = gbps(read, out["read"]["seconds"])
            if read != wire:
                raise RuntimeError(f"read back {read} bytes, wrote {wire}")
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    return out


def end_to_end_run(
    profile: str,
    chunks: list[list[tuple[Any, Any]]],
    frames: list[list[bytes]],
    token_ids: list[int],
    num_chunks: int,
    work: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The product path: every tile encoded on the way in (codec threads), every blob decoded on the way out.

    Writes with :func:`longctx.offload_context` and reads with
    :func:`longctx.read_layers` (one whole layer of the context in memory at a
    time, fp16); each layer is checked against the decoded distinct frames.
    """
    import torch

    from transfer.codec import decode_layer, encode_layer

    n = args.chunk_tokens
    namespace, keys, fp16, wire = _tiling(profile, frames, token_ids, num_chunks, n)
    distinct = len(chunks)
    disk_dir = tempfile.mkdtemp(prefix=f"e2e-{profile}-", dir=work)
    out: dict[str, Any] = {"profile": profile, "chunks": num_chunks, "fp16_bytes": fp16}
    try:
        with fresh_store(disk_dir, wire, work) as (client, proc):
            phase = Phase(proc.pid)
            result = longctx.offload_context(
                client,
                namespace,
                keys,
                (chunks[c % distinct] for c in range(num_chunks)),
                profile=profile,
                chunk_tokens=n,
                batch_bytes=args.batch_mib * MiB,
                parallel=args.parallel,
            )
            out["write"] = phase.done(fp16)
            if result.num_blobs != num_chunks * NUM_LAYERS:
                raise RuntimeError(f"stored {result.num_blobs} blobs, expected {num_chunks * NUM_LAYERS}")
            drop_segments(disk_dir)
            # what each tile must decode to: the writer encoded tile c at token offset c * n, so only the
            # context's first chunk has attention sinks; every later tile encodes like the offset-n one
            first = [decode_layer(f) for f in frames[0]]
            later = [
                [decode_layer(encode_layer(k, v, profile, token_offset=n)) for k, v in chunk]
                for chunk in chunks
            ]

            def expected_at(c: int, layer: int) -> tuple[Any, Any]:
                return first[layer] if c == 0 else later[c % distinct][layer]

            phase = Phase(proc.pid)
            bad = 0
            for layer, k, v in longctx.read_layers(
                client,
                namespace,
                keys,
                0,
                NUM_LAYERS,
                chunk_tokens=n,
                window_keys=args.window_keys,
                prefetch=args.prefetch,
            ):
                for c in range(0, num_chunks, max(1, num_chunks // 64)):  # 64 spot checks per layer
                    ek, ev = expected_at(c, layer)
                    if not (
                        torch.equal(k[:, c * n : (c + 1) * n], ek)
                        and torch.equal(v[:, c * n : (c + 1) * n], ev)
                    ):
                        bad += 1
                        break
                del k, v
            out["read"] = phase.done(fp16, mismatched_layers=bad, cold=True)
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=ba.positive_int, default=1_000_000, help="context length (rounded up to full chunks)"
    )
    parser.add_argument("--quick", action="store_true", help="32k tokens, small baseline (under a minute)")
    parser.add_argument(
        "--profiles",
        type=ba.names([*PROFILES, "raw"], "codec profile"),
        default="lossless,balanced",
        help="codec profiles, comma-separated; 'raw' = sealed fp16 without the codec",
    )
    parser.add_argument(
        "--distinct-tokens", type=ba.positive_int, default=1024, help="tokens the model actually runs on"
    )
    parser.add_argument(
        "--baseline-bytes", type=ba.byte_size, default=4 * GiB, help="size of the raw disk baseline file"
    )
    parser.add_argument("--batch-mib", type=ba.positive_int, default=32, help="bytes per Put stream (MiB)")
    parser.add_argument("--parallel", type=ba.positive_int, default=2, help="Put streams in flight")
    parser.add_argument("--window-keys", type=ba.positive_int, default=128, help="chunks per Get window")
    parser.add_argument(
        "--prefetch", type=ba.non_negative_int, default=2, help="Get windows in flight ahead of the reader"
    )
    parser.add_argument(
        "--chunk-tokens",
        type=ba.positive_int,
        default=1024,
        help="tokens per stored chunk (one blob per chunk and layer); the store's prefix-reuse "
        f"default is {DEFAULT_CHUNK_TOKENS}, a parked long context does better with fewer, "
        "larger blobs",
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="also time the product path: encode on the way in, decode on the way out",
    )
    parser.add_argument(
        "--workdir",
        type=ba.existing_dir,
        default=None,
        help="an existing folder where the disk tier goes (default: a temp dir in /tmp)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = min(args.tokens, 32768)
        args.distinct_tokens = min(args.distinct_tokens, max(256, args.chunk_tokens))
        args.baseline_bytes = min(args.baseline_bytes, 512 * MiB)
    if args.distinct_tokens % args.chunk_tokens:
        parser.error(
            f"--distinct-tokens ({args.distinct_tokens}) must be a multiple of --chunk-tokens ({args.chunk_tokens})"
        )
    num_chunks = math.ceil(args.tokens / args.chunk_tokens)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    fp16 = longctx.fp16_bytes(num_chunks * args.chunk_tokens, NUM_LAYERS, KV_HEADS, HEAD_DIM)

    work = tempfile.mkdtemp(prefix="kvstore-offload-", dir=args.workdir)
    try:
        free = shutil.disk_usage(work).free
        if free < fp16 * 1.1 + args.baseline_bytes:
            raise SystemExit(
                f"{work}: {free / 1e9:.1f} GB free, the run needs up to {fp16 * 1.1 / 1e9:.1f} GB"
            )
        started = time.perf_counter()
        token_ids, chunks, kv_source = real_kv(args.distinct_tokens, args.chunk_tokens)
        prepared = time.perf_counter()
        report: dict[str, Any] = {
            "tokens": num_chunks * args.chunk_tokens,
            "chunks": num_chunks,
            "chunk_tokens": args.chunk_tokens,
            "shape": {"layers": NUM_LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
            "fp16_bytes": fp16,
            "distinct_chunks": len(chunks),
            "kv_source": kv_source,
            "frames_reused": True,
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg()[0],
            "workdir": work,
            "settings": {k: getattr(args, k) for k in ("batch_mib", "parallel", "window_keys", "prefetch")},
            "codec_threads": codec_threads(),
            "disk_baseline": disk_baseline(work, min(args.baseline_bytes, fp16)),
            "codec": {},
            "store": {},
            "client_peak_rss_before_store": longctx.peak_rss_bytes(),  # model load + forward, codec imports
        }
        for profile in profiles:
            if profile == "raw":
                frames = raw_frames(chunks)
            else:
                frames, report["codec"][profile] = codec_frames(chunks, profile, args.chunk_tokens)
            report["store"][profile] = store_run(profile, frames, token_ids, num_chunks, work, args)
            if args.end_to_end and profile != "raw":
                report.setdefault("end_to_end", {})[profile] = end_to_end_run(
                    profile, chunks, frames, token_ids, num_chunks, work, args
                )
            del frames
            gc.collect()
        base = report["disk_baseline"]
        for s in report["store"].values():
            s["write"]["wire_vs_raw_disk"] = round(s["write"]["gbps_wire"] / base["write_fsync_gbps"], 2)
            s["read"]["wire_vs_raw_disk"] = round(s["read"]["gbps_wire"] / base["read_gbps"], 2)
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["seconds_preparing_kv"] = round(prepared - started, 1)
        report["load_avg_at_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(json.dumps(report, indent=2))
    base = report["disk_baseline"]
    if not report["store"]:
        return 0
    parts = [f"offload {report['tokens']:,} tokens ({fp16 / 1e9:.1f} GB fp16)"]
    for profile, s in report["store"].items():
        parts.append(
            f"{profile}: write {s['write']['gbps_fp16']} / read {s['read']['gbps_fp16']} GB/s fp16-eq "
            f"(wire {s['write']['gbps_wire']} / {s['read']['gbps_wire']} GB/s, "
            f"{s['bytes_on_disk'] / 1e9:.2f} GB on disk, peak RSS client "
            f"{max(s['write']['client_peak_rss'], s['read']['client_peak_rss']) >> 20} MiB / server "
            f"{max(s['write']['server_peak_rss'], s['read']['server_peak_rss']) >> 20} MiB)"
        )
    parts.append(
        f"raw disk: write+fsync {base['write_fsync_gbps']} / read {base['read_gbps']} GB/s "
        f"({base['read_mode']})"
    )
    print("; ".join(parts))
    for profile, e in report.get("end_to_end", {}).items():
        print(
            f"end-to-end {profile} (encode + store + decode): write {e['write']['gbps_fp16']} / read "
            f"{e['read']['gbps_fp16']} GB/s fp16-eq, peak RSS client "
            f"{max(e['write']['client_peak_rss'], e['read']['client_peak_rss']) >> 20} MiB / server "
            f"{max(e['write']['server_peak_rss'], e['read']['server_peak_rss']) >> 20} MiB"
        )
    bad = [p for p, s in report["store"].items() if s["read"]["mismatched_blobs"]]
    bad += [p for p, e in report.get("end_to_end", {}).items() if e["read"]["mismatched_layers"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
