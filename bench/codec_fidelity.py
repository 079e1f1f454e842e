"""Codec fidelity on the real model: size vs next-token agreement, per profile and per baseline.

For each text: run the model on a 1,024-token prefix to get its KV cache, cut
that cache into 256-token chunks per layer (one frame each, as the store keeps
it), round-trip every chunk through a method, then teacher-force the next 64
tokens on the original and on the round-tripped cache and compare the two
next-token distributions (mean KL(ref || method), top-1 agreement). Size is
bits per element of K and V with every byte of metadata counted (for codec
profiles: the whole sealed frame).

Baselines in the same run: fp8 e4m3, per-token int8/int4/int2 with groups of
64 (fp16 scale and zero per group), KIVI-style 4- and 2-bit (K per-channel and
V per-token in groups of 32, fp16 scale and zero, the last 128 tokens of the
context kept in fp16).

    python bench/codec_fidelity.py            # 24 texts (12 prose, 12 code)
    python bench/codec_fidelity.py --quick    # 2 texts
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.testing import bench_args as ba
from transfer.codec import decode_layer, encode_layer
from transfer.codec.profiles import PROFILES

DATA = Path(__file__).resolve().parent / "data"
PREFIX, SUFFIX, CHUNK = 1024, 64, 256
# A method maps one chunk-layer (k, v, token_offset) to (k', v', bits used).
Method = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, int]]


@dataclass
class Case:
    """One text: its token ids, the prefix cache as per-layer (K, V), and reference log-probs."""

    name: str
    ids: torch.Tensor
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    ref: torch.Tensor


def text_files(count: int) -> list[Path]:
    """``count`` texts alternating prose and code, in a fixed order."""
    files = sorted(DATA.glob("*.txt"))
    prose = [f for f in files if f.name.startswith("prose_")]
    code = [f for f in files if f.name.startswith("code_")]
    mixed = [f for pair in zip(prose, code, strict=False) for f in pair]
    return mixed[:count]


def _suffix_logprobs(model, ids: torch.Tensor, layers) -> torch.Tensor:
    from workers.model import layers_to_cache

    cache = layers_to_cache(layers, model.config)
    out = model(ids[:, PREFIX : PREFIX + SUFFIX], cache=cache, use_cache=True)
    return out.logits[0].float().log_softmax(-1)


@torch.no_grad()
def build_case(model, tokenizer, path: Path) -> Case:
    from workers.model import cache_to_layers

    ids = tokenizer(path.read_text(), return_tensors="pt")["input_ids"][:, : PREFIX + SUFFIX]
    if ids.shape[1] < PREFIX + SUFFIX:
        raise ValueError(f"{path.name} has {ids.shape[1]} tokens, needs {PREFIX + SUFFIX}")
    out = model(ids[:, :PREFIX], use_cache=True)
    layers = [(k.clone(), v.clone()) for k, v in cache_to_layers(out.past_key_values)]
    return Case(path.stem, ids, layers, _suffix_logprobs(model, ids, layers))


@torch.no_grad()
def evaluate(model, case: Case, method: Method) -> dict[str, float]:
    """Round-trip every chunk-layer of ``case`` through ``method``; KL, top-1 and bits."""
    bits = elements = 0
    layers = []
    for k, v in case.layers:
        ks, vs = [], []
        for start in range(0, k.shape[1], CHUNK):
            kc, vc = k[:, start : start + CHUNK], v[:, start : start + CHUNK]
            k2, v2, used = method(kc, vc, start)
            ks.append(k2.to(k.dtype))
            vs.append(v2.to(v.dtype))
            bits += used
            elements += kc.numel() + vc.numel()
        layers.append((torch.cat(ks, 1), torch.cat(vs, 1)))
    lp = _suffix_logprobs(model, case.ids, layers)
    kl = (case.ref.exp() * (case.ref - lp)).sum(-1).mean().item()
    top1 = (case.ref.argmax(-1) == lp.argmax(-1)).float().mean().item()
    return {"kl": kl, "top1": top1, "bits": bits, "elements": elements}


def codec_method(profile: str, source_dtype: torch.dtype = torch.float16) -> Method:
    """The codec as a method: encode the fp16 cache (as the store would hold it), decode, count the frame."""

    def run(k: torch.Tensor, v: torch.Tensor, offset: int):
        blob = encode_layer(
            k.to(source_dtype), v.to(source_dtype), profile, token_offset=offset, context_end=PREFIX
        )
        k2, v2 = decode_layer(blob, dtype=torch.float32)
        return k2, v2, 8 * len(blob)

    return run


# ---- baselines (fake-quantized; sizes computed from their storage layout) ----


def _asym(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max quantization along ``dim`` (each slice one group)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
    lo = lo.half().float()
    return ((x - lo) / scale).round().clamp(0, levels) * scale + lo


def _per_token(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    h, t, d = x.shape
    return _asym(x.reshape(h, t, d // group, group), bits, -1).reshape(h, t, d)


def _per_channel(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    h, t, d = x.shape
    full = t // group * group
    out = x.clone()
    if full:
        out[:, :full] = _asym(x[:, :full].reshape(h, t // group, group, d), bits, 2).reshape(h, full, d)
    if t > full:  # KIVI keeps the tail that does not fill a group in full precision
        out[:, full:] = x[:, full:].half().float()
    return out


def int_g64(bits: int) -> Method:
    def run(k, v, offset):
        n = k.numel() + v.numel()
        return _per_token(k, bits, 64), _per_token(v, bits, 64), n * bits + n // 64 * 32

    return run


def kivi(bits: int, group: int = 32, residual: int = 128) -> Method:
    def run(k, v, offset):
        h, t, d = k.shape
        keep = max(0, min(t, offset + t - (PREFIX - residual)))  # context tail kept in fp16
        q = t - keep
        k2, v2 = k.clone(), v.clone()
        k2[:, :q] = _per_channel(k[:, :q], bits, group)
        v2[:, :q] = _per_token(v[:, :q], bits, group)
        k2[:, q:], v2[:, q:] = k[:, q:].half().float(), v[:, q:].half().float()
        n_q = 2 * h * q * d
        bits_used = n_q * bits + n_q // group * 32 + 2 * h * keep * d * 16
        return k2, v2, bits_used

    return run


def fp8(k, v, offset):
    n = k.numel() + v.numel()
    cast = torch.float8_e4m3fn
    return k.to(cast).float(), v.to(cast).float(), 8 * n


def methods(profiles: list[str]) -> dict[str, Method]:
    out: dict[str, Method] = {f"codec:{p}": codec_method(p) for p in profiles}
    out.update(
        {
            "fp8-e4m3": fp8,
            "int8-g64": int_g64(8),
            "int4-g64": int_g64(4),
            "int2-g64": int_g64(2),
            "kivi-4": kivi(4),
            "kivi-2": kivi(2),
        }
    )
    return out


def load_cases(model, tokenizer, texts: int, cache: Path | None = None) -> list[Case]:
    """Build (or reuse from ``cache``, a torch.save file) the cases for the first ``texts`` texts."""
    files = text_files(texts)
    if cache is not None and cache.is_file():
        saved = {c.name: c for c in torch.load(cache, weights_only=False)}
        if all(f.stem in saved for f in files):
            return [saved[f.stem] for f in files]
    cases = [build_case(model, tokenizer, f) for f in files]
    if cache is not None:
        torch.save(cases, cache)
    return cases


def run(texts: int, profiles: list[str], only: list[str] | None = None, cache: Path | None = None) -> dict:
    from workers.model import load_model

    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    t0 = time.perf_counter()
    cases = load_cases(model, tokenizer, texts, cache)
    prefill_s = time.perf_counter() - t0
    results = {}
    for name, method in methods(profiles).items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        per = [evaluate(model, c, method) for c in cases]
        bits = sum(r["bits"] for r in per) / sum(r["elements"] for r in per)
        results[name] = {
            "bits_per_element": round(bits, 4),
            "ratio_vs_fp16": round(16 / bits, 3),
            "mean_kl": round(sum(r["kl"] for r in per) / len(per), 5),
            "top1": round(sum(r["top1"] for r in per) / len(per), 4),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return {
        "model": "SmolLM2-135M-Instruct",
        "texts": [c.name for c in cases],
        "prefix_tokens": PREFIX,
        "teacher_forced_tokens": SUFFIX,
        "chunk_tokens": CHUNK,
        "prefill_seconds": round(prefill_s, 1),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 texts (~1 minute)")
    ap.add_argument(
        "--texts", type=ba.positive_int, default=24, help="number of texts (alternating prose and code)"
    )
    ap.add_argument(
        "--profiles", type=ba.names(PROFILES, "codec profile"), default="lossless,int8,balanced,dense"
    )
    ap.add_argument("--only", default="", help="comma-separated method names to run (default all)")
    ap.add_argument("--json", type=ba.file_in_existing_dir, help="also write the JSON here")
    ap.add_argument(
        "--threads",
        type=ba.non_negative_int,
        default=1,
        help="torch threads (default 1: on a shared 2-core box more threads spin and run 20x slower)",
    )
    ap.add_argument("--cache", type=Path, help="reuse prefix caches saved here (torch.save) across runs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(
        2 if args.quick else args.texts,
        args.profiles.split(","),
        [m for m in args.only.split(",") if m] or None,
        args.cache,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    res = report["results"]
    print(
        "summary: "
        + "; ".join(
            f"{n} {r['ratio_vs_fp16']}x KL={r['mean_kl']} top1={r['top1']:.3f}" for n, r in res.items()
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
