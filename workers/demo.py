"""``kvstore demo``: disaggregated prefill and decode over Ray, KV moved through a kvstore server.

What it does, end to end:

1. starts a local Ray with one prefill and one decode actor (each loads the
   model), or joins an existing Ray cluster (``--ray-address``, default
   ``$RAY_ADDRESS``, which ``ray job submit`` sets for its drivers);
   ``--pin-roles`` puts the actors on the nodes advertising the ``prefill`` /
   ``decode`` custom resources (the KubeRay worker groups);
2. starts a kvstore server in this process (RAM + disk tiers, a free port,
   a temporary directory unless ``--store-dir``), or uses an existing one
   (``--store-target``, default ``$KVSTORE_TARGET``; bearer token ``--token``,
   default ``$KVSTORE_TOKEN``); a target listing several replicas or naming a
   headless Service (``dns:///NAME:PORT``) gets the cluster client, with
   ``--replication`` / ``$KVSTORE_REPLICATION`` and ``--write-ack`` /
   ``$KVSTORE_WRITE_ACK``;
3. builds a batch of chat prompts that share long prefixes: one system prompt,
   a few documents, several questions per document (``workers/data``);
4. warms every worker (codec kernels compiled or loaded, one forward pass) and
   reports that time on its own line, so no timed request pays a one-off cost;
5. measures the no-reuse baseline: every prompt prefilled from scratch, nothing stored;
6. for each codec profile, runs the batch through the pipeline: prefill reuses
   whatever prefix is stored and stores the new chunks, decode picks the
   request up from the store and streams the answer;
7. prints a table per profile: chunk hit rate, tokens reused, TTFT with and
   without reuse, bytes stored against raw fp16, decode speed.

Configuration is resolved once, in :func:`parse_args`: flags, then the
environment, then defaults. Sizes are chosen to finish in a few minutes on two
CPU cores; see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SIZES = {"tiny": (1, 2), "small": (2, 2), "medium": (3, 3), "large": (4, 3)}
DOCUMENTS = ("doc_apache.txt", "doc_bsd.txt", "doc_python_with.txt", "doc_mpl.txt")


@dataclass(frozen=True)
class DemoPrompt:
    request_id: str
    document: str
    question: str
    token_ids: tuple[int, ...]


@dataclass
class ProfileReport:
    """What one pass of the batch under one codec profile measured."""

    profile: str
    num_requests: int = 0
    reusable_chunks: int = 0
    reused_chunks: int = 0
    tokens_reused: int = 0
    tokens_prefilled: int = 0
    ttft_s: list[float] = field(default_factory=list)
    ttft_hit_s: list[float] = field(default_factory=list)
    ttft_hit_no_reuse_s: list[float] = field(default_factory=list)  # baseline TTFT of the same requests
    stored_bytes: int = 0
    fp16_bytes: int = 0
    decode_tokens_per_s: list[float] = field(default_factory=list)
    first_token_agree: int = 0

    def as_dict(self, baseline_ttft_s: float | None) -> dict[str, Any]:
        mean = statistics.fmean(self.ttft_s) if self.ttft_s else 0.0
        hit = statistics.fmean(self.ttft_hit_s) if self.ttft_hit_s else None
        hit_base = statistics.fmean(self.ttft_hit_no_reuse_s) if self.ttft_hit_no_reuse_s else None
        return {
            "profile": self.profile,
            "requests": self.num_requests,
            "chunk_hit_rate": self.reused_chunks / self.reusable_chunks if self.reusable_chunks else 0.0,
            "tokens_reused": self.tokens_reused,
            "tokens_prefilled": self.tokens_prefilled,
            "ttft_no_reuse_s": baseline_ttft_s,
            "ttft_with_reuse_s": mean,
            "ttft_hit_requests_s": hit,
            "ttft_hit_requests_no_reuse_s": hit_base,
            "hit_speedup": hit_base / hit if hit and hit_base else None,
            "stored_bytes": self.stored_bytes,
            "fp16_bytes": self.fp16_bytes,
            "stored_vs_fp16": self.stored_bytes / self.fp16_bytes if self.fp16_bytes else None,
            "decode_tokens_per_s": statistics.fmean(self.decode_tokens_per_s)
            if self.decode_tokens_per_s
            else 0.0,
            "first_token_agreement": self.first_token_agree / self.num_requests if self.num_requests else 0.0,
        }


def read_data(name: str) -> str:
    return resources.files("workers").joinpath("data", name).read_text(encoding="utf-8").strip()


def load_questions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in read_data("questions.txt").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        doc, _, question = line.partition("\t")
        out.setdefault(doc.strip(), []).append(question.strip())
    return out


def build_prompts(tokenizer: Any, num_docs: int, num_questions: int) -> list[DemoPrompt]:
    """Requests grouped by document, so each document's later questions reuse its prefix."""
    from workers.runner import chat_prompt_ids

    system = read_data("system.txt")
    questions = load_questions()
    prompts = []
    for doc in DOCUMENTS[:num_docs]:
        text = read_data(doc)
        for q in questions[doc][:num_questions]:
            ids = chat_prompt_ids(tokenizer, system, text, f"\n\nQuestion: {q}")
            prompts.append(DemoPrompt(f"{doc.removesuffix('.txt')}#{len(prompts)}", doc, q, tuple(ids)))
    return prompts


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The demo's whole configuration: flags win over the environment (``environ``, default
    ``os.environ``), which wins over defaults. Nothing after this reads the environment."""
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(
        prog="kvstore demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="documents x questions: " + ", ".join(f"{k}={d}x{q}" for k, (d, q) in SIZES.items()),
    )
    p.add_argument("--docs", type=int, help="number of documents (overrides --size)")
    p.add_argument("--questions", type=int, help="questions per document (overrides --size)")
    p.add_argument(
        "--profiles",
        default="lossless,balanced",
        help="comma-separated codec profiles, one pass each (lossless, int8, balanced, dense)",
    )
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--chunk-tokens", type=int, default=128, help="tokens per stored chunk")
    p.add_argument("--model", help="local HF model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--routing", choices=("least_loaded", "round_robin"), default="least_loaded")
    p.add_argument(
        "--ray-address",
        help="join this Ray cluster ('auto', 'host:port' or 'ray://host:port'); "
        "default $RAY_ADDRESS; unset: start a local Ray",
    )
    p.add_argument(
        "--num-cpus", type=int, help="CPUs given to the local Ray (default 2; not with --ray-address)"
    )
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs Ray reserves per worker actor (also its torch threads)",
    )
    p.add_argument(
        "--pin-roles",
        action="store_true",
        help="require the Ray custom resources {'prefill': 1} / {'decode': 1} per actor, as the "
        "KubeRay worker groups advertise them (a local Ray gets them added)",
    )
    p.add_argument(
        "--store-target",
        help="HOST:PORT of an existing kvstore server (or HOST:PORT,HOST:PORT,... / dns:///NAME:PORT "
        "for a cluster); default $KVSTORE_TARGET; unset: start one "
        "in this process",
    )
    p.add_argument("--token", help="bearer token for the store (default $KVSTORE_TOKEN)")
    p.add_argument(
        "--replication",
        type=int,
        help="copies of each chunk when the target lists several replicas or is dns:///NAME:PORT "
        "(default $KVSTORE_REPLICATION or 2)",
    )
    p.add_argument(
        "--write-ack",
        choices=("one", "all"),
        help="a put returns once one / all owners stored it (default $KVSTORE_WRITE_ACK or all)",
    )
    p.add_argument("--tenant", default="demo", help="namespace tenant (with auth: the token's tenant)")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-reuse TTFT baseline pass")
    p.add_argument("--no-layerwise", action="store_true", help="fetch whole prefixes before computing")
    p.add_argument(
        "--overlap",
        action="store_true",
        help="prefill the next request while the previous one decodes (faster; TTFTs then "
        "include contention with decode, so they no longer compare with the baseline)",
    )
    p.add_argument(
        "--handoff",
        action="store_true",
        help="decode gets the prompt's KV as Ray object refs from prefill instead of from the store",
    )
    p.add_argument(
        "--store-dir",
        help="disk tier directory of the in-process store (default: a temporary one, removed at exit)",
    )
    p.add_argument("--memory-bytes", default="512MiB", help="RAM tier budget of the in-process store")
    p.add_argument("--quiet", action="store_true", help="do not stream generated text")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args(argv)
    docs, questions = SIZES[args.size]
    args.docs = args.docs or docs
    args.questions = args.questions or questions
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    if not 1 <= args.docs <= len(DOCUMENTS) or not 1 <= args.questions <= 3:
        p.error(f"--docs must be 1..{len(DOCUMENTS)} and --questions 1..3")
    if not args.profiles or args.max_new_tokens < 1 or args.chunk_tokens < 1:
        p.error("need at least one profile, --max-new-tokens >= 1 and --chunk-tokens >= 1")
    from workers.prefill import check_profile

    for profile in args.profiles:
        try:
            check_profile(profile, "--profiles:")
        except ValueError as exc:
            p.error(str(exc))
    # An empty variable counts as unset, as it does for Ray and the kvstore CLI.
    args.ray_address = args.ray_address or env.get("RAY_ADDRESS") or None
    args.store_target = args.store_target or env.get("KVSTORE_TARGET") or None
    args.token = args.token or env.get("KVSTORE_TOKEN") or None
    if args.replication is None:
        text = env.get("KVSTORE_REPLICATION") or "2"
        if not text.strip().isdigit():
            p.error(f"KVSTORE_REPLICATION must be a whole number >= 1, got {text!r}")
        args.replication = int(text)
    if args.replication < 1:
        p.error("--replication (or $KVSTORE_REPLICATION) must be >= 1")
    args.write_ack = args.write_ack or env.get("KVSTORE_WRITE_ACK") or "all"
    from transfer.replicas.routing import check_write_ack

    try:
        check_write_ack(args.write_ack, "--write-ack (or $KVSTORE_WRITE_ACK)")
    except ValueError as exc:
        p.error(str(exc))
    if args.ray_address and args.num_cpus is not None:
        p.error(
            "--num-cpus sizes a local Ray; it cannot be used when joining a cluster (--ray-address "
            "or $RAY_ADDRESS)"
        )
    if args.num_cpus is not None and args.num_cpus < 1:
        p.error("--num-cpus must be >= 1")
    if args.cpus_per_actor <= 0:
        p.error("--cpus-per-actor must be positive")
    if args.store_target and args.store_dir:
        p.error(
            "--store-dir configures the in-process store; it cannot be used with --store-target "
            "(or $KVSTORE_TARGET)"
        )
    return args


def ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """``init_ray`` arguments for the parsed flags: a local Ray also advertises the role resources when
    ``--pin-roles`` asks for them, so pinned actors can be placed on one machine."""
    if args.ray_address:
        return {"address": args.ray_address}
    options: dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.pin_roles:
        options["resources"] = {"prefill": float(args.prefill_workers), "decode": float(args.decode_workers)}
    return options


def pipeline_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Pipeline`` keyword arguments for the parsed flags."""
    from workers.pipeline import ROLE_RESOURCES

    options: dict[str, Any] = {
        "num_prefill": args.prefill_workers,
        "num_decode": args.decode_workers,
        "routing": args.routing,
        "num_cpus_per_actor": args.cpus_per_actor,
    }
    if args.pin_roles:
        options["prefill_resources"] = ROLE_RESOURCES["prefill"]
        options["decode_resources"] = ROLE_RESOURCES["decode"]
    return options


