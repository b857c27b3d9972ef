"""Exact softmax attention, the baseline every FAVOR+ result is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["exact_attention", "attention_allowed"]


def attention_allowed(
    lq: int, lk: int, causal: bool, key_padding_mask: Tensor | None, device: torch.device
) -> Tensor | None:
    """Bool mask, True where query ``t`` may attend key ``s``: ``(B or 1, 1, Lq, Lk)`` or None."""
    allowed = None
    if causal:
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:
        keys = ~key_padding_mask[:, None, None, :]  # (B,1,1,Lk)
        allowed = keys if allowed is None else allowed & keys
    return allowed


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
    allowed = attention_allowed(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    assert allowed is not None
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B,1,Lq,1) rows with no key
    # Let empty rows attend everything (finite softmax, finite gradients) and zero them afterwards.
    allowed = allowed | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.masked_fill(empty, 0.0)
