"""The compiled CPU kernels against the torch stages: same frames, same tensors, same refusals.

The torch stages are the reference (they are also the CUDA path); the kernels
are only a faster way to compute the same bytes. The golden test pins a fixed
grid; this module adds random shapes and bit widths the grid does not reach
(head_dim not a multiple of 8 or not a power of two, 1..8 bits, short groups)
and malformed bodies, which both decoders must refuse the same way.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvstore.integrity import TRAILER_BYTES, seal
from transfer.codec import (
    PROFILES,
    CodecError,
    Profile,
    codec_threads,
    cpu_kernels,
    decode_into,
    decode_layer,
    encode,
    encode_layer,
    imap_ordered,
    parallel,
    profiles,
)
from transfer.codec.format import HEADER_BYTES, parse_header
from transfer.codec.profiles import CHANNEL, TOKEN, Tier

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _need_numba() -> None:
    if not cpu_kernels.AVAILABLE:
        pytest.fail("numba is not installed: `make test` installs it (pyproject dependency)")


def _both(fn):
    """``fn()`` with the kernels, then with the torch stages; exceptions are returned, not raised."""
    out = []
    was = cpu_kernels.enabled()
    for on in (True, False):
        cpu_kernels.set_enabled(on)
        try:
            out.append(fn())
        except CodecError as exc:
            out.append(exc)
        finally:
            cpu_kernels.set_enabled(was)
    return out


def _same(a, b) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):  # bitwise, so -0.0 vs 0.0 and NaN payloads count
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and bytes(a.contiguous().view(torch.uint8).numpy())
            == bytes(b.contiguous().view(torch.uint8).numpy())
        )
    return a == b


def _kv(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    h, t, d = shape
    k = torch.randn(h, t, d, generator=gen) * 2 + torch.randn(h, 1, d, generator=gen) * 4
    v = torch.randn(h, t, d, generator=gen) * torch.rand(h, t, 1, generator=gen) * 3
    return k.to(dtype), v.to(dtype)


def _profiles() -> Iterator[Profile]:
    yield from (p for p in PROFILES.values() if not p.lossless)
    base = PROFILES["balanced"]
    for kb, vb in ((1, 8), (2, 5), (5, 1), (6, 7), (7, 2), (8, 6)):
        yield replace(
            base,
            name=f"k{kb}v{vb}",
            profile_id=200 + kb,
            tiers=(Tier(TOKEN, 8, TOKEN, 8), Tier(CHANNEL, kb, TOKEN, vb)),
            group=7 + kb,
        )
    yield replace(
        base,
        name="k-token-v-channel",
        profile_id=210,
        tiers=(Tier(CHANNEL, 8, CHANNEL, 6), Tier(TOKEN, 3, CHANNEL, 3)),
        rotate_v=False,
    )
    yield replace(PROFILES["int8"], name="int3-rot", profile_id=211, tiers=(Tier(TOKEN, 3, TOKEN, 3),))


SHAPES = [(3, 256, 64), (2, 37, 64), (1, 5, 12), (4, 9, 40), (2, 64, 128), (1, 1, 8), (2, 300, 6)]


@pytest.mark.parametrize("profile", list(_profiles()), ids=lambda p: p.name)
def test_kernels_write_and_read_what_torch_does(profile: Profile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(profiles.PROFILE_BY_ID, profile.profile_id, profile)  # the test profiles decode too
    for i, shape in enumerate(SHAPES):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            k, v = _kv(shape, dtype, 17 * i + 3)
            for offset, end in ((0, shape[1]), (512, None), (2, 40)):
                fast, ref = _both(
                    lambda k=k, v=v, o=offset, e=end: encode_layer(
                        k, v, profile, token_offset=o, context_end=e
                    )
                )
                assert _same(fast, ref), (profile.name, shape, dtype, offset, end)
                dec = _both(lambda r=ref: decode_layer(r))
                assert not isinstance(dec[1], Exception), dec[1]  # a decode, not two equal errors
                assert _same(*dec), (profile.name, shape, dtype, offset, end)
                dec32 = _both(lambda r=ref: decode_layer(r, dtype=torch.float32))
                assert not isinstance(dec32[1], Exception), dec32[1]
                assert _same(*dec32)


@pytest.mark.parametrize("profile", ["balanced", "dense", "int8"])
def test_batched_layers_match_torch(profile: str) -> None:
    layers = [_kv((3, 100, 64), torch.float16, 40 + i) for i in range(5)]
    assert _same(*_both(lambda: encode(layers, profile, token_offset=256, context_end=400, threads=1)))


def test_zero_heads_and_outliers_match_torch() -> None:
    k, v = _kv((3, 256, 64), torch.float16, 5)
    k[:, :, 3] *= 300
    v[1] = 0
    k[:, 10] = 0
    v[:, :, 9] = -0.0
    for profile in ("balanced", "dense", "int8"):
        blobs = _both(lambda p=profile: encode_layer(k, v, p, token_offset=0, context_end=256))
        assert _same(*blobs)
        assert _same(*_both(lambda b=blobs[1]: decode_layer(b)))


def _body_mutations(blob: bytes) -> Iterator[bytes]:
    """Frames whose checksum is valid but whose body lies: every decoder must refuse or agree."""
    header = parse_header(memoryview(blob)[:-TRAILER_BYTES])
    payload = bytearray(blob[:-TRAILER_BYTES])
    if header.flags & 1:  # work on the raw body so every byte means something
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(
            bytes(payload[HEADER_BYTES:]), max_output_size=header.raw_len
        )
        payload = bytearray(payload[:HEADER_BYTES]) + bytearray(raw)
        struct.pack_into("<B", payload, 7, header.flags & ~1)  # flags byte: no zstd
        struct.pack_into("<I", payload, HEADER_BYTES - 4, len(raw))  # stored length
    body_at = HEADER_BYTES
    for pos, value in ((0, 0), (0, 16), (1, 9), (2, 0), (3, 2), (17, 0x77), (30, 0xFF)):
        mutated = bytearray(payload)
        mutated[body_at + pos] = value
        yield seal(bytes(mutated))
    yield seal(bytes(payload[:-5]))  # body shorter than its header says
    shorter = bytearray(payload[:-7])
    struct.pack_into("<I", shorter, HEADER_BYTES - 8, len(shorter) - HEADER_BYTES)  # raw length agrees
    struct.pack_into("<I", shorter, HEADER_BYTES - 4, len(shorter) - HEADER_BYTES)
    yield seal(bytes(shorter))
    longer = bytearray(payload) + b"\\0" * 9
    struct.pack_into("<I", longer, HEADER_BYTES - 8, len(longer) - HEADER_BYTES)
    struct.pack_into("<I", longer, HEADER_BYTES - 4, len(longer) - HEADER_BYTES)
    yield seal(bytes(longer))


@pytest.mark.parametrize("profile", ["balanced", "dense", "int8"])
def test_lying_bodies_are_refused_alike(profile: str) -> None:
    k, v = _kv((2, 40, 64), torch.float16, 9)
    blob = encode_layer(k, v, profile, token_offset=0, context_end=40)
    refused = 0
    for bad in _body_mutations(blob):
        fast, ref = _both(lambda b=bad: decode_layer(b))
        assert _same(fast, ref), (fast, ref)
        refused += isinstance(ref, Exception)
    assert refused >= 4  # the length and tier-table lies at least


def test_imap_ordered_keeps_order_and_raises_in_place() -> None:
    assert list(imap_ordered(lambda x: x * x, iter(range(50)), ahead=3)) == [x * x for x in range(50)]

    def boom(x: int) -> int:
        if x == 7:
            raise ValueError("seven")
        return x

    got = []
    with pytest.raises(ValueError, match="seven"):
        for x in imap_ordered(boom, range(20)):
            got.append(x)
    assert got == list(range(7))
    with pytest.raises(ValueError):
        list(imap_ordered(boom, range(3), ahead=0))


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_decode_frames_equals_one_by_one(dtype) -> None:
    blobs = [
        encode_layer(*_kv((3, 64, 64), torch.float16, s), "balanced", token_offset=64 * s) for s in range(7)
    ]
    blobs += [encode_layer(*_kv((3, 64, 64), torch.bfloat16, 9), "dense", token_offset=64)]  # another dtype
    blobs += [encode_layer(*_kv((2, 30, 64), torch.float16, 8), "lossless")]  # another shape, lossless
    blobs += [encode_layer(*_kv((3, 64, 64), torch.float16, 10), "int8", token_offset=0, context_end=64)]
    many = parallel.decode_frames(blobs, dtype=dtype)
    assert _same(many, [decode_layer(b, dtype=dtype) for b in blobs])
    same_shape = blobs[:7]  # one kernel call per part
    assert _same(
        parallel.decode_frames(same_shape, dtype=dtype), [decode_layer(b, dtype=dtype) for b in same_shape]
    )
    assert _same(
        parallel.decode_frames(blobs, dtype=dtype, threads=1), many
    )  # the caller's thread alone: same tensors


def test_decode_frames_with_one_thread_stays_in_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_CODEC_THREADS", "2")
    blobs = [encode_layer(*_kv((3, 32, 64), torch.float16, s), "balanced", token_offset=32) for s in range(4)]
    seen: set[str] = set()
    real = parallel._decode_part

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(parallel, "_decode_part", spy)
    parallel.decode_frames(blobs, threads=1)
    assert seen == {threading.current_thread().name}
    seen.clear()
    parallel.decode_frames(blobs)
    assert seen and all(name.startswith("kvstore-codec") for name in seen)  # the default: pool threads
    with pytest.raises(ValueError, match="threads"):
        parallel.decode_frames(blobs, threads=0)


def test_codec_calls_nest_without_deadlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec-pool task that itself decodes many frames runs them inline instead of waiting on the pool."""
    monkeypatch.setenv("KVSTORE_CODEC_THREADS", "2")
    blobs = [encode_layer(*_kv((3, 32, 64), torch.float16, s), "balanced", token_offset=32) for s in range(4)]
    expected = [decode_layer(b) for b in blobs]
    nested = list(imap_ordered(lambda _: parallel.decode_frames(blobs), range(6)))  # more tasks than threads
    assert all(_same(got, expected) for got in nested)


