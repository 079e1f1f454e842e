"""GPU check: the codec's CPU/CUDA promises, and what one GPU moves per layer.

    python bench/gpu_check.py [--quick] [--kv model|random] [--threads N]

On a CUDA device (one GPU; under 5 minutes, ``--quick`` about one) it checks and reports:

1. ``encode_parity``: frames from CUDA tensors are byte-identical to frames from the same tensors
   on CPU (the compiled kernels), for every profile, fp16/bf16/fp32 inputs, SmolLM2's own KV over
   bench/data ([3, 256, 64]) and seeded noise ([3, 256, 64], [8, 256, 128] and a short last chunk
   [8, 100, 128]), at three positions in a context (first chunk with sinks and the recent tail,
   a middle chunk, a last chunk). A mismatch names profile, dtype, shape and the first differing byte.
2. ``decode_parity``: ``decode_layer`` / ``decode_into`` to CUDA (the default path, and with
   ``KVSTORE_CODEC_KERNELS=torch`` the torch stages on the device) give the CPU decode, bit for bit.
3. ``codec_speed``: encode and decode GB/s (fp16-equivalent bytes of K+V, as
   bench/codec_throughput.py counts) per profile with CUDA input and output, next to CPU in the same
   run; warm-up first, medians, ``torch.cuda.synchronize()`` around every timed pass.
4. ``host_device``: GB/s per layer for a 256-token chunk and a 2,048-token load of [8, _, 128] K+V
   in bf16, host->device and device->host, pageable and pinned host memory, copied on a side stream
   with ``non_blocking=True``; the baseline is a device-to-device copy of the same bytes.
5. ``connector``: ``bench/vllm_device_roundtrip.py``'s ``run`` (FlashAttention-layout paged caches,
   ``LBNHC`` and ``LBHNC``, saved and loaded through the vLLM connector's worker side and a real
   in-process store: device -> pinned host on a side stream for saves, host -> device with a
   per-layer event for loads; lossless bit-exact). On CUDA with CUDA tensors, else on the CPU.
   Needs no vLLM.

Without CUDA it says so (``"cuda": false``) and runs the CPU half: every profile encoded twice on
CPU (determinism), the compiled kernels against the torch stages on CPU (the stages CUDA runs:
frames and decodes must be identical), and the CPU timings.

Exit status: 0 when every check that ran passed, 1 when one failed (after printing everything),
2 when a dependency is missing. Figures go to docs/benchmarks.md ("GPU check") with the card named.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # the GPU machine may be bare: say what is missing instead of a traceback
    import numba  # noqa: F401  (without it the codec silently runs the torch stages on CPU too)
    import numpy as np
    import torch

    from kvstore.allocator import tune_allocator
    from kvstore.integrity import TRAILER_BYTES
    from transfer.codec import (
        PROFILES,
        codec_threads,
        cpu_kernels,
        decode_into,
        decode_layer,
        encode,
        encode_layer,
    )
    from transfer.codec.format import HEADER_BYTES
    from transfer.codec.warmup import warm_up
except ImportError as exc:
    MISSING: str | None = f"{exc.name or exc}: {exc}"
else:
    MISSING = None

DTYPES = ("float16", "bfloat16", "float32")
TOKENS = 256  # the store's chunk
#: (name, token_offset, context_end) for a 256-token chunk: every tier of every profile is reached.
POSITIONS = (
    ("first chunk, context ends", 0, TOKENS),
    ("middle chunk", 1024, None),
    ("last chunk", 1024, 1280),
)
DEVICE = "cuda"  # the device every GPU step uses (one name, so a dry run can point it elsewhere)
MAX_REPORTED = 40  # mismatch records printed per section (the counts are always complete)


# ---------------------------------------------------------------- comparisons (the test calls these)


def first_difference(expected: bytes, got: bytes) -> int | None:
    """Offset of the first byte where ``got`` differs from ``expected`` (a shorter one differs at its end)."""
    a, b = np.frombuffer(expected, np.uint8), np.frombuffer(got, np.uint8)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        return int(diff[0])
    return None if a.size == b.size else n


def frame_mismatch(expected: bytes, got: bytes) -> dict | None:
    """None when the frames are identical, else where they first differ (offset, part of the frame)."""
    offset = first_difference(expected, got)
    if offset is None:
        return None
    region = (
        "header"
        if offset < HEADER_BYTES
        else "trailer"
        if offset >= len(expected) - TRAILER_BYTES
        else "body"
    )
    return {
        "first_differing_byte": offset,
        "region": region,
        "expected_len": len(expected),
        "got_len": len(got),
        "expected_byte": expected[offset] if offset < len(expected) else None,
        "got_byte": got[offset] if offset < len(got) else None,
    }


def tensor_mismatch(expected: torch.Tensor, got: torch.Tensor) -> dict | None:
    """None when ``got`` (any device) has ``expected``'s dtype, shape and bits, else the first difference."""
    got = got.detach().cpu()
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return {
            "expected": f"{expected.dtype} {list(expected.shape)}",
            "got": f"{got.dtype} {list(got.shape)}",
        }
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    a, b = expected.contiguous().view(bits), got.contiguous().view(bits)  # bit for bit: -0 and NaN payloads
    if torch.equal(a, b):
        return None
    index = int(torch.nonzero((a != b).flatten())[0])
    return {
        "first_differing_element": index,
        "expected": float(expected.flatten()[index]),
        "got": float(got.flatten()[index]),
        "elements_differing": int((a != b).sum()),
    }


