"""Where K and V sit in vLLM's paged KV cache, read from vLLM, never guessed from a shape.

vLLM 0.32 hands every attention layer to a connector as one logical view
``[blocks, heads, block_size, C]`` whose memory order is a ``KVCacheLayout``
permutation the engine chose (``LBHNC``, ``LBNHC``, ``BLHNC``, ...). The view's
strides carry that order, so slicing it is layout-independent; what the view
does *not* say is where each backend keeps K and V inside it. That placement is
fixed in each backend's ``forward`` and is copied here, one entry per backend,
from the installed vLLM source:

- ``CONTENT``: K and V side by side along C (``C = 2 * head_dim``):
  FlashAttention, FlashInfer (non-NVFP4), Triton attention, FlexAttention
  (``kv_cache.transpose(1, 2).split(head_size, dim=-1)`` in each).
- ``TOKENS``: each (block, head) plane of ``block_size x C`` holds ``block_size``
  rows of K, then as many of V, each ``head_dim`` wide: the CPU backend
  (``kv_cache.view(B, H, 2 * N, D).chunk(2, dim=2)``). Only meaningful while
  that plane is contiguous, which the CPU backend's one layout (``LBHNC``) is.
- ``LATENT``: MLA models keep one latent vector per token and no K/V pair
  (``head_size_v == 0``); every MLA backend.

A backend or a view that fits none of these is refused with
:class:`UnsupportedLayout` naming it: a wrong split would quantize K and V mixed
together and serve silently wrong KV, the failure users of KV-cache systems
report most. Kernel blocks smaller than vLLM's block (``shape[0]`` a multiple of
the engine's block count) are handled: manager block ``b`` is kernel blocks
``b*r .. b*r + r - 1``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class UnsupportedLayout(ValueError):
    """The engine's KV cache is laid out in a way this connector cannot split honestly."""


class Placement(enum.Enum):
    CONTENT = "K|V along the content axis"
    TOKENS = "K rows then V rows in each block's (tokens, content) plane"
    LATENT = "one latent vector per token (MLA)"


#: Attention backends (``AttentionBackend.get_name()``) whose K/V placement the connector knows.
BACKEND_PLACEMENT: dict[str, Placement] = {
    "CPU_ATTN": Placement.TOKENS,
    "FLASH_ATTN": Placement.CONTENT,
    "FLASHINFER": Placement.CONTENT,
    "TRITON_ATTN": Placement.CONTENT,
    "FLEX_ATTENTION": Placement.CONTENT,
}

#: Memory order of the logical axes (B, H, N, C) of one layer's view, per layout name. Mirrors
#: ``vllm.v1.kv_cache_layout.KVCacheLayout.layer_view_order`` so this module needs no vLLM to
#: load; the tests check the two agree.
LAYER_VIEW_ORDER: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3),
    "LBNHC": (0, 2, 1, 3),
    "LHBNC": (1, 0, 2, 3),
    "BLHNC": (0, 1, 2, 3),
    "BLNHC": (0, 2, 1, 3),
    "BHLNC": (0, 1, 2, 3),
}


