"""Codec fidelity on the real model (small fixed sample of the bench's texts).

Uses the helpers of bench/codec_fidelity.py so the test and the bench measure
the same thing: a 1,024-token prefix cache cut into 256-token chunk frames,
64 teacher-forced tokens, KL and top-1 against the untouched cache.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "codec_fidelity.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("codec_fidelity_bench", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fidelity():
    from workers.model import load_model

    bench = _bench_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core runner, 2 spinning threads are ~20x slower than 1
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    cases = [bench.build_case(model, tokenizer, f) for f in bench.text_files(2)]  # one prose, one code

    def measure(method) -> dict[str, float]:
        per = [bench.evaluate(model, case, method) for case in cases]
        bits = sum(r["bits"] for r in per) / sum(r["elements"] for r in per)
        return {
            "ratio": 16 / bits,
            "kl": sum(r["kl"] for r in per) / len(per),
            "top1": sum(r["top1"] for r in per) / len(per),
        }

    yield bench, measure
    torch.set_grad_enabled(True)
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_lossless_round_trip_leaves_logits_unchanged(fidelity) -> None:
    bench, measure = fidelity
    got = measure(bench.codec_method("lossless", source_dtype=torch.float32))
    assert got["kl"] < 1e-7 and got["top1"] == 1.0


@pytest.mark.slow
def test_balanced_beats_int4_g64_on_kl_at_a_higher_ratio(fidelity) -> None:
    bench, measure = fidelity
    balanced = measure(bench.codec_method("balanced"))
    int4 = measure(bench.int_g64(4))
    assert balanced["ratio"] > int4["ratio"] > 3.4
    assert balanced["kl"] < int4["kl"]
    assert balanced["top1"] >= 0.9
