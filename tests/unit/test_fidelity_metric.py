"""The pieces of bench/codec_fidelity.py that decide its figures, checked without the model.

The greedy metric is only as good as its comparison (identical, and where two
continuations part), and a baseline is only honest if its size counts every
scale and zero it stores and its error stays within what its bits allow. The
tensors here are synthetic: they test arithmetic, not quality.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "codec_fidelity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("codec_fidelity_bench", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_identical_continuations_differ_nowhere(bench) -> None:
    assert bench.first_difference([5, 6, 7], [5, 6, 7]) == 3


@pytest.mark.parametrize(("got", "index"), [([9, 6, 7], 0), ([5, 9, 7], 1), ([5, 6, 9], 2), ([5, 9, 9], 1)])
def test_first_difference_is_the_first_token_that_parts(bench, got, index) -> None:
    assert bench.first_difference([5, 6, 7], got) == index


def test_continuations_of_different_lengths_are_an_error(bench) -> None:
    with pytest.raises(ValueError, match="length"):
        bench.first_difference([1, 2, 3], [1, 2])


def test_summary_counts_identical_and_takes_the_median(bench) -> None:
    per = [
        {"kl": 0.0, "top1": 1.0, "bits": 16, "elements": 4, "first_diff": d}
        for d in (bench.GREEDY, 3, 10, bench.GREEDY)
    ]
    got = bench.summarize(per)
    assert got["identical"] == "2/4"
    assert got["first_diff_median"] == (10 + bench.GREEDY) / 2
    assert got["ratio_vs_fp16"] == 4.0


def test_every_held_out_text_exists(bench) -> None:
    names = {f.stem for f in bench.text_files()}
    assert bench.HELD_OUT.issubset(names)
    assert {n.split("_")[0] for n in bench.HELD_OUT} == set(bench.KINDS)  # every kind held out


def _kv(heads: int = 3, tokens: int = 256, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(heads, tokens, dim, generator=gen) * torch.linspace(0.2, 4.0, dim)  # channel spread
    v = torch.randn(heads, tokens, dim, generator=gen)
    return k.half().float(), v.half().float()  # fp16-representable, as the store holds the cache


def test_kivi4_counts_codes_scales_zeros_and_the_fp16_window(bench) -> None:
    k, v = _kv()
    h, t, d = k.shape
    # The last chunk of a 1,024-token context: its last 128 tokens are the fp16 window.
    _, _, used = bench.kivi(4)(k, v, 768, 1024)
    quantized = 2 * h * 128 * d
    assert used == quantized * 4 + quantized // 32 * 32 + 2 * h * 128 * d * 16
    # A chunk wholly before the window: 4 bits plus an fp16 scale and zero per 32 elements.
    _, _, used = bench.kivi(4)(k, v, 0, 1024)
    assert used / (k.numel() + v.numel()) == 4 + 32 / 32


def test_kivi4_keeps_the_recent_window_exact_and_bounds_the_rest(bench) -> None:
    k, v = _kv()
    k2, v2, _ = bench.kivi(4)(k, v, 768, 1024)
    assert torch.equal(k2[:, 128:], k[:, 128:]) and torch.equal(v2[:, 128:], v[:, 128:])
    # Asymmetric 4-bit: at most half a step (range / 15 / 2) off, plus fp16 rounding of scale and zero.
    k_range = k[:, :128].reshape(3, 4, 32, 64).amax(2) - k[:, :128].reshape(3, 4, 32, 64).amin(2)
    k_bound = (k_range / 15 * 0.51 + 1e-2).repeat_interleave(32, 1)
    assert ((k2[:, :128] - k[:, :128]).abs() <= k_bound).all()
    v_range = v[:, :128].reshape(3, 128, 2, 32).amax(-1) - v[:, :128].reshape(3, 128, 2, 32).amin(-1)
    v_bound = (v_range / 15 * 0.51 + 1e-2).repeat_interleave(32, -1)
    assert ((v2[:, :128] - v[:, :128]).abs() <= v_bound).all()
    assert not torch.equal(k2[:, :128], k[:, :128])  # it did quantize


def test_int4_g64_size_is_four_bits_plus_one_scale_and_zero_per_64(bench) -> None:
    k, v = _kv()
    _, _, used = bench.int_g64(4)(k, v, 0, 1024)
    assert used / (k.numel() + v.numel()) == 4.5
