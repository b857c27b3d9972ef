"""Exact attention over packed rows: a query attends only keys of its own segment (its protein).

Two implementations of one mask, ``allowed[b, t, s] = seg[b, t] == seg[b, s] and not pad[b, s]``
(and ``s <= t`` when causal):

* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` (the CUDA path): blocks of
  the score matrix that cross segments are skipped, not computed and masked, so a row of short
  proteins costs about what the proteins would cost alone. ``flex_attention`` is compiled once at
  module level (eager calls would run an unfused reference that materialises the scores); under
  ``torch.compile`` the model's graph calls it directly.
* ``dense``: ``scaled_dot_product_attention`` with the explicit boolean mask ``(B, 1, L, L)`` (the CPU
  path and the reference).

The mask is built once per forward pass (:func:`segment_mask`) and shared by every layer.
A query with no allowed key at all (a padded position whose segment holds only padding) gets output 0
in both, as :func:`protein_lm.attention.ops.exact.exact_attention` gives a fully padded row.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SegmentMask", "segment_mask", "segment_attention", "allowed_in_segments", "positions_from_segments"]


class SegmentMask:
    """What :func:`segment_attention` needs, built once per forward (:func:`segment_mask`).

    Holds either ``block_mask`` (flex) or ``allowed`` ``(B, 1, L, L)`` bool and ``empty``
    ``(B, 1, L, 1)`` bool (dense).
    """

    def __init__(self, block_mask: Any = None, allowed: Tensor | None = None, empty: Tensor | None = None):
        self.block_mask, self.allowed, self.empty = block_mask, allowed, empty


def allowed_in_segments(segment_ids: Tensor, padding_mask: Tensor | None, causal: bool) -> Tensor:
    """``(B, 1, L, L)`` bool, True where query ``t`` may attend key ``s`` (same segment, real key)."""
    seg = segment_ids
    allowed = seg[:, :, None] == seg[:, None, :]  # (B, L, L)
    if padding_mask is not None:
        allowed = allowed & ~padding_mask[:, None, :]
    if causal:
        length = seg.shape[1]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    return allowed[:, None]


def segment_mask(
    segment_ids: Tensor, padding_mask: Tensor | None, causal: bool, backend: str = "auto"
) -> SegmentMask:
    """The mask of one forward pass.

    Args:
        segment_ids: ``(B, L)`` integer segment of each token; equal ids anywhere in a row are one segment
            here, so callers pass run labels (:func:`protein_lm.attention.ops.segments.segment_labels`).
        padding_mask: ``(B, L)`` bool, True at padding (never attended), or None.
        causal: also ``s <= t``.
        backend: ``flex``, ``dense``, or ``auto`` (flex on CUDA, dense elsewhere).
    """
    if backend == "auto":
        backend = "flex" if segment_ids.is_cuda else "dense"
    if backend == "dense":
        allowed = allowed_in_segments(segment_ids, padding_mask, causal)
        return SegmentMask(allowed=allowed, empty=~allowed.any(dim=-1, keepdim=True))
    if backend != "flex":
        raise ValueError(f"backend must be auto, flex or dense, got {backend!r}")
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids
    pad = padding_mask if padding_mask is not None else torch.zeros_like(seg, dtype=torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (seg[b, q_idx] == seg[b, kv_idx]) & ~pad[b, kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    b, length = seg.shape
    # _compile: build the block mask without materialising (B, L, L) (needs a compiler: CUDA only;
    # inside a compiled model the surrounding graph compiles it anyway)
    eager_cuda = seg.is_cuda and not torch.compiler.is_compiling()
    block_mask = create_block_mask(mask_mod, b, None, length, length, device=seg.device, _compile=eager_cuda)
    return SegmentMask(block_mask=block_mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, mask: SegmentMask) -> Tensor:
    """``(B, H, L, D) x3 -> (B, H, L, D)``: softmax attention within segments (scale ``1/sqrt(D)``)."""
    if mask.block_mask is not None:
        from torch.nn.attention.flex_attention import flex_attention

        if q.is_cuda and not torch.compiler.is_compiling():
            fn = _compiled_flex()
        else:  # inside a compiled graph, or the unfused CPU reference (forward only)
            fn = flex_attention
        return fn(q, k, v, block_mask=mask.block_mask)
    assert mask.allowed is not None and mask.empty is not None
    # Empty rows attend everything (finite softmax and gradients) and are zeroed afterwards.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed | mask.empty)
    return out.masked_fill(mask.empty, 0.0)


def positions_from_segments(segment_ids: Tensor) -> Tensor:
    """``(B, L)`` int64 position of each token inside its segment (0 at a segment's first token).

    Segments must be contiguous runs (as in packed rows).
    """
    b, length = segment_ids.shape
    t = torch.arange(length, device=segment_ids.device).expand(b, length)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, L) start of own segment
    return t - first