def test_decode_frames_refuses_a_bad_frame_among_good_ones() -> None:
    blobs = [encode_layer(*_kv((3, 64, 64), torch.float16, s), "balanced", token_offset=64) for s in range(6)]
    for bad in (seal(blobs[4][:-TRAILER_BYTES][:-3]), blobs[4][:-1] + bytes([blobs[4][-1] ^ 1])):
        with pytest.raises(CodecError):
            parallel.decode_frames(blobs[:4] + [bad] + blobs[5:])
    body_lie = next(iter(_body_mutations(blobs[2])))
    with pytest.raises(CodecError):
        parallel.decode_frames(blobs[:2] + [body_lie] + blobs[3:])


def test_codec_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_CODEC_THREADS", "3")
    assert codec_threads() == 3
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("KVSTORE_CODEC_THREADS", bad)
        with pytest.raises(ValueError, match="KVSTORE_CODEC_THREADS"):
            codec_threads()
    monkeypatch.delenv("KVSTORE_CODEC_THREADS")
    assert codec_threads() >= 1


def test_torch_switch_in_a_fresh_process() -> None:
    """KVSTORE_CODEC_KERNELS=torch turns the kernels off at import (how an operator would)."""
    code = textwrap.dedent("""
        from transfer.codec import cpu_kernels
        print(cpu_kernels.enabled())
    """)
    env = {**os.environ, "KVSTORE_CODEC_KERNELS": "torch", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fp16_conversions_match_torch() -> None:
    """The kernels' own float32 <-> fp16 conversions (channel maxima, means) round as torch does."""
    import numpy as np

    gen = np.random.default_rng(1)
    bits = np.concatenate(
        [
            gen.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32),
            np.arange(
                0x33000000 - 3000, 0x33000000 + 3000, dtype=np.uint32
            ),  # around fp16's smallest subnormal
            np.arange(0x387FC000 - 3000, 0x38800000 + 3000, dtype=np.uint32),  # subnormal -> normal boundary
            np.arange(0x477FE000 - 3000, 0x477FF000 + 3000, dtype=np.uint32),  # around fp16 max -> inf
        ]
    )
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    values = bits.view(np.float32)
    values = values[~np.isnan(values)]
    expected = torch.from_numpy(values).to(torch.float16).view(torch.int16).numpy().astype(np.uint16)
    got = np.array([cpu_kernels.float_to_half_bits(np.float32(x)) for x in values[:2000]], np.int64)
    assert np.array_equal(got, expected[:2000].astype(np.int64))
    got_all = _elementwise(cpu_kernels.float_to_half_bits, values, np.int64)
    assert np.array_equal(got_all, expected.astype(np.int64))
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = torch.from_numpy(halves.view(np.float16).copy()).to(torch.float32).numpy()
    back = _elementwise(cpu_kernels.half_to_float, halves.astype(np.int64), np.float32)
    finite = ~np.isnan(widened)
    assert np.array_equal(back[finite].view(np.uint32), widened[finite].view(np.uint32))
    assert np.isnan(back[~finite]).all()


