"""``ExactAttention``: softmax attention through SDPA, with ``FavorAttention``'s call signature."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protein_lm.attention.ops.exact import exact_attention, exact_probs
from protein_lm.attention.ops.exact_segments import SegmentMask, segment_attention

__all__ = ["ExactAttention"]


class ExactAttention(nn.Module):
    """Exact softmax attention over ``(B, H, L, D)`` tensors (no projections, no parameters).

    Packed rows take a :class:`SegmentMask` built once per pass for all layers (``segment_mask``,
    :meth:`protein_lm.model.ProteinLM.segments`), not raw ids: building the mask costs more than one
    layer's attention.
    """

    takes_segment_mask = True

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def extra_repr(self) -> str:
        return f"causal={self.causal}"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
        segment_mask: SegmentMask | None = None,
    ) -> Tensor:
        """``segment_mask`` holds the padding and causal masks: ``key_padding_mask`` is then not read."""
        if segment_mask is not None:
            return segment_attention(q, k, v, segment_mask)
        return exact_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)

    @torch.no_grad()
    def attention_probs(
        self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None, rows: range | None = None
    ) -> Tensor:
        """Explicit softmax probabilities ``(B, H, R, L)`` (:func:`exact_probs`; O(R * L) memory)."""
        return exact_probs(q, k, self.causal, key_padding_mask, rows)
