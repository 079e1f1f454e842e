"""Time to first token with a stored shared prefix (cache hit) vs recomputing the whole prompt.

Setting: a ``--prompt-tokens`` prompt whose first ``--prefix-tokens`` tokens were
already prefilled by an earlier request (a shared system prompt and document),
followed by new tokens. The prefill worker either

* ``recompute``: runs the model on the whole prompt (no lookup, nothing stored), or
* ``hit``: looks the prompt's chunk keys up, streams the stored prefix layer by
  layer into the cache while the model runs, and computes only the suffix, or
* ``hit_fetch_all``: the same, but fetches every layer before computing.

All variants run in the same process, against the same ``kvstore serve`` child
process (as in a deployment: client and server do not share a GIL), on the same
prompt, interleaved (recompute, hit, hit_fetch_all, recompute, ...); the median
of ``--repeats`` is reported. TTFT is the worker's own clock from request to
first token (lookup + fetch + compute). With the ``lossless`` profile the first
token of every variant must be the same, which is checked.

Goal: ``hit <= 0.2 x recompute`` for 2,048 tokens with a 1,792-token shared prefix.
Prints one JSON document, then a one-line summary. ``--quick`` runs a 512-token
prompt with a 448-token prefix (chunks of 64) once, in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvstore.testing import bench_args as ba
from kvstore.testing.store import start_server_process
from transfer.codec.profiles import PROFILES
from workers.prefill import PrefillRequest, PrefillWorker, WorkerConfig
from workers.runner import ModelRunner

ROOT = Path(__file__).resolve().parent.parent

DATA = ROOT / "workers" / "data"
GOAL = 0.2


def text_ids(runner: ModelRunner, num_tokens: int, skip: int = 0) -> list[int]:
    """``num_tokens`` ids of real English text (the demo's documents), starting ``skip`` tokens in."""
    ids: list[int] = []
    for path in sorted(DATA.glob("*.txt")):
        ids += runner.encode(path.read_text())
    while len(ids) < num_tokens + skip:
        ids += ids
    return ids[skip : skip + num_tokens]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=ba.positive_int, default=2048)
    p.add_argument("--prefix-tokens", type=ba.positive_int, default=1792)
    p.add_argument("--chunk-tokens", type=ba.positive_int, default=256)
    p.add_argument("--repeats", type=ba.positive_int, default=3)
    p.add_argument(
        "--profiles",
        type=ba.names(PROFILES, "codec profile"),
        default="lossless",
        help="comma-separated codec profiles",
    )
    p.add_argument(
        "--threads",
        type=ba.non_negative_int,
        default=1,
        help="torch threads (1 is fastest on a busy 2-core box)",
    )
    p.add_argument("--model", help="local HF model directory (default: bundled SmolLM2)")
    p.add_argument(
        "--quick", action="store_true", help="512-token prompt, 448-token prefix, chunks of 64, once"
    )
    p.add_argument(
        "--handoff",
        action="store_true",
        help="also compare decode picking the prompt up from the store vs from per-layer Ray object "
        "refs handed over by prefill (starts a local Ray with one prefill and one decode actor)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.prefix_tokens, args.chunk_tokens, args.repeats = 512, 448, 64, 1
    if not 0 < args.prefix_tokens < args.prompt_tokens or args.prefix_tokens % args.chunk_tokens:
        p.error("--prefix-tokens must be a positive multiple of --chunk-tokens below --prompt-tokens")
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    return args


def measure(worker: PrefillWorker, request: PrefillRequest) -> dict[str, Any]:
    h = worker.prefill(request)
    return {
        "ttft_s": h.timings["ttft_s"],
        "lookup_s": h.timings["lookup_s"],
        "compute_s": h.timings["compute_s"],
        "cached_tokens": h.num_cached_tokens,
        "prefilled_tokens": h.num_prefilled_tokens,
        "first_token": h.first_token,
    }


def run_profile(args: argparse.Namespace, target: str, runner: ModelRunner, profile: str) -> dict[str, Any]:
    common = {
        "store_target": target,
        "profile": profile,
        "tenant": "bench",
        "chunk_tokens": args.chunk_tokens,
    }
    layerwise = PrefillWorker(WorkerConfig(**common, layerwise=True), runner=runner)
    fetch_all = PrefillWorker(WorkerConfig(**common, layerwise=False), runner=runner)
    suffix = args.prompt_tokens - args.prefix_tokens
    shared = text_ids(runner, args.prefix_tokens)
    prompt = tuple(shared + text_ids(runner, suffix, skip=args.prefix_tokens))
    seed_prompt = tuple(shared + text_ids(runner, suffix, skip=args.prefix_tokens + suffix + 7))
    seed = layerwise.prefill(PrefillRequest("seed", seed_prompt))  # an earlier request stores the prefix
    variants = {
        "recompute": (layerwise, PrefillRequest("recompute", prompt, reuse=False, store=False)),
        "hit": (layerwise, PrefillRequest("hit", prompt, store=False)),
        "hit_fetch_all": (fetch_all, PrefillRequest("hit_fetch_all", prompt, store=False)),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (worker, request) in variants.items():
            runs[name].append(measure(worker, request))
    out: dict[str, Any] = {"seed_stored_bytes": seed.stored_bytes, "seed_fp16_bytes": seed.fp16_bytes}
    for name, items in runs.items():
        out[name] = {
            "ttft_s": statistics.median(r["ttft_s"] for r in items),
            "ttft_all_s": [round(r["ttft_s"], 4) for r in items],
            "lookup_s": statistics.median(r["lookup_s"] for r in items),
            "compute_s": statistics.median(r["compute_s"] for r in items),
            "cached_tokens": items[0]["cached_tokens"],
            "prefilled_tokens": items[0]["prefilled_tokens"],
        }
    firsts = {r["first_token"] for items in runs.values() for r in items}
    out["first_token_equal"] = len(firsts) == 1
    out["hit_over_recompute"] = out["hit"]["ttft_s"] / out["recompute"]["ttft_s"]
    out["hit_fetch_all_over_recompute"] = out["hit_fetch_all"]["ttft_s"] / out["recompute"]["ttft_s"]
    out["goal_met"] = out["hit_over_recompute"] <= GOAL
    layerwise.close()
    fetch_all.close()
    return out


def run_handoff(args: argparse.Namespace, target: str, runner: ModelRunner) -> dict[str, Any]:
    """Decode's restore (prefix in, tail recomputed, first step ready): store path vs object refs.

    Both paths start from the same stored prompt; ``store_s`` is what the
    decode actor spends on Lookup + layer-wise Get + decode + tail compute,
    ``handoff_s`` the same with per-layer ``ray.get`` of refs the prefill actor
    put. ``request_s`` is the driver's view of the whole request (1 new token).
    """
    from workers.pipeline import Pipeline, init_ray, shutdown_ray

    init_ray(num_cpus=2)
    pipe = Pipeline(
        WorkerConfig(
            store_target=target,
            profile=args.profiles[0],
            tenant="bench-handoff",
            chunk_tokens=args.chunk_tokens,
            num_threads=args.threads,
        )
    )
    try:
        pipe.wait_ready()
        prompt = tuple(text_ids(runner, args.prompt_tokens))
        pipe.prefill(PrefillRequest("seed", prompt))
        runs: dict[str, list[tuple[float, float]]] = {"store": [], "handoff": []}
        tokens: dict[str, set[tuple[int, ...]]] = {"store": set(), "handoff": set()}
        for i in range(args.repeats):
            for name in runs:
                r = pipe.generate(
                    PrefillRequest(f"{name}-{i}", prompt, store=False), 2, handoff=name == "handoff"
                )
                runs[name].append((r.summary.timings["restore_s"], r.latency_s))
                tokens[name].add(tuple(r.summary.tokens))
    finally:
        pipe.shutdown()
        shutdown_ray()
    out: dict[str, Any] = {
        name: {
            "restore_s": statistics.median(x for x, _ in v),
            "request_s": statistics.median(y for _, y in v),
        }
        for name, v in runs.items()
    }
    out["handoff_over_store_restore"] = out["handoff"]["restore_s"] / out["store"]["restore_s"]
    out["same_tokens"] = tokens["store"] == tokens["handoff"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    server = start_server_process(
        ["--no-disk", "--memory-bytes", "2GiB", "--log-level", "WARNING"], workdir=workdir
    )
    target = server.target
    handoff = None
    try:
        runner = ModelRunner(args.model, num_threads=args.threads)
        runner.forward(runner.encode("warm up the kernels"), runner.empty_cache())
        results = {p: run_profile(args, target, runner, p) for p in args.profiles}
        if args.handoff:
            handoff = run_handoff(args, target, runner)
    finally:
        server.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "benchmark": "prefix_reuse",
        "config": {
            "prompt_tokens": args.prompt_tokens,
            "prefix_tokens": args.prefix_tokens,
            "chunk_tokens": args.chunk_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "model": runner.fingerprint,
            "quick": args.quick,
        },
        "goal": f"hit TTFT <= {GOAL} x recompute",
        "profiles": results,
    }
    if handoff is not None:
        report["handoff"] = handoff
    print(json.dumps(report, indent=2))
    parts = [
        f"{p}: hit {r['hit']['ttft_s']:.2f}s vs recompute {r['recompute']['ttft_s']:.2f}s = "
        f"{r['hit_over_recompute']:.3f}x (fetch-all {r['hit_fetch_all_over_recompute']:.3f}x), "
        f"first token {'same' if r['first_token_equal'] else 'DIFFERS'}, goal {'met' if r['goal_met'] else 'MISSED'}"
        for p, r in results.items()
    ]
    if handoff is not None:
        parts.append(
            f"decode restore via object refs {handoff['handoff']['restore_s']:.2f}s vs store "
            f"{handoff['store']['restore_s']:.2f}s = {handoff['handoff_over_store_restore']:.2f}x"
        )
    print(f"prefix_reuse {args.prompt_tokens} tokens ({args.prefix_tokens} shared): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
