"""vLLM (CPU build) serving a shared-prefix workload: recompute vs kvstore hit vs vLLM's own prefix cache.

Workload: a ``--prefix-tokens`` shared prefix (a real document, tokenized) followed by varied
suffixes (a different question each). Same run, one engine per column, each in its own process
(vLLM keeps one KV connector per process), all against one ``kvstore serve`` child process:

* ``recompute``: no connector, vLLM's prefix caching off: every request prefills everything.
* ``store/<profile>``: the kvstore connector with that codec profile, prefix caching off. A first
  request computes the prefix and saves it; the measured requests load it layer by layer.
* ``prefix_cache``: no connector, vLLM's in-memory prefix caching on (the floor).

TTFT is one request's wall time with ``max_tokens=1`` (prefill + first token), the median of the
measured requests. The recompute and prefix-cache engines stay up for the whole run and the store
engines are started one profile at a time; every measured prompt is sent to recompute, store and
prefix cache in turn, so all columns see the same machine load. Per profile: TTFT and its ratio to the same-run recompute, the bytes loaded,
loaded MB/s (encoded bytes / hit TTFT), and the break-even rate: the prefix's KV bytes divided by
the recompute time, the transfer rate at which loading costs what recomputing does (a store slower
than this makes a hit a loss). Goals (issue 22): store-hit TTFT <= 0.10 x recompute and <= 2 x vLLM's
own prefix-cache hit (same run). With ``lossless`` the first token of every hit must equal
recompute's, which is checked.

``stall``: a request decodes 64 tokens; after 3 of its steps a prompt whose 2,048-token prefix is in
the store arrives. Per load mode (``async``, ``layerwise``), the median decode-step time of the running
request while the load is in flight (arrived, no token yet), against the median step before it
arrived (same engine, same run). Goal for ``async``: <= 1.2x.

Runs under the vLLM environment (``.venv-vllm``, made by ``make install-vllm``); started with another
interpreter it re-executes itself there. Prints one JSON document, then a one-line summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("vllm") is None and __name__ == "__main__":
    venv_python = ROOT / ".venv-vllm" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        # The venv has no kvstore install of its own: it imports this checkout.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        os.execve(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]], env)
    sys.exit("vLLM is not installed: run `make install-vllm` (it makes .venv-vllm)")

from kvstore.testing import bench_args as ba  # noqa: E402
from kvstore.testing.store import start_server_process  # noqa: E402
from transfer.codec.profiles import PROFILES  # noqa: E402
from transfer.vllm.harness import EngineProcess, connector_config  # noqa: E402
from workers.vllm_checkpoint import vllm_checkpoint  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
QUESTIONS = [
    " Summarise the text above in one sentence:",
    " Which obligations does it put on a distributor?",
    " What happens to a contributor's patent licence?",
    " List three defined terms it uses:",
    " Who may grant additional permissions?",
    " What does it say about trademarks?",
]


def workload(model_dir: str, prefix_tokens: int, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "".join(
        (ROOT / "bench" / "data" / name).read_text()
        for name in ("prose_license_apache_2_0.txt", "prose_license_gpl_3.txt")
    )
    prefix = tok(text)["input_ids"][:prefix_tokens]
    if len(prefix) < prefix_tokens:
        raise SystemExit(f"bench data holds only {len(prefix)} tokens")
    return [prefix + tok(QUESTIONS[i % len(QUESTIONS)])["input_ids"] for i in range(n)]


class Column:
    """One engine of the comparison: warmed once, then measured request by request."""

    def __init__(self, model_dir: str, log_dir: Path, name: str, **engine: Any) -> None:
        self.name = name
        self.engine = EngineProcess(model_dir, log_path=str(log_dir / f"{name}.log"), **engine)
        self.completions: list[Any] = []
        self.before: dict[str, Any] | None = None

    def warm(self, prompt: list[int]) -> None:
        """Compute (and, with a connector, save) the shared prefix once."""
        self.warm_s = self.engine.generate([prompt], max_tokens=1)[0].seconds
        self.before = self.engine.stats()

    def measure(self, prompt: list[int]) -> None:
        self.completions.extend(self.engine.generate([prompt], max_tokens=1))

    def report(self) -> dict[str, Any]:
        after = self.engine.stats()
        self.engine.close()
        seconds = [c.seconds for c in self.completions]
        out: dict[str, Any] = {
            "startup_s": round(self.engine.startup_s, 2),
            "warm_s": round(self.warm_s, 4),
            "ttft_s": [round(x, 4) for x in seconds],
            "ttft_median_s": round(statistics.median(seconds), 4),
            "cached_tokens": [c.num_cached_tokens for c in self.completions],
            "first_tokens": [c.token_ids[0] for c in self.completions],
        }
        if self.before is not None and after is not None:
            out["connector"] = {
                k: after[k] - self.before[k]
                for k in (
                    "offered_tokens",
                    "loaded_tokens",
                    "loaded_bytes",
                    "load_errors",
                    "layer_waits",
                    "layer_wait_s",
                    "lookup_errors",
                )
            }
            out["saved_bytes_warm"] = self.before["saved_bytes"]
        return out


def stall(
    model_dir: str, log_dir: Path, target: str, mode: str, prompts: list[list[int]], common: dict[str, Any]
) -> dict[str, Any]:
    """Decode steps of a running request while a stored prefix loads (``prompts[0]`` was saved)."""
    kv = connector_config(target, profile="lossless", load_mode=mode)
    with EngineProcess(model_dir, kv=kv, log_path=str(log_dir / f"stall-{mode}.log"), **common) as eng:
        running = prompts[0][-200:]
        eng.interleave(running, 8, prompts[1], after_steps=2)  # warm-up (and prompts[1] saved if new)
        runs = [eng.interleave(running, 64, p, after_steps=3) for p in prompts[1:4]]
    before = [dt for r in runs for phase, dt in r["steps"] if phase == "before"]
    loading = [dt for r in runs for phase, dt in r["steps"] if phase == "loading"]
    return {
        "step_before_median_ms": round(1e3 * statistics.median(before), 2),
        "step_loading_median_ms": round(1e3 * statistics.median(loading), 2),
        "step_loading_max_ms": round(1e3 * max(loading), 2),
        "steps_while_loading": [sum(1 for ph, _ in r["steps"] if ph == "loading") for r in runs],
        "arriving_cached_tokens": [r["arriving_cached"] for r in runs],
        "ratio": round(statistics.median(loading) / statistics.median(before), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix-tokens", type=ba.positive_int, default=2048)
    ap.add_argument(
        "--requests", type=ba.positive_int, default=5, help="measured requests per column (after one warm-up)"
    )
    ap.add_argument("--no-stall", action="store_true", help="skip the decode-stall columns")
    ap.add_argument(
        "--profiles",
        type=ba.names(PROFILES, "codec profile"),
        default="lossless,balanced",
        help="comma-separated codec profiles",
    )
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_dir = str(vllm_checkpoint())
    prompts = workload(model_dir, args.prefix_tokens, args.requests + 1)
    kv_bytes_fp = args.prefix_tokens * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # bf16/fp16 KV of the prefix
    log_dir = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    common = {"dtype": args.dtype, "max_model_len": max(4096, args.prefix_tokens + 256)}
    result: dict[str, Any] = {
        "bench": "vllm_prefix",
        "prefix_tokens": args.prefix_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "requests": args.requests,
        "kv_bytes_bf16": kv_bytes_fp,
        "logs": str(log_dir),
        "store": {},
    }
    # Columns run side by side and are measured interleaved, request by request (recompute, store hit,
    # prefix-cache hit, next prompt, ...), so a burst of load on the machine hits every column alike.
    with start_server_process(["--no-disk", "--memory-bytes", "2GiB"], workdir=log_dir) as store:
        recompute = Column(model_dir, log_dir, "recompute", **common)
        cache = Column(model_dir, log_dir, "prefix_cache", prefix_caching=True, **common)
        cache.warm(prompts[0])
        recompute.warm_s = 0.0
        for profile in [p for p in args.profiles.split(",") if p]:
            hit = Column(
                model_dir,
                log_dir,
                f"store-{profile}",
                kv=connector_config(store.target, profile=profile),
                **common,
            )
            hit.warm(prompts[0])
            for prompt in prompts[1:]:
                recompute.measure(prompt)
                hit.measure(prompt)
                cache.measure(prompt)
            result["store"][profile] = hit.report()
        if not args.no_stall:
            result["stall"] = {
                mode: stall(model_dir, log_dir, store.target, mode, prompts, common)
                for mode in ("async", "layerwise")
            }
        rec = recompute.report()
        pc = cache.report()
    result["recompute"] = rec
    result["prefix_cache"] = pc
    pc["ratio_to_recompute"] = round(pc["ttft_median_s"] / rec["ttft_median_s"], 4)
    for profile, col in result["store"].items():
        conn = col["connector"]
        ttft = col["ttft_median_s"]
        n = len(col["ttft_s"])
        col["ratio_to_recompute"] = round(ttft / rec["ttft_median_s"], 4)
        col["loaded_MBps"] = round(conn["loaded_bytes"] / n / ttft / 1e6, 1)
        col["break_even_MBps"] = round(conn["loaded_bytes"] / n / rec["ttft_median_s"] / 1e6, 1)
        col["break_even_s_per_MB"] = round(rec["ttft_median_s"] / (conn["loaded_bytes"] / n / 1e6), 4)
        col["layer_wait_ms_per_request"] = round(1e3 * conn["layer_wait_s"] / n, 2)
        col["first_token_matches_recompute"] = col["first_tokens"] == rec["first_tokens"][:n]
        if profile == "lossless" and not col["first_token_matches_recompute"]:
            raise SystemExit(
                f"lossless hit changed the first token: {col['first_tokens']} vs {rec['first_tokens']}"
            )
    result["break_even_MBps_bf16"] = round(kv_bytes_fp / rec["ttft_median_s"] / 1e6, 1)
    for col in result["store"].values():
        col["ratio_to_prefix_cache"] = round(col["ttft_median_s"] / pc["ttft_median_s"], 3)
    met = all(
        c["ratio_to_recompute"] <= 0.10 and c["ratio_to_prefix_cache"] <= 2.0
        for c in result["store"].values()
    )
    stall_ratio = result.get("stall", {}).get("async", {}).get("ratio")
    result["goal"] = {
        "store_hit_ttft_le_x_recompute": 0.10,
        "store_hit_ttft_le_x_prefix_cache": 2.0,
        "async_decode_step_while_loading_le_x": 1.2,
        "met": bool(met and (stall_ratio is None or stall_ratio <= 1.2)),
    }
    print(json.dumps(result, indent=2))
    parts = [f"recompute {rec['ttft_median_s'] * 1e3:.0f} ms"]
    for profile, col in result["store"].items():
        parts.append(
            f"{profile} hit {col['ttft_median_s'] * 1e3:.0f} ms ({col['ratio_to_recompute']:.3f}x, "
            f"{col['ratio_to_prefix_cache']:.2f}x prefix cache, {col['loaded_MBps']} MB/s)"
        )
    for mode, st in result.get("stall", {}).items():
        parts.append(f"decode step while loading, {mode}: {st['ratio']:.2f}x")
    parts.append(f"prefix cache {pc['ttft_median_s'] * 1e3:.0f} ms ({pc['ratio_to_recompute']:.3f}x)")
    print(
        f"vllm_prefix {args.prefix_tokens} tokens: "
        + "; ".join(parts)
        + f"; goals {'met' if result['goal']['met'] else 'not met'}"
    )


if __name__ == "__main__":
    main()