@dataclass(frozen=True)
class PagedLayout:
    """How one engine's paged KV maps onto the codec's ``[heads, tokens, head_dim]`` K and V."""

    backend: str
    layout: str
    placement: Placement
    num_heads: int  # per rank; 1 for an MLA latent
    block_size: int
    head_dim: int  # of K and of V; for a latent, its full width

    @classmethod
    def resolve(
        cls, backend: str, *, is_mla: bool, layout: str, num_heads: int, block_size: int, head_dim: int
    ) -> PagedLayout:
        """The layout of a backend, or :class:`UnsupportedLayout` naming what is not known."""
        if layout not in LAYER_VIEW_ORDER:
            raise UnsupportedLayout(
                f"KV cache layout {layout!r} is not one the connector knows ({sorted(LAYER_VIEW_ORDER)})"
            )
        if is_mla:
            placement = Placement.LATENT
            num_heads = 1
        elif backend in BACKEND_PLACEMENT:
            placement = BACKEND_PLACEMENT[backend]
        else:
            raise UnsupportedLayout(
                f"attention backend {backend!r} (layout {layout}): the connector does not know where it "
                f"keeps K and V; supported: {sorted(BACKEND_PLACEMENT)} and MLA backends"
            )
        if placement is Placement.TOKENS and layout != "LBHNC":
            raise UnsupportedLayout(
                f"backend {backend} keeps K and V along the tokens of each (block, head) plane, which is "
                f"only contiguous in layout LBHNC; the engine chose {layout}"
            )
        return cls(backend, layout, placement, num_heads, block_size, head_dim)

    @property
    def content(self) -> int:
        """C of vLLM's view, in elements."""
        return self.head_dim if self.placement is Placement.LATENT else 2 * self.head_dim

    def frame_shape(self, tokens: int) -> tuple[int, int, int]:
        """``[heads, tokens, dim]`` of K (and of V) in one stored frame.

        A latent is stored as its two halves (K = first half, V = second): the codec
        keeps K and V apart and this is bit-exact under ``lossless``, the only profile
        allowed for a latent (:func:`check_profile`).
        """
        if self.placement is Placement.LATENT:
            return (1, tokens, self.head_dim // 2)
        return (self.num_heads, tokens, self.head_dim)


def check_profile(placement: Placement, profile: str, head_dim: int) -> None:
    """Refuse at start a codec profile that cannot be applied honestly to this KV."""
    if placement is not Placement.LATENT:
        return
    if profile != "lossless":
        raise UnsupportedLayout(
            f"this model keeps an MLA latent, not K and V: profile {profile!r} would quantize it as if "
            "it were K and V; use profile 'lossless'"
        )
    if head_dim % 2:
        raise UnsupportedLayout(f"MLA latent width {head_dim} is odd; the connector stores it as two halves")


def _physical_order(t: torch.Tensor) -> tuple[int, ...]:
    """Axes of ``t`` from outermost to innermost in memory (size-1 axes carry no order)."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]

    def outer_first(d: int) -> int:
        return -t.stride(d)

    return tuple(sorted(dims, key=outer_first))


class PagedKV:
    """One rank's paged cache, every layer seen as K and V ``[kernel blocks, heads, tokens, dim]``.

    ``gather`` copies whole blocks out as the codec's ``[heads, tokens, dim]`` on the
    cache's device; ``scatter`` writes such tensors back into blocks. Both work
    through strided views, so no layout needs a special path.
    """

    def __init__(self, layout: PagedLayout, caches: Sequence[torch.Tensor], num_blocks: int) -> None:
        self.layout = layout
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ratio = 1
        for i, t in enumerate(caches):
            k, v, ratio = self._split(i, t, num_blocks)
            self.views.append((k, v))
            self.ratio = ratio
        self.device = caches[0].device if caches else torch.device("cpu")
        self.dtype = caches[0].dtype if caches else torch.float32

    def _split(self, i: int, t: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        lay = self.layout
        where = f"layer {i} ({lay.backend}, {lay.layout})"
        if t.dim() != 4:
            raise UnsupportedLayout(f"{where}: a paged KV view has 4 axes, got shape {tuple(t.shape)}")
        blocks, heads, tokens, content = t.shape
        if heads != lay.num_heads or content != lay.content:
            raise UnsupportedLayout(
                f"{where}: view {tuple(t.shape)}; expected [blocks, {lay.num_heads}, tokens, {lay.content}]"
            )
        if num_blocks <= 0 or blocks % num_blocks or tokens * (blocks // num_blocks) != lay.block_size:
            raise UnsupportedLayout(
                f"{where}: view {tuple(t.shape)} does not split {num_blocks} blocks of {lay.block_size} tokens"
            )
        want = tuple(d for d in LAYER_VIEW_ORDER[lay.layout] if t.shape[d] > 1)
        if _physical_order(t) != want or t.stride(3) != 1:
            raise UnsupportedLayout(
                f"{where}: strides {t.stride()} do not follow layout {lay.layout} "
                f"(memory order of (B, H, N, C) {LAYER_VIEW_ORDER[lay.layout]}, C innermost)"
            )
        d = lay.head_dim
        if lay.placement is Placement.CONTENT:
            k, v = t[..., :d], t[..., d:]
        elif lay.placement is Placement.LATENT:
            k, v = t[..., : d // 2], t[..., d // 2 :]
        else:  # TOKENS: the (N, C) plane read as (2N, D)
            if t.stride(2) != content:
                raise UnsupportedLayout(f"{where}: the (tokens, content) plane is not contiguous")
            plane = t.as_strided((blocks, heads, 2 * tokens, d), (t.stride(0), t.stride(1), d, 1))
            k, v = plane[:, :, :tokens], plane[:, :, tokens:]
        return k, v, blocks // num_blocks

    @property
    def num_layers(self) -> int:
        return len(self.views)

    def _kernel_ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        if self.ratio > 1:
            ids = (ids[:, None] * self.ratio + torch.arange(self.ratio)).reshape(-1)
        return ids.to(self.device)

    def gather(self, layer: int, block_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``block_ids`` (in order) as ``[heads, len * block_size, dim]``, on the cache's device."""
        k, v = self.views[layer]
        ids = self._kernel_ids(block_ids)
        return self._rows(k.index_select(0, ids)), self._rows(v.index_select(0, ids))

    @staticmethod
    def _rows(blocks: torch.Tensor) -> torch.Tensor:
        n, h, t, d = blocks.shape
        return blocks.permute(1, 0, 2, 3).reshape(h, n * t, d)

    def scatter(self, layer: int, block_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``[heads, len * block_size, dim]`` K and V into ``block_ids`` (any device, any float dtype)."""
        kv, vv = self.views[layer]
        ids = self._kernel_ids(block_ids)
        _, h, t, d = kv.shape
        for view, src in ((kv, k), (vv, v)):
            blocks = src.reshape(h, len(ids), t, d).permute(1, 0, 2, 3)
            view[ids] = blocks.to(device=view.device, dtype=view.dtype, non_blocking=True)


#: Logical ``[L, B, H, N, C]`` axis order, outermost first, of each layout's memory (vLLM's stride order).
STRIDE_ORDER: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


def allocate_views(
    layout: str,
    *,
    num_layers: int,
    num_blocks: int,
    heads: int,
    block_size: int,
    content: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Per-layer ``[B, H, N, C]`` views over one allocation, strided as vLLM lays out ``layout``.

    For the GPU check and benchmarks, which run where vLLM may not be installed; the tests
    compare these strides with vLLM's own ``create_kv_cache_views`` for every layout.
    """
    shape = (num_layers, num_blocks, heads, block_size, content)
    order = STRIDE_ORDER[layout]
    strides = [0] * 5
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= shape[dim]
    raw = torch.zeros(step, dtype=dtype, device=device)
    full = raw.as_strided(shape, strides)
    return [full[i] for i in range(num_layers)]
