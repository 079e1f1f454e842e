"""Frame format: lossless round trips, header, and every typed refusal."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
import torch

from kvstore.integrity import TRAILER_BYTES, is_intact, seal
from transfer.codec import (
    FORMAT_VERSION,
    PROFILES,
    CodecError,
    CorruptFrame,
    ShapeMismatch,
    TruncatedFrame,
    UnknownProfile,
    UnknownVersion,
    decode_layer,
    encode,
    encode_layer,
    read_header,
)
from transfer.codec.format import FLAG_ZSTD, HEADER_BYTES

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _kv(dtype: torch.dtype = torch.float16, heads: int = 3, tokens: int = 256, dim: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(heads, tokens, dim, generator=gen) * 3).to(dtype)
    v = torch.randn(heads, tokens, dim, generator=gen).to(dtype)
    return k, v


def _special(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    vals = [
        0.0,
        -0.0,
        float("inf"),
        float("-inf"),
        float("nan"),
        info.max,
        -info.max,
        info.tiny,
        info.tiny / 4,
        info.eps,
        1.0,
        -1.5,
    ]
    return torch.tensor(vals, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    k, v = _kv(dtype)
    k.view(-1)[:12] = _special(dtype)
    v.view(-1)[-12:] = _special(dtype)
    k2, v2 = decode_layer(encode_layer(k, v, "lossless"))
    assert k2.dtype == dtype and v2.dtype == dtype
    assert torch.equal(k2.view(INT_VIEW[dtype]), k.view(INT_VIEW[dtype]))
    assert torch.equal(v2.view(INT_VIEW[dtype]), v.view(INT_VIEW[dtype]))


def test_lossless_compresses_low_entropy_input() -> None:
    k = torch.zeros(3, 256, 64, dtype=torch.float16)
    blob = encode_layer(k, k.clone(), "lossless")
    assert len(blob) < 2_000
    assert torch.equal(decode_layer(blob)[0], k)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_header_describes_the_frame(profile: str) -> None:
    k, v = _kv(torch.bfloat16, heads=2, tokens=100, dim=32)
    blob = encode_layer(k, v, profile)
    header = read_header(blob)
    assert header.shape == (2, 100, 32)
    assert header.dtype == torch.bfloat16
    assert header.profile == profile
    assert header.version == FORMAT_VERSION
    assert is_intact(blob)  # the kvstore trailer, checkable without the codec
    k2, v2 = decode_layer(blob)
    assert k2.shape == k.shape and v2.shape == v.shape and k2.dtype == torch.bfloat16


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_encoding_is_deterministic(profile: str) -> None:
    k, v = _kv()
    assert encode_layer(k, v, profile) == encode_layer(k.clone(), v.clone(), profile)


def test_decode_dtype_override() -> None:
    k, v = _kv(torch.float16)
    k2, v2 = decode_layer(encode_layer(k, v, "lossless"), dtype=torch.float32)
    assert k2.dtype == torch.float32 and torch.equal(k2, k.float()) and torch.equal(v2, v.float())


def test_odd_shapes_round_trip() -> None:
    for heads, tokens, dim in [(1, 1, 8), (5, 7, 48), (2, 33, 128), (1, 0, 64)]:
        k, v = _kv(torch.float32, heads, tokens, dim)
        for profile in PROFILES:
            k2, v2 = decode_layer(encode_layer(k, v, profile))
            assert k2.shape == (heads, tokens, dim)
            if tokens:
                assert (k2 - k).abs().max() <= 0.5 * k.abs().max(), (profile, heads, tokens, dim)


def test_flipped_byte_is_corrupt_frame() -> None:
    blob = bytearray(encode_layer(*_kv(), "balanced"))
    blob[len(blob) // 2] ^= 0x40
    with pytest.raises(CorruptFrame, match="checksum"):
        decode_layer(bytes(blob))


def test_truncated_frame() -> None:
    blob = encode_layer(*_kv(), "balanced")
    for cut in (0, 10, HEADER_BYTES + 5, len(blob) - 1):
        with pytest.raises(TruncatedFrame):
            decode_layer(blob[:cut])


def _reseal(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    payload = bytearray(blob[:-TRAILER_BYTES])
    struct.pack_into(fmt, payload, offset, value)
    return seal(bytes(payload))


def test_unknown_version() -> None:
    blob = _reseal(encode_layer(*_kv(), "int8"), 4, "<B", FORMAT_VERSION + 1)
    with pytest.raises(UnknownVersion, match="version"):
        decode_layer(blob)
    with pytest.raises(UnknownVersion):
        read_header(blob)


def test_unknown_profile() -> None:
    with pytest.raises(UnknownProfile, match="nope"):
        encode_layer(*_kv(), "nope")
    with pytest.raises(UnknownProfile):
        decode_layer(_reseal(encode_layer(*_kv(), "int8"), 5, "<B", 200))


def test_bad_magic_and_lengths_are_corrupt() -> None:
    blob = encode_layer(*_kv(), "dense")
    with pytest.raises(CorruptFrame, match="magic"):
        decode_layer(_reseal(blob, 0, "<4s", b"NOPE"))
    with pytest.raises(CorruptFrame):  # header claims a different shape than the body holds
        decode_layer(_reseal(blob, 10, "<I", 255))
    with pytest.raises(CorruptFrame):  # sealed garbage
        decode_layer(seal(b"\x00" * 64))


def test_all_errors_are_codec_errors() -> None:
    for exc in (UnknownVersion, UnknownProfile, TruncatedFrame, CorruptFrame, ShapeMismatch):
        assert issubclass(exc, CodecError)


@pytest.mark.parametrize(
    "k, v",
    [
        (torch.zeros(3, 4, 64), torch.zeros(3, 5, 64)),
        (torch.zeros(3, 4), torch.zeros(3, 4)),
        (torch.zeros(3, 4, 64, dtype=torch.int32), torch.zeros(3, 4, 64, dtype=torch.int32)),
        (torch.zeros(3, 4, 64, dtype=torch.float16), torch.zeros(3, 4, 64, dtype=torch.float32)),
        (torch.zeros(0, 4, 64), torch.zeros(0, 4, 64)),
    ],
)
def test_bad_inputs_are_shape_mismatch(k: torch.Tensor, v: torch.Tensor) -> None:
    with pytest.raises(ShapeMismatch):
        encode_layer(k, v, "balanced")


def test_bad_saliency_is_shape_mismatch() -> None:
    k, v = _kv()
    with pytest.raises(ShapeMismatch, match="saliency"):
        encode_layer(k, v, "balanced", saliency=torch.ones(7))


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("shape", [(3, 256, 64), (1, 7, 12), (2, 40, 32)])
def test_encode_in_one_pass_gives_the_same_frames_as_encode_layer(
    profile: str, shape: tuple[int, int, int]
) -> None:
    layers = [_kv(torch.float16, *shape, seed=i) for i in range(4)]
    layers[2] = (torch.zeros_like(layers[2][0]), layers[2][1])  # a layer with all-zero keys
    for offset, end in [(0, None), (256, 300)]:
        batched = encode(layers, profile, token_offset=offset, context_end=end, threads=1)
        single = [encode_layer(k, v, profile, token_offset=offset, context_end=end) for k, v in layers]
        assert batched == single


def test_encode_rejects_mixed_layers() -> None:
    with pytest.raises(ShapeMismatch):
        encode([_kv(), _kv(tokens=8)], "balanced", threads=1)
    with pytest.raises(ShapeMismatch):
        encode([_kv(), _kv(tokens=8)], "balanced")  # split over the codec threads: still refused
    assert encode([], "balanced") == []
    with pytest.raises(ValueError, match="threads"):
        encode([_kv()], "balanced", threads=0)


def test_zstd_is_kept_only_where_the_profile_says_it_pays() -> None:
    gen = torch.Generator().manual_seed(5)
    k = (torch.randn(3, 256, 64, generator=gen) * 2).half()
    v = torch.randn(3, 256, 64, generator=gen).half()
    frames = {}
    for ratio in (1.0, 0.05):  # keep any saving / demand a 95% saving (never met by quantized codes)
        prof = replace(PROFILES["balanced"], zstd_max_ratio=ratio)
        frames[ratio] = encode_layer(k, v, prof)
    assert read_header(frames[1.0]).flags & FLAG_ZSTD
    assert not read_header(frames[0.05]).flags & FLAG_ZSTD
    assert len(frames[1.0]) < len(frames[0.05])
    for a, b in zip(decode_layer(frames[1.0]), decode_layer(frames[0.05]), strict=True):
        assert torch.equal(a, b)  # the choice changes the bytes, never the values
    with pytest.raises(ValueError, match="zstd_max_ratio"):
        replace(PROFILES["int8"], zstd_max_ratio=0.0)
