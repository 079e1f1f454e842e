"""Which tokens deserve more bits: the per-token precision map.

Tier 0 (the most precise) holds the attention sinks (the first few tokens of
the *context*, so only the chunk at ``token_offset == 0`` has them) and the
most recent tokens (only when the caller says where the context ends). With
three tiers, tier 1 holds the ``warm_tokens`` before those and the
``salient_fraction`` of the rest with the highest saliency; the bulk goes to
the last tier. Recency is the strongest signal we measured: the next queries
attend most to the tail of the context.

Saliency is whatever the caller measured (e.g. attention received from a few
probe queries, summed over heads); without it we use the negated key norm:
tokens whose keys have a small norm tend to receive more attention
(Devoto et al., 2024, "A simple and effective L2 norm-based strategy for KV cache
compression"), and it costs one reduction.
"""

from __future__ import annotations

import torch

from transfer.codec.errors import ShapeMismatch
from transfer.codec.profiles import Profile


def key_norm_saliency(k: torch.Tensor) -> torch.Tensor:
    """Proxy saliency [tokens]: minus the key norm averaged over heads (float64, so devices agree)."""
    return -k.to(torch.float64).pow(2).sum(dim=-1).sqrt().mean(dim=0)


def precision_map(
    k: torch.Tensor,
    profile: Profile,
    saliency: torch.Tensor | None,
    token_offset: int,
    context_end: int | None,
) -> torch.Tensor:
    """Tier index per token (uint8 [tokens]) for a [heads, tokens, dim] key tensor."""
    tokens = k.shape[1]
    if saliency is not None:
        saliency = _checked(k, saliency)
    last = len(profile.tiers) - 1
    tiers = torch.full((tokens,), last, dtype=torch.uint8, device=k.device)
    if last == 0 or tokens == 0:
        return tiers
    pos = torch.arange(tokens, device=k.device) + token_offset
    top = pos < profile.sink_tokens
    if context_end is not None and profile.recent_tokens > 0:
        top |= pos >= context_end - profile.recent_tokens
    if last >= 2 and context_end is not None and profile.warm_tokens > 0:
        tiers[pos >= context_end - profile.recent_tokens - profile.warm_tokens] = 1
    if last >= 2 and profile.salient_fraction > 0:
        score = _score(k, saliency)
        score = score.masked_fill(top, float("-inf"))
        count = min(int(round(profile.salient_fraction * tokens)), tokens)
        if count:
            # stable ranking (ties broken by position) so every device picks the same tokens
            order = torch.sort(score, descending=True, stable=True).indices[:count]
            tiers[order] = 1
    tiers[top] = 0
    return tiers


def _score(k: torch.Tensor, saliency: torch.Tensor | None) -> torch.Tensor:
    return key_norm_saliency(k) if saliency is None else saliency


def _checked(k: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    if not isinstance(saliency, torch.Tensor):
        raise ShapeMismatch(f"saliency must be a tensor, got {type(saliency).__name__}")
    s = saliency.to(device=k.device, dtype=torch.float64)
    if s.dim() == 2 and s.shape == k.shape[:2]:
        s = s.sum(dim=0)
    if s.dim() != 1 or s.shape[0] != k.shape[1]:
        raise ShapeMismatch(
            f"saliency must be [tokens] or [heads, tokens] = {tuple(k.shape[:2])}, got {tuple(saliency.shape)}"
        )
    return s