def start_store(store_dir: Path, memory_bytes: str) -> Any:
    from kvstore.config import load_config
    from kvstore.server import serve

    config = load_config(
        None,
        environ={},
        overrides={
            "server.port": 0,
            "memory.max_bytes": memory_bytes,
            "disk.path": str(store_dir / "disk"),
            "disk.fsync": "never",
        },
    )
    return serve(config)


def run_baseline(pipeline: Any, prompts: Sequence[DemoPrompt], tqdm: Any) -> dict[str, float]:
    """TTFT of each prompt prefilled from scratch (no lookup used, nothing stored)."""
    from workers.prefill import PrefillRequest

    out = {}
    for p in tqdm(prompts, desc="baseline: prefill without reuse", unit="req", leave=False):
        handle = pipeline.prefill(
            PrefillRequest(f"baseline/{p.request_id}", p.token_ids, reuse=False, store=False)
        )
        out[p.request_id] = handle.timings["ttft_s"]
    return out


def run_profile(
    pipeline: Any,
    prompts: Sequence[DemoPrompt],
    profile: str,
    args: argparse.Namespace,
    tokenizer: Any,
    baseline: dict[str, float],
    tqdm: Any,
) -> ProfileReport:
    from workers.prefill import PrefillRequest

    report = ProfileReport(profile)
    requests = [PrefillRequest(f"{profile}/{p.request_id}", p.token_ids, profile=profile) for p in prompts]
    # A progress bar and streamed text would fight over the terminal line: the bar is shown
    # only with --quiet; streamed runs number their requests instead.
    bar = tqdm(total=len(requests), desc=f"{profile}: prefill + decode", unit="req", disable=not args.quiet)
    streamed: list[int] = []
    by_id = {f"{profile}/{p.request_id}": p for p in prompts}

    def on_token(event: Any) -> None:
        if args.quiet:
            return
        before = tokenizer.decode(streamed, skip_special_tokens=True)
        streamed.append(event.token)
        sys.stdout.write(tokenizer.decode(streamed, skip_special_tokens=True)[len(before) :])
        sys.stdout.flush()

    def on_handle(h: Any) -> None:
        p = by_id[h.request_id]
        base = baseline.get(p.request_id)
        if args.quiet:
            return
        print(
            f"[{profile} {report.num_requests + 1}/{len(requests)}] {p.document}, {h.num_tokens} tokens: "
            f"reused {h.num_cached_tokens}, prefilled {h.num_prefilled_tokens}, TTFT {h.timings['ttft_s']:.2f}s"
            + (f" (no reuse {base:.2f}s)" if base is not None else "")
        )
        sys.stdout.write(f"  Q: {p.question}\n  A: ")
        sys.stdout.flush()

    for result in pipeline.run(
        requests, args.max_new_tokens, on_token, on_handle, overlap=args.overlap, handoff=args.handoff
    ):
        h, s = result.handle, result.summary
        streamed.clear()
        c = h.chunk_tokens
        report.num_requests += 1
        report.reusable_chunks += h.boundary // c
        report.reused_chunks += h.num_cached_tokens // c
        report.tokens_reused += h.num_cached_tokens
        report.tokens_prefilled += h.num_prefilled_tokens
        report.ttft_s.append(h.timings["ttft_s"])
        if h.num_cached_tokens:
            report.ttft_hit_s.append(h.timings["ttft_s"])
            base = baseline.get(by_id[h.request_id].request_id)
            if base is not None:
                report.ttft_hit_no_reuse_s.append(base)
        report.stored_bytes += h.stored_bytes
        report.fp16_bytes += h.fp16_bytes
        report.decode_tokens_per_s.append(s.tokens_per_s)
        report.first_token_agree += int(s.first_token_match)
        if not args.quiet:
            print(
                f"\n    ({len(s.tokens)} tokens, {s.tokens_per_s:.1f} tok/s; decode fetched "
                f"{s.num_fetched_tokens} prompt tokens from the store, recomputed {s.num_recomputed_tokens})\n"
            )
        bar.update(1)
    bar.close()
    return report


