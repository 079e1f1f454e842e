"""Codec profiles: named points on the size/fidelity curve.

A profile fixes the tier table (bits for K and V per precision tier), which
tokens land in which tier, and the transforms applied before quantization. The
frame records everything a decoder needs (tier table, flags, seed), so decoding
never consults this table; the profile id in the header is informational and
lets a reader refuse a profile it does not serve. Changing a profile's numbers
changes new frames only; old frames stay decodable.
"""

from __future__ import annotations

from dataclasses import dataclass

from transfer.codec.errors import UnknownProfile

SINK_TOKENS = 4  # the first tokens of a context absorb attention mass ("attention sinks")
TOKEN, CHANNEL = 0, 1  # quantization schemes (see quantize.py), as written in the frame


@dataclass(frozen=True)
class Tier:
    """Scheme and bit width for K and for V of the tokens in one precision tier."""

    k_scheme: int
    k_bits: int
    v_scheme: int
    v_bits: int


@dataclass(frozen=True)
class Profile:
    """How one profile encodes a layer.

    ``tiers`` go from most to least precise; tier 0 holds sinks and recent
    tokens, tier 1 (when there are three) the ``warm_tokens`` before the context
    end that are not recent plus the ``salient_fraction`` of the rest with the
    highest saliency, and the last tier the bulk. ``group`` is the
    number of tokens that share a range in the CHANNEL scheme. ``lossless``
    profiles ignore all of it.
    """

    name: str
    profile_id: int
    lossless: bool = False
    tiers: tuple[Tier, ...] = ()
    group: int = 32
    salient_fraction: float = 0.0
    recent_tokens: int = 0
    warm_tokens: int = 0
    sink_tokens: int = SINK_TOKENS
    rotate_k: bool = False
    rotate_v: bool = True
    center_k: bool = False
    center_v: bool = False
    clip: float = 1.0
    zstd_level: int | None = 1
    #: A frame's body is kept zstd-compressed only when compressed/raw is below this ("where it
    #: pays"): decoding a compressed body costs about a third of a quantized frame's decode.
    zstd_max_ratio: float = 0.97

    def __post_init__(self) -> None:
        if not self.lossless:
            if not 1 <= len(self.tiers) <= 15:
                raise ValueError(f"profile {self.name}: 1..15 tiers, got {len(self.tiers)}")
            if any(
                s not in (TOKEN, CHANNEL) or not 1 <= b <= 8
                for t in self.tiers
                for s, b in ((t.k_scheme, t.k_bits), (t.v_scheme, t.v_bits))
            ):
                raise ValueError(f"profile {self.name}: bad tier table {self.tiers}")
        if not 0.0 < self.zstd_max_ratio <= 1.0:
            raise ValueError(
                f"profile {self.name}: zstd_max_ratio must be in (0, 1], got {self.zstd_max_ratio}"
            )
        if not 1 <= self.group <= 255:
            raise ValueError(f"profile {self.name}: group must be 1..255 tokens, got {self.group}")
        if not 0 <= self.profile_id <= 255:
            raise ValueError(f"profile {self.name}: id must fit a byte")


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("lossless", 0, lossless=True, zstd_level=1),
        # zstd saves int8 frames of real KV 3.2% on average and costs a third of their decode time
        # (measured: 2-thread decode 1.86-1.93 GB/s with it, 2.8 without; ratio 2.03x -> 1.98x)
        Profile("int8", 1, tiers=(Tier(TOKEN, 8, TOKEN, 8),), rotate_k=True, zstd_max_ratio=0.90),
        # sinks + 32 recent at 8 bits, the 224 tokens before them at K4/V4, the bulk at K4 (per channel,
        # groups of 64 tokens) / V3 (rotated, per token)
        Profile(
            "balanced",
            2,
            tiers=(Tier(TOKEN, 8, TOKEN, 8), Tier(CHANNEL, 4, TOKEN, 4), Tier(CHANNEL, 4, TOKEN, 3)),
            recent_tokens=32,
            warm_tokens=224,
            group=64,
        ),
        # sinks + 32 recent at K8/V4, the bulk at K3 (per channel, groups of 128 tokens) / V2
        Profile(
            "dense",
            3,
            tiers=(Tier(TOKEN, 8, TOKEN, 4), Tier(CHANNEL, 3, TOKEN, 2)),
            recent_tokens=32,
            group=128,
        ),
    )
}
PROFILE_BY_ID: dict[int, Profile] = {p.profile_id: p for p in PROFILES.values()}


def get_profile(profile: str | Profile) -> Profile:
    """Resolve a name (or pass a Profile through, which lets the bench try variants)."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise UnknownProfile(f"unknown codec profile {profile!r}; known: {', '.join(PROFILES)}") from None