class Tally:
    """Counts of comparisons per path and the first mismatch records."""

    def __init__(self) -> None:
        self.compared: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.records: list[dict] = []

    def add(self, path: str, mismatch: dict | None, where: dict) -> None:
        self.compared[path] = self.compared.get(path, 0) + 1
        if mismatch is not None:
            self.failed[path] = self.failed.get(path, 0) + 1
            if len(self.records) < MAX_REPORTED:
                self.records.append({"path": path, **where, **mismatch})

    def report(self) -> dict:
        paths = {p: {"compared": n, "mismatches": self.failed.get(p, 0)} for p, n in self.compared.items()}
        return {"ok": not self.failed and bool(self.compared), "paths": paths, "mismatches": self.records}


@contextlib.contextmanager
def torch_stages() -> Iterator[None]:
    """The codec with its CPU kernels off: every stage is torch, on whatever device the tensors are."""
    before = cpu_kernels.enabled()
    cpu_kernels.set_enabled(False)
    try:
        yield
    finally:
        cpu_kernels.set_enabled(before)


# ---------------------------------------------------------------- inputs


def model_layers(quick: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SmolLM2's own KV (float32, [3, 256, 64]) of the first chunk of bench/data texts, a few layers each."""
    from workers.model import cache_to_layers, load_model

    model, tokenizer = load_model()
    out = []
    texts = sorted((Path(__file__).resolve().parent / "data").glob("*.txt"))
    for path in texts[:: len(texts) // 2][: 1 if quick else 2]:  # the first code text, then a prose one
        ids = tokenizer(path.read_text())["input_ids"][:TOKENS]
        with torch.no_grad():
            layers = cache_to_layers(model(torch.tensor([ids]), use_cache=True).cache)
        picked = (0, len(layers) // 2, len(layers) - 1) if quick else range(0, len(layers), 5)
        out += [(layers[i][0].float().contiguous(), layers[i][1].float().contiguous()) for i in picked]
    return out


def random_layers(heads: int, tokens: int, dim: int, count: int, seed: int) -> list:
    """Seeded float32 K/V with per-channel offsets and one outlier channel in K, as post-RoPE keys have."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        k = torch.randn(heads, tokens, dim, generator=gen) * 2 + torch.randn(heads, 1, dim, generator=gen) * 3
        k[:, :, 3] *= 20
        out.append((k, torch.randn(heads, tokens, dim, generator=gen)))
    return out


def random_sets(quick: bool) -> list[tuple[str, list]]:
    """(name, float32 layers of one chunk) of seeded noise for the parity checks."""
    n = 2 if quick else 4
    return [
        ("random [3, 256, 64]", random_layers(3, TOKENS, 64, n, seed=1)),
        ("random [8, 256, 128]", random_layers(8, TOKENS, 128, n, seed=2)),
        ("random [8, 100, 128] (a short last chunk)", random_layers(8, 100, 128, 1, seed=3)),
    ]


def cast(layers: list, dtype: torch.dtype) -> list:
    return [(k.to(dtype), v.to(dtype)) for k, v in layers]


# ---------------------------------------------------------------- 1 and 2: parity


def parity(sets: list[tuple[str, list]], cuda: bool) -> tuple[dict, dict]:
    """Encode parity and decode parity over every (set, dtype, profile, position)."""
    enc, dec = Tally(), Tally()
    for name, layers in sets:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            cpu = cast(layers, dtype)
            gpu = [(k.to(DEVICE), v.to(DEVICE)) for k, v in cpu] if cuda else None  # the same bits on both
            for profile in PROFILES:
                for position, offset, end in POSITIONS:
                    if end is not None and end - offset != cpu[0][0].shape[1]:
                        end = offset + cpu[0][0].shape[1]  # the short chunk ends its context too
                    where = {"input": name, "profile": profile, "dtype": dtype_name, "position": position}
                    where["shape"] = list(cpu[0][0].shape)
                    ref = encode(cpu, profile, token_offset=offset, context_end=end, threads=1)
                    _encode_candidates(enc, ref, cpu, gpu, profile, offset, end, where)
                    _decode_candidates(dec, ref, cuda, where)
    return enc.report(), dec.report()


def _encode_candidates(tally: Tally, ref: list, cpu: list, gpu, profile, offset, end, where: dict) -> None:
    kw = {"token_offset": offset, "context_end": end}
    found = {"cpu again, on the codec threads": encode(cpu, profile, **kw)}
    with torch_stages():
        found["cpu torch stages (what CUDA runs)"] = encode(cpu, profile, threads=1, **kw)
    if gpu is not None:
        found["cuda encode (one chunk's layers)"] = encode(gpu, profile, threads=1, **kw)
        found["cuda encode_layer"] = [encode_layer(k, v, profile, **kw) for k, v in gpu]
    for path, frames in found.items():
        for layer, (a, b) in enumerate(zip(ref, frames, strict=True)):
            tally.add(path, frame_mismatch(a, b), {**where, "layer": layer})


def _decodes(blobs: list, device: str) -> dict[str, tuple]:
    """Every decode entry, on ``device``: per frame, one layer allocated, into a tensor, cast to bf16."""
    k, v = decode_into(blobs, device=device, threads=1)
    dest = (torch.empty_like(k), torch.empty_like(v))
    decode_into(blobs, dest, threads=1)
    out = {f"decode_layer[{i}]": decode_layer(b, device=device) for i, b in enumerate(blobs)}
    out["decode_into"] = (k, v)
    out["decode_into dest"] = dest
    out["decode_into dtype=bfloat16"] = decode_into(blobs, device=device, dtype=torch.bfloat16, threads=1)
    return out


def _decode_candidates(tally: Tally, blobs: list, cuda: bool, where: dict) -> None:
    ref = _decodes(blobs, "cpu")
    found = {"cpu decode_into on the codec threads": {"decode_into": decode_into(blobs)}}
    with torch_stages():
        found["cpu torch stages"] = _decodes(blobs, "cpu")
    if cuda:
        found["cuda"] = _decodes(blobs, DEVICE)
        with torch_stages():
            found["cuda torch stages on the device"] = _decodes(blobs, DEVICE)
    for path, outputs in found.items():
        for entry, (k, v) in outputs.items():
            for name, a, b in (("K", ref[entry][0], k), ("V", ref[entry][1], v)):
                tally.add(path, tensor_mismatch(a, b), {**where, "entry": entry, "tensor": name})


# ---------------------------------------------------------------- 3: codec speed


def median_seconds(fn: Callable[[], object], reps: int, cuda: bool) -> float:
    """Median wall time of ``fn`` after two warm-up calls, the device synchronized around each pass."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _speed_row(layers: list, profile: str, device: str, reps: int, cuda: bool) -> dict:
    nbytes = sum(2 * k.numel() * 2 for k, _ in layers)  # K+V as fp16, whatever the profile
    offset = layers[0][0].shape[1]
    blobs = encode(layers, profile, token_offset=offset)
    dest = tuple(
        torch.empty(k.shape[0], k.shape[1] * len(layers), k.shape[2], dtype=k.dtype, device=device)
        for k in (layers[0][0], layers[0][1])
    )
    t_enc = median_seconds(lambda: encode(layers, profile, token_offset=offset), reps, cuda)
    t_dec = median_seconds(lambda: decode_into(blobs, dest), reps, cuda)
    return {"encode_gbps": round(nbytes / t_enc / 1e9, 3), "decode_gbps": round(nbytes / t_dec / 1e9, 3)}


def codec_speed(sets: list[tuple[str, list]], cuda: bool, reps: int, torch_rows: bool) -> dict:
    """Per timing set and profile: CPU (kernels) and CUDA (default path, torch stages) in the same run.

    Without CUDA, ``torch_rows`` adds the torch stages on CPU (what CUDA runs; slow, so not in --quick).
    """
    out = {}
    for name, layers in sets:
        rows = {}
        for profile in PROFILES:
            row = {"cpu": _speed_row(layers, profile, "cpu", reps, False)}
            if cuda:
                gpu = [(k.to(DEVICE), v.to(DEVICE)) for k, v in layers]
                row["cuda"] = _speed_row(gpu, profile, DEVICE, reps, True)
                with torch_stages():  # quantized decode on the device: not the default path yet
                    row["cuda torch stages"] = _speed_row(gpu, profile, DEVICE, reps, True)
                for key in ("encode_gbps", "decode_gbps"):
                    row[f"cuda_vs_cpu_{key.split('_')[0]}"] = round(row["cuda"][key] / row["cpu"][key], 2)
            elif torch_rows:
                with torch_stages():  # the stages CUDA runs, here on CPU
                    row["cpu torch stages"] = _speed_row(layers, profile, "cpu", reps, False)
            rows[profile] = row
        out[name] = rows
    return out


# ---------------------------------------------------------------- 4: host <-> device


def copy_gbps(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, reps: int) -> float:
    """Median GB/s of ``dst.copy_(src, non_blocking=True)`` on ``stream``, waited for."""
    torch.cuda.synchronize()  # work queued on the default stream (fills, zeroing) is done first

    def copy() -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()

    return round(src.numel() * src.element_size() / median_seconds(copy, reps, True) / 1e9, 2)


def host_device(reps: int) -> dict:
    """GB/s of one layer's K+V (bf16) across PCIe, pageable and pinned, on a side stream."""
    stream = torch.cuda.Stream()
    out = {}
    for name, tokens in (("chunk: 256 tokens", 256), ("load: 2,048 tokens", 2048)):
        shape = (2, 8, tokens, 128)  # (K, V) x [8 kv heads, tokens, head_dim 128]
        dev = torch.randn(shape, device=DEVICE).to(torch.bfloat16)
        dev2 = torch.empty_like(dev)
        hosts = {"pageable": torch.empty(shape, dtype=torch.bfloat16)}
        hosts["pinned"] = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        rows: dict[str, object] = {"bytes": dev.numel() * dev.element_size(), "shape": list(shape)}
        for kind, host in hosts.items():
            rows[f"device_to_host_{kind}_gbps"] = copy_gbps(host, dev, stream, reps)
            dev2.zero_()
            rows[f"host_to_device_{kind}_gbps"] = copy_gbps(dev2, host, stream, reps)
            rows[f"{kind}_round_trip_exact"] = torch.equal(dev2, dev)  # the copies moved the right bytes
        rows["device_to_device_gbps (baseline)"] = copy_gbps(dev2, dev, stream, reps)
        out[name] = rows
    return out


# ---------------------------------------------------------------- 5: connector


def connector(cuda: bool) -> dict:
    """The vLLM connector's device round trip (bench/vllm_device_roundtrip.py) on this device."""
    path = Path(__file__).resolve().parent / "vllm_device_roundtrip.py"
    try:
        spec = importlib.util.spec_from_file_location("vllm_device_roundtrip", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = module.run(DEVICE if cuda else "cpu")
        json.dumps(result)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported with the others
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        return {"ok": False, "error": f"run() must return a dict with an 'ok' bool, got {result!r:.200}"}
    return result


# ---------------------------------------------------------------- entry


def _device_info(cuda: bool) -> dict:
    info = {
        "torch": torch.__version__,
        "cpu_kernels": cpu_kernels.enabled(),
        "codec_threads": codec_threads(),
    }
    info["codec_source"] = str(Path(cpu_kernels.__file__).parent)  # which checkout's codec was checked
    info["cpus"] = len(os.sched_getaffinity(0))
    info["load_average_1m"] = round(os.getloadavg()[0], 2)  # the CPU figures of a shared box need it
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
        info |= {"cuda_runtime": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(0))}
    return info


def _summary(report: dict) -> str:
    parts = [f"cuda={str(report['cuda']).lower()}" + ("" if report["cuda"] else f" ({report['message']})")]
    for section in ("encode_parity", "decode_parity"):
        paths = report[section]["paths"].values()
        bad, total = sum(p["mismatches"] for p in paths), sum(p["compared"] for p in paths)
        parts.append(f"{section} {bad}/{total} differ")
    for name, rows in report["codec_speed"].items():
        side = "cuda" if report["cuda"] else "cpu"
        speeds = ", ".join(f"{p} {r[side]['encode_gbps']}/{r[side]['decode_gbps']}" for p, r in rows.items())
        parts.append(f"{side} enc/dec GB/s {name}: {speeds}")
    if "host_device" in report:
        load = report["host_device"]["load: 2,048 tokens"]
        parts.append(f"2,048-token layer h2d pinned {load['host_to_device_pinned_gbps']} GB/s")
    parts.append(f"connector {'ok' if report['connector'].get('ok') else 'FAILED'}")
    parts.append("PASS" if report["ok"] else "FAIL: " + "; ".join(report["failures"]))
    return "summary: " + "; ".join(parts)


def speed(quick: bool, cuda: bool) -> dict:
    """The codec_speed section: one chunk of a GPU model's layers ([8, 256, 128] bf16), and SmolLM2's shape."""
    count, reps = (8, 3) if quick else (32, 7)
    sets = [("[8, 256, 128] bf16", cast(random_layers(8, TOKENS, 128, count, seed=4), torch.bfloat16))]
    if not quick:
        sets.append(("[3, 256, 64] fp16", cast(random_layers(3, TOKENS, 64, count, seed=5), torch.float16)))
    note = f"seeded noise, {count} layers of one chunk per pass, medians of {reps}, fp16-equivalent GB/s"
    return {"codec_speed": codec_speed(sets, cuda, reps, torch_rows=not quick), "codec_speed_note": note}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    report: dict = {"cuda": cuda}
    if not cuda:
        report["message"] = "no CUDA device: ran the CPU half only"
    report |= {"quick": args.quick, "kv": args.kv, **_device_info(cuda)}
    report["warmup_s"] = round(
        sum(warm_up(dtype=getattr(torch, d), heads=8, head_dim=128) for d in DTYPES), 2
    )
    sets = random_sets(args.quick)
    if args.kv == "model":
        try:
            sets.insert(0, ("SmolLM2-135M KV [3, 256, 64]", model_layers(args.quick)))
        except Exception as exc:  # noqa: BLE001 - reported, and the check fails: not a silent skip
            report["model_kv_error"] = f"{type(exc).__name__}: {exc} (--kv random checks without the model)"
    report["inputs"] = {
        name: {"layers": len(layers), "shape": list(layers[0][0].shape)} for name, layers in sets
    }
    report["encode_parity"], report["decode_parity"] = parity(sets, cuda)
    report |= speed(args.quick, cuda)
    if cuda:
        report["host_device"] = host_device(20 if args.quick else 100)
    report["connector"] = connector(cuda)
    report["failures"] = _failures(report)
    report["ok"] = not report["failures"]
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def _failures(report: dict) -> list[str]:
    failed = [s for s in ("encode_parity", "decode_parity") if not report[s]["ok"]]
    if "model_kv_error" in report:
        failed.append("model KV: " + report["model_kv_error"])
    for name, rows in report.get("host_device", {}).items():
        failed += [
            f"host_device {name} {k}" for k, v in rows.items() if k.endswith("_exact") and v is not True
        ]
    if report["connector"].get("ok") is False:
        failed.append("connector")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer layers and repetitions (about a minute)")
    ap.add_argument(
        "--kv",
        choices=["model", "random"],
        default="model",
        help="parity inputs: SmolLM2's own KV plus seeded noise (default), or seeded noise only (no model)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if MISSING is not None:
        print(json.dumps({"ok": False, "error": f"missing dependency {MISSING}"}))
        print(
            f"summary: FAIL: cannot import {MISSING}. Run from the repository root with PYTHONPATH=. (make "
            "gpu-check sets it) and the project's dependencies installed (torch, numba, zstandard, xxhash, "
            "transformers); on a GPU machine keep its CUDA build of torch (make install pins 2.13.0), then rerun."
        )
        return 2
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(json.dumps(report, indent=2))
    print(_summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
