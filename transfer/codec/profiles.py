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


@dataclass(frozen=True)
class Profile:
    """How one profile encodes a layer.

    ``tiers`` lists (k_bits, v_bits) from most to least precise; tier 0 holds
    sinks and recent tokens, tier 1 the salient fraction ``salient_fraction`` of
    the rest, and the last tier the bulk. ``lossless`` profiles ignore all of it.
    """

    name: str
    profile_id: int
    lossless: bool = False
    tiers: tuple[tuple[int, int], ...] = ()
    salient_fraction: float = 0.0
    recent_tokens: int = 0
    sink_tokens: int = SINK_TOKENS
    rotate: bool = True
    center_k: bool = True
    center_v: bool = False
    clip: float = 1.0
    zstd_level: int = 1


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("lossless", 0, lossless=True, zstd_level=1),
        Profile("int8", 1, tiers=((8, 8),), center_v=True),
        Profile("balanced", 2, tiers=((8, 8), (5, 4), (4, 3)), salient_fraction=0.1, recent_tokens=32),
        Profile("dense", 3, tiers=((8, 8), (4, 3), (3, 2)), salient_fraction=0.1, recent_tokens=32),
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
