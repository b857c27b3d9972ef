"""The L x L attention matrix FAVOR+ uses implicitly -- for analysis of short sequences and tests."""

from __future__ import annotations

import torch
from torch import Tensor

from .favor import DEFAULT_EPS, favor_features
from .masks import allowed_keys

__all__ = ["implied_attention"]


def implied_attention(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    kernel: str,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    rows: range | None = None,
) -> Tensor:
    """Row-normalised ``phi(Q) phi(K)^T`` (causal-masked if ``causal``): ``(B,H,L,D) -> (B,H,L,L)``.

    ``implied_attention(q, k, ...) @ v`` equals :class:`FavorAttention`'s output for the same
    projection, kernel and eps (same features, same normaliser floor). Rows sum to 1 (padded keys
    get 0). Memory is O(L^2): use it for sequences of at most a few thousand tokens.

    Args:
        q: ``(B, H, Lq, D)`` queries.
        k: ``(B, H, Lk, D)`` keys.
        projection: ``(M, D)``, e.g. ``FavorAttention.projection``.
        kernel: ``"softmax"`` or ``"relu"``.
        causal: mask keys after the query.
        key_padding_mask: bool ``(B, Lk)``, True at padding.
        eps: floor of the row normaliser.
        rows: the query rows to return (default all ``Lq``; analysis takes blocks of rows).

    Returns:
        ``(B, H, R, Lk)`` (``R = Lq`` without ``rows``) float32 (float64 for float64 input).
    """
    rows = range(q.shape[-2]) if rows is None else rows
    phi_q, phi_k = favor_features(q, k, projection, kernel, key_padding_mask)  # all rows: the key shift
    with torch.autocast(device_type=q.device.type, enabled=False):
        a = phi_q[:, :, rows.start : rows.stop] @ phi_k.transpose(-1, -2)  # (B,H,R,Lk)
        allowed = allowed_keys(rows, k.shape[-2], causal, key_padding_mask, q.device)
        if allowed is not None:
            a = a.masked_fill(~allowed, 0.0)
        return a / a.sum(dim=-1, keepdim=True).clamp_min(eps)