def print_table(rows: list[dict[str, Any]], fp16_note: str) -> None:
    def fmt_s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}s"

    def fmt_b(n: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
            n /= 1024
        return str(n)

    header = [
        "profile",
        "reqs",
        "hit rate",
        "reused",
        "prefilled",
        "TTFT no reuse",
        "TTFT reuse",
        "hits: reuse/none",
        "speedup",
        "stored",
        "fp16",
        "vs fp16",
        "decode",
        "1st tok",
    ]
    lines = [header]
    for r in rows:
        lines.append(
            [
                r["profile"],
                str(r["requests"]),
                f"{100 * r['chunk_hit_rate']:.0f}%",
                str(r["tokens_reused"]),
                str(r["tokens_prefilled"]),
                fmt_s(r["ttft_no_reuse_s"]),
                fmt_s(r["ttft_with_reuse_s"]),
                f"{fmt_s(r['ttft_hit_requests_s'])}/{fmt_s(r['ttft_hit_requests_no_reuse_s'])}",
                "-" if r["hit_speedup"] is None else f"{r['hit_speedup']:.1f}x",
                fmt_b(r["stored_bytes"]),
                fmt_b(r["fp16_bytes"]),
                "-" if r["stored_vs_fp16"] is None else f"{r['stored_vs_fp16']:.2f}x",
                f"{r['decode_tokens_per_s']:.1f} t/s",
                f"{100 * r['first_token_agreement']:.0f}%",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for i, row in enumerate(lines):
        print(
            "  ".join(
                cell.rjust(w) if j else cell.ljust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(fp16_note)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from workers.model import load_tokenizer
    from workers.pipeline import Pipeline, init_ray, shutdown_ray
    from workers.prefill import WorkerConfig

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    prompts = build_prompts(tokenizer, args.docs, args.questions)
    own_store = args.store_target is None
    store_dir = None
    if own_store:
        store_dir = Path(args.store_dir) if args.store_dir else Path(tempfile.mkdtemp(prefix="kvstore-demo-"))
    ray_where = f"joining Ray at {args.ray_address}" if args.ray_address else "starting Ray"
    steps = tqdm(total=3, desc=ray_where, unit="step", leave=False)
    store = pipeline = None
    try:
        # Ray first: it forks daemons, which must not happen while this process runs a gRPC server.
        init_ray(**ray_options(args))
        steps.update(1)
        if own_store:
            steps.set_description("starting the store")
            store = start_store(store_dir, args.memory_bytes)
            target = store.target
        else:
            target = args.store_target
        steps.update(1)
        steps.set_description(f"store on {target}; loading the model in each worker")
        config = WorkerConfig(
            store_target=target,
            token=args.token,
            replication=args.replication,
            write_ack=args.write_ack,
            model_path=args.model,
            profile=args.profiles[0],
            tenant=args.tenant,
            chunk_tokens=args.chunk_tokens,
            layerwise=not args.no_layerwise,
        )
        pipeline = Pipeline(config, **pipeline_options(args))
        fingerprint = pipeline.wait_ready()
        steps.update(1)
        steps.close()
        lengths = [len(p.token_ids) for p in prompts]
        print(
            f"kvstore demo: {len(prompts)} requests ({args.docs} documents x {args.questions} questions, "
            f"{min(lengths)}-{max(lengths)} prompt tokens, chunks of {args.chunk_tokens}), model {fingerprint}, "
            f"store {target}{'' if own_store else ' (external)'}, Ray "
            f"{args.ray_address or 'local'}, {args.prefill_workers} prefill + {args.decode_workers} decode "
            f"workers{' pinned to their roles' if args.pin_roles else ''}"
        )
        # A fresh machine compiles the codec kernels on first use (~9 s): warm every worker before the
        # first timed request, or the first profile's TTFT reports that compilation as the codec's speed.
        warm_s = pipeline.warm_up(args.profiles)
        print(
            f"warm-up: codec kernels ({', '.join(args.profiles)}) and model ready in every worker in "
            f"{warm_s:.1f}s (not part of any timing below)"
        )
        baseline = {} if args.no_baseline else run_baseline(pipeline, prompts, tqdm)
        base_mean = statistics.fmean(baseline.values()) if baseline else None
        rows = []
        for profile in args.profiles:
            report = run_profile(pipeline, prompts, profile, args, tokenizer, baseline, tqdm)
            rows.append(report.as_dict(base_mean))
        print()
        print_table(
            rows,
            "TTFT: mean on the prefill worker (lookup + fetch + compute). 'hits' compares, for "
            "the requests that reused a prefix, their TTFT with reuse and in the no-reuse baseline. "
            "'vs fp16': stored bytes over raw fp16 K+V of the same chunks (the model is fp32, so "
            "lossless is ~1.8x). '1st tok': decode's recompute of the tail agreed with prefill.",
        )
        stats = _store_summary(config)
        print(f"store: {stats}; total {time.perf_counter() - t0:.0f}s")
        if args.json:
            print(json.dumps({"profiles": rows, "baseline_ttft_s": baseline, "store": stats}, indent=2))
        return 0
    finally:
        if pipeline is not None:
            pipeline.shutdown()
        shutdown_ray()  # on a cluster this only disconnects the driver
        if store is not None:
            store.stop(grace=0)
        if store_dir is not None and not args.store_dir:
            shutil.rmtree(store_dir, ignore_errors=True)


def _store_summary(config: Any) -> str:
    """One line of tier totals (over every replica of a cluster)."""
    with config.connect() as client:
        stats = client.stats()
        members = client.members() if hasattr(client, "members") else ()
    where = f" over {len(members)} replicas" if len(members) > 1 else ""
    return ", ".join(f"{t.name} {t.objects} objects / {t.bytes} B" for t in stats.tiers) + where


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
