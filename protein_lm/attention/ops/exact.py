"""Exact softmax attention, the baseline every FAVOR+ result is compared with."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .masks import allowed_keys

__all__ = ["exact_attention", "exact_probs"]


def exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T / sqrt(D) + mask) v`` through ``F.scaled_dot_product_attention``.

    Args:
        q: ``(B, H, Lq, D)``.
        k: ``(B, H, Lk, D)``.
        v: ``(B, H, Lk, Dv)``.
        causal: query ``t`` sees keys ``s <= t``.
        key_padding_mask: bool ``(B, Lk)``, True at padding.

    Returns:
        ``(B, H, Lq, Dv)``. A query that may attend no key at all (e.g. a padded first position under
        causal masking) gets output 0 -- not NaN -- and a zero gradient.
    """
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    allowed = allowed_keys(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    assert allowed is not None
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B,1,Lq,1) rows with no key
    # Let empty rows attend everything (finite softmax, finite gradients) and zero them afterwards.
    allowed = allowed | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.masked_fill(empty, 0.0)


def exact_probs(
    q: Tensor,
    k: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    rows: range | None = None,
) -> Tensor:
    """Explicit ``softmax(q k^T / sqrt(D) + mask)`` in float32, for analysis: O(R * Lk) memory.

    Args:
        q: ``(B, H, Lq, D)``.
        k: ``(B, H, Lk, D)``.
        causal: query ``t`` sees keys ``s <= t``.
        key_padding_mask: bool ``(B, Lk)``, True at padding.
        rows: the query rows to return (default all ``Lq``).

    Returns:
        ``(B, H, R, Lk)``; rows sum to 1, except a query that may attend no key, whose row is 0 (as
        its :func:`exact_attention` output).
    """
    rows = range(q.shape[-2]) if rows is None else rows
    scores = (q[:, :, rows.start : rows.stop].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = allowed_keys(rows, k.shape[-2], causal, key_padding_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1).nan_to_num(nan=0.0)  # (B, H, R, Lk)