def _elementwise(kernel, values, out_dtype):
    """A scalar compiled function applied to every element, itself compiled (as the kernels call it)."""
    import numba
    import numpy as np

    @numba.njit
    def run(x, out):
        for i in range(x.size):
            out[i] = kernel(x[i])

    out = np.empty(values.size, out_dtype)
    run(values, out)
    return out


@pytest.mark.parametrize("profile", ["balanced", "dense", "int8", "lossless"])
def test_encode_gives_each_layers_frame(profile: str) -> None:
    layers = [_kv((3, 64, 64), torch.float16, 60 + i) for i in range(7)]
    expected = [encode_layer(k, v, profile, token_offset=0, context_end=64) for k, v in layers]
    assert encode(layers, profile, token_offset=0, context_end=64) == expected
    sal = torch.linspace(0, 1, 64)
    expected = [encode_layer(k, v, profile, saliency=sal, token_offset=128) for k, v in layers]
    assert encode(layers, profile, saliency=sal, token_offset=128) == expected
    assert encode([], profile) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lossless_byte_planes_match_torch(dtype: torch.dtype) -> None:
    for shape in ((3, 256, 64), (1, 3, 5), (2, 0, 8)):
        k, v = _kv(shape, dtype, 77)
        if k.numel():
            k.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
        fast, ref = _both(lambda k=k, v=v: encode_layer(k, v, "lossless"))
        assert _same(fast, ref)
        assert _same(*_both(lambda r=ref: decode_layer(r)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw words of a tensor: NaN payloads and -0 compare exactly."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_into_writes_lossless_chunks_in_place_bit_exact(
    dtype: torch.dtype, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer's lossless chunks land in one tensor, bit for bit what per-chunk decode + cat gives."""
    monkeypatch.setenv("KVSTORE_CODEC_THREADS", "2")
    tokens = (64, 64, 17, 1)  # uneven chunks: every slice offset differs
    parts = [_kv((3, t, 20), dtype, 100 + i) for i, t in enumerate(tokens)]
    parts[0][0].view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    blobs = [encode_layer(k, v, "lossless") for k, v in parts]
    writes: list[int] = []
    real = parallel.decode_lossless_into
    monkeypatch.setattr(parallel, "decode_lossless_into", lambda *a, **kw: writes.append(1) or real(*a, **kw))
    k, v = decode_into(blobs, threads=threads)
    assert len(writes) == len(blobs)  # the in-place path ran, once per frame
    assert k.shape == v.shape == (3, sum(tokens), 20) and k.dtype == dtype and k.is_contiguous()
    assert torch.equal(_bits(k), _bits(torch.cat([k for k, _ in parts], dim=1)))
    assert torch.equal(_bits(v), _bits(torch.cat([v for _, v in parts], dim=1)))
    k32, _ = decode_into(blobs, dtype=torch.float32, threads=threads)  # a cast after, like decode_frames
    assert k32.dtype == torch.float32
    torch.testing.assert_close(k32, k.float(), rtol=0, atol=0, equal_nan=True)


def test_decode_into_takes_the_general_path_where_it_must() -> None:
    lossy = [
        encode_layer(*_kv((3, 32, 64), torch.float16, s), "balanced", token_offset=32 * s) for s in range(3)
    ]
    expected = parallel.decode_frames(lossy)
    k, v = decode_into(lossy)
    assert torch.equal(k, torch.cat([a for a, _ in expected], dim=1))
    assert torch.equal(v, torch.cat([b for _, b in expected], dim=1))
    mixed = [
        encode_layer(*_kv((3, 8, 16), torch.float16, 1), "lossless"),
        encode_layer(*_kv((3, 8, 16), torch.float32, 2), "lossless"),
    ]  # dtypes differ: no shared output
    k, _ = decode_into(mixed, dtype=torch.float32)
    assert k.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="at least one"):
        decode_into([])


@pytest.mark.parametrize("profile", ["lossless", "balanced", "int8"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_decode_into_fills_a_callers_destination_at_its_offset(profile: str, out_dtype: torch.dtype) -> None:
    """Frames land in ``dest[:, token_offset:]``, as an allocating decode gives them; the rest untouched."""
    tokens = (32, 32, 9)
    blobs = [
        encode_layer(*_kv((3, t, 64), torch.float16, 40 + i), profile, token_offset=32 * i)
        for i, t in enumerate(tokens)
    ]
    expected_k, expected_v = decode_into(blobs, dtype=out_dtype)
    k_out = torch.full((3, 100, 64), 7.0, dtype=out_dtype)
    v_out = torch.full((3, 100, 64), 7.0, dtype=out_dtype)
    got = decode_into(blobs, (k_out, v_out), token_offset=20)
    assert got[0] is k_out and got[1] is v_out
    assert torch.equal(_bits(k_out[:, 20:93]), _bits(expected_k))
    assert torch.equal(_bits(v_out[:, 20:93]), _bits(expected_v))
    assert torch.all(k_out[:, :20] == 7) and torch.all(k_out[:, 93:] == 7) and torch.all(v_out[:, 93:] == 7)
    for t in (1, 2):  # window by window, as longctx.read_layers fills a layer
        decode_into(blobs, (k_out, v_out), token_offset=0, threads=t)
        assert torch.equal(_bits(k_out[:, :73]), _bits(expected_k))
    same = [  # frames of one shape: one kernel call and one copy per part on the quantized path
        encode_layer(*_kv((3, 16, 64), torch.float16, 50 + i), profile, token_offset=16 * i) for i in range(5)
    ]
    for t in (1, 2):
        k_out.fill_(7)
        decode_into(same, (k_out, v_out), token_offset=3, threads=t)
        assert torch.equal(
            _bits(k_out[:, 3:83]), _bits(torch.cat([decode_layer(b, dtype=out_dtype)[0] for b in same], 1))
        )
        assert torch.equal(
            _bits(v_out[:, 3:83]), _bits(torch.cat([decode_layer(b, dtype=out_dtype)[1] for b in same], 1))
        )
        assert torch.all(k_out[:, :3] == 7) and torch.all(k_out[:, 83:] == 7)


def test_decode_into_refuses_a_destination_that_does_not_fit() -> None:
    from transfer.codec.errors import ShapeMismatch

    lossless = [encode_layer(*_kv((3, 16, 32), torch.float32, s), "lossless") for s in range(2)]
    lossy = [encode_layer(*_kv((3, 16, 32), torch.float32, s), "balanced") for s in range(2)]
    for blobs in (lossless, lossy):
        for dest, offset in (
            ((torch.empty(3, 31, 32), torch.empty(3, 31, 32)), 0),  # one token short
            ((torch.empty(3, 40, 32), torch.empty(3, 40, 32)), 9),  # runs past the end
            ((torch.empty(2, 40, 32), torch.empty(2, 40, 32)), 0),  # other heads
            ((torch.empty(3, 40, 16), torch.empty(3, 40, 16)), 0),  # other head_dim
            ((torch.empty(3, 40, 32), torch.empty(3, 41, 32)), 0),  # K and V differ
        ):
            with pytest.raises(ShapeMismatch):
                decode_into(blobs, dest, token_offset=offset)
    with pytest.raises(ValueError, match="dest"):
        decode_into(lossless, token_offset=3)
    with pytest.raises(ValueError, match="threads"):
        decode_into(lossless, threads=0)


def test_decode_into_refuses_a_bad_lossless_frame_like_the_general_path() -> None:
    blobs = [encode_layer(*_kv((3, 16, 32), torch.float32, s), "lossless") for s in range(4)]
    flipped = bytearray(blobs[2])
    flipped[HEADER_BYTES + 5] ^= 0x10  # body bit: the plan reads the header fine, the checksum catches it
    truncated = blobs[2][: len(blobs[2]) // 2]
    for bad in (bytes(flipped), truncated):
        with pytest.raises(CodecError) as in_place:
            decode_into(blobs[:2] + [bad] + blobs[3:], threads=1)
        with pytest.raises(CodecError) as general:
            parallel.decode_frames(blobs[:2] + [bad] + blobs[3:], threads=1)
        assert type(in_place.value) is type(general.value) and str(in_place.value) == str(general.value)


def test_decode_lossless_into_checks_its_outputs() -> None:
    from transfer.codec.errors import ShapeMismatch
    from transfer.codec.frame import decode_lossless_into, open_frame

    header, raw = open_frame(encode_layer(*_kv((2, 8, 4), torch.float32, 3), "lossless"))
    good = torch.empty(2, 10, 4)
    decode_lossless_into(header, raw, good, torch.empty_like(good), 2)
    for k_out, offset in (
        (torch.empty(2, 10, 4, dtype=torch.float16), 0),
        (torch.empty(3, 10, 4), 0),
        (torch.empty(2, 4, 10).transpose(1, 2), 0),
        (good, 3),
        (good, -1),
    ):
        with pytest.raises(ShapeMismatch):
            decode_lossless_into(header, raw, k_out, torch.empty_like(k_out), offset)


def _raw_payload(blob: bytes) -> bytearray:
    """Header + raw (unzstd'd) body of a frame, its header saying so: for bodies rewritten by a test."""
    header = parse_header(memoryview(blob)[:-TRAILER_BYTES])
    payload = bytearray(blob[:-TRAILER_BYTES])
    if header.flags & 1:
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(
            bytes(payload[HEADER_BYTES:]), max_output_size=header.raw_len
        )
        payload = bytearray(payload[:HEADER_BYTES]) + bytearray(raw)
        struct.pack_into("<B", payload, 7, header.flags & ~1)
        struct.pack_into("<I", payload, HEADER_BYTES - 4, len(raw))
    return payload


QUANTIZED = list(_profiles())  # the shipped quantized profiles and test ones (bit widths, groups, schemes)


@pytest.mark.parametrize("profile", QUANTIZED, ids=lambda p: p.name)
def test_decode_into_writes_quantized_chunks_in_place_bit_exact(
    profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantized chunks land in their slices of a layer, bit for bit what per-frame decode + cat gives.

    fp16, bf16 and float32 outputs take the kernel that writes into the slices
    (once per part); a non-contiguous output keeps the decode-then-copy path.
    """

    monkeypatch.setitem(profiles.PROFILE_BY_ID, profile.profile_id, profile)  # the test profiles decode too
    monkeypatch.setenv("KVSTORE_CODEC_THREADS", "2")
    tokens = (64, 64, 17, 1, 40)  # uneven chunks: every slice offset differs, parts differ in tokens
    starts = [sum(tokens[:i]) for i in range(len(tokens))]
    blobs = [
        encode_layer(
            *_kv((3, t, 64), torch.float16, 60 + i), profile, token_offset=s, context_end=sum(tokens)
        )
        for i, (t, s) in enumerate(zip(tokens, starts, strict=True))
    ]
    calls: list[int] = []
    real = parallel.cpu_decode.decode_into_layer
    monkeypatch.setattr(
        parallel.cpu_decode, "decode_into_layer", lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw)
    )
    total = sum(tokens)
    for out_dtype in (torch.float16, torch.float32, torch.bfloat16):
        per_frame = [decode_layer(b, dtype=out_dtype) for b in blobs]  # the old path, frame by frame
        want_k = torch.cat([k for k, _ in per_frame], dim=1)
        want_v = torch.cat([v for _, v in per_frame], dim=1)
        for threads in (1, 2):
            calls.clear()
            k, v = decode_into(blobs, dtype=out_dtype, threads=threads)
            assert k.dtype == out_dtype and k.shape == (3, total, 64)
            assert torch.equal(_bits(k), _bits(want_k)) and torch.equal(_bits(v), _bits(want_v))
            assert sorted(calls) == ([len(blobs)] if threads == 1 else [2, 3])
            k_out = torch.full((3, total + 9, 64), 7.0, dtype=out_dtype)
            v_out = torch.full((3, total + 9, 64), 7.0, dtype=out_dtype)
            decode_into(blobs, (k_out, v_out), token_offset=5, threads=threads)
            assert torch.equal(_bits(k_out[:, 5 : 5 + total]), _bits(want_k))
            assert torch.equal(_bits(v_out[:, 5 : 5 + total]), _bits(want_v))
            assert torch.all(k_out[:, :5] == 7) and torch.all(v_out[:, 5 + total :] == 7)
        strided = torch.full((3, 64, total), 7.0, dtype=out_dtype).transpose(1, 2)  # not contiguous: copies
        calls.clear()
        decode_into(blobs, (strided, torch.empty_like(strided)), threads=2)
        assert not calls and torch.equal(_bits(strided), _bits(want_k))


def test_bf16_conversion_matches_torch() -> None:
    """The kernels' float32 -> bfloat16 rounding (cpu_kernels.to_bf16) writes torch's bits, NaN included."""
    import platform

    import numpy as np

    from transfer.codec import cpu_decode

    nan = cpu_decode.bf16_nan()
    if platform.machine() in (
        "x86_64",
        "AMD64",
    ):  # torch's vectorized cast: one NaN pattern, so it runs in place
        assert nan is not None and cpu_decode.writes_into(torch.bfloat16)
    if nan is None:
        assert not cpu_decode.writes_into(torch.bfloat16)
        return
    gen = np.random.default_rng(2)
    bits = np.concatenate(
        [
            gen.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32),
            np.arange(
                0x7F7F0000, 0x7F800010, dtype=np.uint32
            ),  # the largest finite values, up to inf and NaN
            np.arange(0x3F800000 - 0x20000, 0x3F800000 + 0x20000, dtype=np.uint32),  # ties around 1.0
            np.arange(0, 0x30000, dtype=np.uint32),  # subnormals and zero
            np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA00000], np.uint32),  # NaN payloads
        ]
    )
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    values = bits.view(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = np.empty_like(expected)
    cpu_kernels.to_bf16(values, got, nan)
    assert np.isnan(values).sum() > 1000 and np.array_equal(got, expected)


def _centered(blob: bytes, means: list[float]) -> bytes:
    """``blob`` with K's fp16 means (FLAG_CENTER_K) set to ``means`` repeated: values no encoder writes."""
    from transfer.codec.format import FLAG_CENTER_K

    header = parse_header(memoryview(blob)[:-TRAILER_BYTES])
    payload = _raw_payload(blob)
    n = payload[HEADER_BYTES]
    at = HEADER_BYTES + 2 + 4 * n + (header.tokens + 7) // 8 * 4  # K's means sit after the tier table and map
    count = header.heads * header.head_dim
    block = torch.tensor((means * count)[:count], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    out = payload[:at] + bytearray(block) + payload[at:]
    struct.pack_into("<B", out, 7, out[7] | FLAG_CENTER_K)
    struct.pack_into("<I", out, HEADER_BYTES - 8, len(out) - HEADER_BYTES)
    struct.pack_into("<I", out, HEADER_BYTES - 4, len(out) - HEADER_BYTES)
    return seal(bytes(out))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("profile", ["balanced", "dense", "int8"])
def test_decode_into_bf16_in_place_rounds_every_value_as_torch(
    profile: str, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 destinations: the kernel's bits are float32 decode + torch's cast, for NaN, inf, -0 and huge values.

    Quantized frames decode to float32 and torch casts that to bf16 (the old
    path); the kernel rounds the same float32 itself. The frames include a chunk
    of huge bf16 values (~1e30 out, and NaN from overflowing fp16 channel maxima
    on balanced/dense) and frames whose K means are NaN (both signs, payloads),
    +-inf, -0 and fp16's extremes, on uneven chunks. The quantized path writes
    no -0 itself (exact zeros come out +0), so -0's rounding is covered by
    test_bf16_conversion_matches_torch.
    """
    monkeypatch.setenv("KVSTORE_CODEC_THREADS", "2")
    tokens = (64, 17, 64, 64, 1, 40)
    starts = [sum(tokens[:i]) for i in range(len(tokens) + 1)]
    layers = [_kv((3, t, 64), torch.bfloat16, 90 + i) for i, t in enumerate(tokens)]
    layers[2] = (layers[2][0] * 1e30, layers[2][1] * 1e30)  # bf16 holds them; fp16 channel maxima overflow
    blobs = [
        encode_layer(k, v, profile, token_offset=starts[i], context_end=starts[-1])
        for i, (k, v) in enumerate(layers)
    ]
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 65504.0, -65504.0, 6e-8, 1.0]
    blobs[3] = _centered(blobs[3], specials)
    blobs[4] = _centered(blobs[4], [float("inf")])
    payloads = bytearray(_raw_payload(blobs[3]))  # NaNs of both signs with payloads, not only torch's own
    means_at = HEADER_BYTES + 2 + 4 * payloads[HEADER_BYTES] + (tokens[3] + 7) // 8 * 4
    for i, word in enumerate((0x7E01, 0xFE01, 0x7D55, 0xFC01)):
        struct.pack_into("<H", payloads, means_at + 2 * 8 * i, word)
    blobs[3] = seal(bytes(payloads))
    wide = [decode_layer(b, dtype=torch.float32) for b in blobs]
    every = torch.cat([torch.cat([k.flatten(), v.flatten()]) for k, v in wide])
    assert torch.isnan(every).any() and torch.isinf(every).any()  # the cases below are really reached
    assert (every[torch.isfinite(every)].abs() > 1e29).any()
    want_k = torch.cat([k.to(torch.bfloat16) for k, _ in wide], dim=1)  # the old path: float32, torch's cast
    want_v = torch.cat([v.to(torch.bfloat16) for _, v in wide], dim=1)
    per_frame = [decode_layer(b, dtype=torch.bfloat16) for b in blobs]
    assert torch.equal(_bits(torch.cat([k for k, _ in per_frame], 1)), _bits(want_k))
    calls: list[int] = []
    real = parallel.cpu_decode.decode_into_layer
    monkeypatch.setattr(
        parallel.cpu_decode, "decode_into_layer", lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw)
    )
    k_out = torch.full((3, starts[-1] + 3, 64), 7.0, dtype=torch.bfloat16)
    v_out = torch.full_like(k_out, 7.0)
    decode_into(blobs, (k_out, v_out), token_offset=2, threads=threads)
    assert sorted(calls) == ([len(blobs)] if threads == 1 else [3, 3])
    assert torch.equal(_bits(k_out[:, 2 : 2 + starts[-1]]), _bits(want_k))
    assert torch.equal(_bits(v_out[:, 2 : 2 + starts[-1]]), _bits(want_v))
    assert torch.all(k_out[:, :2] == 7) and torch.all(v_out[:, 2 + starts[-1] :] == 7)
    k, v = decode_into(blobs, dtype=torch.bfloat16, threads=threads)  # allocated: the same path
    assert torch.equal(_bits(k), _bits(want_k)) and torch.equal(_bits(v), _bits(want_v))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_decode_into_refuses_a_bad_quantized_frame_without_writing_it(
    threads: int, out_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad frame among good ones: the per-frame path's error, and nothing of it in any slice.

    Every chunk's slice holds either its own exact values or the untouched fill,
    never the bad frame's partial output (a part's checksums are verified before
    its kernel runs, and a body is checked whole before the kernel writes from it).
    """
    monkeypatch.setenv("KVSTORE_CODEC_THREADS", "2")
    tokens = (32, 32, 32, 32, 9)
    starts = [sum(tokens[:i]) for i in range(len(tokens) + 1)]
    blobs = [
        encode_layer(*_kv((2, t, 64), torch.float16, 80 + i), "balanced", token_offset=starts[i])
        for i, t in enumerate(tokens)
    ]
    good = [decode_layer(b, dtype=out_dtype) for b in blobs]
    flipped = bytearray(blobs[2])
    flipped[HEADER_BYTES + 40] ^= 0x10  # checksum mismatch
    trailing = _raw_payload(blobs[2]) + b"\0" * 9  # checksum fine, the body runs 9 bytes past its tiers
    struct.pack_into("<I", trailing, HEADER_BYTES - 8, len(trailing) - HEADER_BYTES)
    struct.pack_into("<I", trailing, HEADER_BYTES - 4, len(trailing) - HEADER_BYTES)
    lies = [
        b for b in _body_mutations(blobs[2]) if isinstance(_both(lambda b=b: decode_layer(b))[0], Exception)
    ]
    assert len(lies) >= 4
    for bad in [bytes(flipped), blobs[2][:-30], seal(bytes(trailing)), *lies]:
        frames = blobs[:2] + [bad] + blobs[3:]
        with pytest.raises(CodecError) as old:
            parallel.decode_frames(frames, dtype=out_dtype, threads=1)
        k_out = torch.full((2, starts[-1], 64), 7.0, dtype=out_dtype)
        v_out = torch.full((2, starts[-1], 64), 7.0, dtype=out_dtype)
        with pytest.raises(CodecError) as new:
            decode_into(frames, (k_out, v_out), threads=threads)
        assert type(new.value) is type(old.value) and str(new.value) == str(old.value)
        for i, (k, v) in enumerate(good):
            got_k, got_v = k_out[:, starts[i] : starts[i + 1]], v_out[:, starts[i] : starts[i + 1]]
            untouched = bool(torch.all(got_k == 7)) and bool(torch.all(got_v == 7))
            exact = torch.equal(_bits(got_k), _bits(k)) and torch.equal(_bits(got_v), _bits(v))
            assert untouched if i == 2 else untouched or exact, i
            if threads == 1 and i > 2:
                assert untouched, i  # one part: nothing after the bad frame
            if threads == 1 and i < 2 and _opens(bad):
                assert exact, i  # refused by the kernel, not at opening: the frames before it are in place


def _opens(blob: bytes) -> bool:
    """Whether a frame passes its checksum and length checks (only its body can then be refused)."""
    from transfer.codec.frame import open_frame

    try:
        open_frame(blob)
    except CodecError:
        return False
    return True


def test_a_tier_table_longer_than_the_map_can_name_decodes_alike() -> None:
    """Tiers 16.. of a table hold no tokens (the map has 4 bits); the kernels must not read past their counts."""
    blob = encode_layer(*_kv((2, 40, 64), torch.float16, 12), "balanced", token_offset=0, context_end=40)
    payload = _raw_payload(blob)
    n = payload[HEADER_BYTES]
    extra = 20 - n
    at = HEADER_BYTES + 1 + 4 * n
    longer = payload[:HEADER_BYTES] + bytes([n + extra]) + payload[HEADER_BYTES + 1 : at]
    longer += bytes([TOKEN, 8, TOKEN, 8] * extra) + payload[at:]
    struct.pack_into("<I", longer, HEADER_BYTES - 8, len(longer) - HEADER_BYTES)
    struct.pack_into("<I", longer, HEADER_BYTES - 4, len(longer) - HEADER_BYTES)
    fast, ref = _both(lambda: decode_layer(seal(bytes(longer))))
    assert not isinstance(ref, Exception) and _same(fast, ref)
    assert _same(fast, decode_layer(blob))
