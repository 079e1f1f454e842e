"""Codec stages: bit packing, rotation, scales, precision map, and error per profile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from transfer.codec import PROFILES, decode_layer, encode_layer
from transfer.codec.pack import pack_bits, packed_size, unpack_bits
from transfer.codec.profiles import CHANNEL, TOKEN, Tier, get_profile
from transfer.codec.quantize import decode_scales, encode_scales, scale_bases
from transfer.codec.rotate import rotate, unrotate
from transfer.codec.saliency import precision_map


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000])
def test_pack_round_trip(bits: int, count: int) -> None:
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_pack_layout_is_little_endian() -> None:
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    word = sum(c << (3 * i) for i, c in enumerate(codes.tolist()))
    assert pack_bits(codes, 3).tolist() == list(word.to_bytes(3, "little"))


@pytest.mark.parametrize("dim", [8, 64, 128])
def test_rotation_is_orthogonal_and_spreads_outliers(dim: int) -> None:
    x = torch.randn(3, 50, dim)
    x[..., 3] += 40.0  # an outlier channel
    y = rotate(x, seed=7)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(unrotate(y, seed=7), x, atol=1e-4)
    assert y.abs().amax() < 0.5 * x.abs().amax()
    assert not torch.allclose(rotate(x, seed=8), y)  # the seed matters


def test_scales_never_clip_and_are_tight() -> None:
    needed = torch.rand(1000) * 10 + 1e-3
    base = int(scale_bases(needed).item())  # one frame's base exponent
    got = decode_scales(encode_scales(needed, base), base)
    assert torch.all(got >= needed)
    assert torch.all(got <= needed * 2 ** (1 / 16) * 1.0001)


def test_precision_map_tiers() -> None:
    base = get_profile("balanced")
    prof = dataclasses.replace(
        base, tiers=(base.tiers[0], Tier(CHANNEL, 5, TOKEN, 4), base.tiers[-1]), salient_fraction=0.1
    )
    k = torch.randn(3, 256, 64)
    first = precision_map(k, prof, None, token_offset=0, context_end=None)
    assert first[: prof.sink_tokens].eq(0).all() and first[prof.sink_tokens :].ne(0).all()
    middle = precision_map(k, prof, None, token_offset=256, context_end=None)
    assert middle.ne(0).all()
    last = precision_map(k, prof, None, token_offset=256, context_end=512)
    assert last[-prof.recent_tokens :].eq(0).all() and last[: -prof.recent_tokens].ne(0).all()
    saliency = torch.zeros(256)
    saliency[100:110] = 1.0
    chosen = precision_map(k, prof, saliency, token_offset=256, context_end=None)
    assert chosen[100:110].eq(1).all()
    assert int(chosen.eq(1).sum()) == round(prof.salient_fraction * 256)
    assert int(chosen.eq(2).sum()) == 256 - round(prof.salient_fraction * 256)
    k2, v2 = decode_layer(encode_layer(k, k.clone(), prof, saliency=saliency, token_offset=256))
    assert k2.shape == k.shape  # a three-tier frame round-trips


def _rel_err(profile: str, k: torch.Tensor, v: torch.Tensor) -> tuple[float, int]:
    blob = encode_layer(k, v, profile)
    k2, v2 = decode_layer(blob, dtype=torch.float32)
    err = ((k2 - k.float()).norm() + (v2 - v.float()).norm()) / (k.float().norm() + v.float().norm())
    return float(err), len(blob)


def test_profiles_trade_size_for_error() -> None:
    gen = torch.Generator().manual_seed(1)
    k = (torch.randn(3, 256, 64, generator=gen) * 2 + torch.randn(1, 1, 64, generator=gen) * 4).half()
    v = torch.randn(3, 256, 64, generator=gen).half()
    fp16_bytes = 2 * k.numel() * 2
    errs = {p: _rel_err(p, k, v) for p in PROFILES}
    assert errs["lossless"][0] == 0.0
    assert errs["int8"][0] < 0.01
    assert errs["int8"][0] < errs["balanced"][0] < errs["dense"][0] < 0.2
    assert errs["lossless"][1] > errs["int8"][1] > errs["balanced"][1] > errs["dense"][1]
    assert fp16_bytes / errs["balanced"][1] >= 3.8
    assert fp16_bytes / errs["dense"][1] >= 5.5


def test_quantized_profiles_keep_sinks_sharp() -> None:
    k, v = torch.randn(3, 256, 64), torch.randn(3, 256, 64)
    k[:, 0] *= 30  # a sink-like token with a huge key
    k2, _ = decode_layer(encode_layer(k, v, "dense", token_offset=0))
    sink_err = (k2[:, 0] - k[:, 0]).norm() / k[:, 0].norm()
    assert sink_err < 0.02
