"""FAVOR+ attention (Performer), the PyTorch reference: linear-time softmax / ReLU attention
through random features (the module is :class:`protein_lm.attention.modules.favor.FavorAttention`).

``out = D^-1 phi(Q) (phi(K)^T V)`` with ``D = diag(phi(Q) phi(K)^T 1)`` (bidirectional) or its
prefix-sum version (causal, see :mod:`protein_lm.attention.ops.causal`). The L x L matrix is never
formed. The normaliser is ``max(D, eps)`` with a tiny ``eps`` (1e-30): for any normaliser above
``eps`` the output is exactly the ratio (no bias), and one that underflowed cannot give 0/0 = NaN.
Packed rows (``segment_ids``) keep attention inside each segment (:mod:`protein_lm.attention.ops.segments`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .causal import DEFAULT_CHUNK, causal_linear_attention
from .features import RELU_EPS, relu_features, softmax_features
from .masks import zero_padded
from .segments import segment_labels, segmented_linear_attention

__all__ = ["favor_bidirectional", "favor_causal", "favor_features", "DEFAULT_EPS", "KERNELS"]

# The normaliser floor only guards against 0/0: under the global key shift an early causal position can
# have a normaliser of 1e-12 or less (unit-variance q, k at D=64), which must not be floored (1e-6 made
# the first outputs ~0). Division backward stays finite down to 1e-30 (|grad| <= |out| / den <= 1e30).
DEFAULT_EPS = 1e-30
KERNELS = ("softmax", "relu")


def favor_features(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    kernel: str,
    key_padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Query and key features for ``kernel``: ``(B,H,L,D) x2 -> (B,H,L,M) x2`` (float32).

    Padded keys get zero features; padded queries (when queries and keys share L) are zeroed
    before the map so that huge or non-finite padding values stay finite. ``segment_ids`` (integer
    ``(B, L)``): softmax keys are shifted per segment (see :func:`softmax_features`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if segment_ids is not None and q.shape[-2] != k.shape[-2]:
        raise ValueError("segment_ids need queries and keys of the same length")
    q_mask = key_padding_mask if key_padding_mask is not None and q.shape[-2] == k.shape[-2] else None
    q = zero_padded(q, q_mask)
    if kernel == "softmax":
        phi_q = softmax_features(q, projection, is_query=True)
        phi_k = softmax_features(
            k, projection, is_query=False, key_padding_mask=key_padding_mask, segment_ids=segment_ids
        )
    else:
        phi_q = relu_features(q, projection, eps=RELU_EPS)
        phi_k = relu_features(k, projection, eps=RELU_EPS, key_padding_mask=key_padding_mask)
    return phi_q, phi_k


def favor_bidirectional(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    *,
    segment_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Bidirectional linear attention ``phi_q (phi_k^T v) / max(phi_q . sum_L phi_k, eps)``.

    Args:
        phi_q: ``(B, H, Lq, M)`` query features.
        phi_k: ``(B, H, L, M)`` key features.
        v: ``(B, H, L, D)`` values.
        key_padding_mask: bool ``(B, L)``, True at padding (padded keys and values are zeroed).
        eps: floor of the normaliser.
        segment_ids: integer ``(B, L)``: query ``t`` sees only the keys of its own segment (a
            maximal run of equal ids). Needs ``Lq == L``.
        chunk_size: tokens per exact masked-quadratic chunk of the segmented path.

    Returns:
        ``(B, H, Lq, D)`` in the features' dtype (float32), computed with autocast off.
    """
    dt = phi_q.dtype
    lq, lk, m, d = phi_q.shape[-2], phi_k.shape[-2], phi_k.shape[-1], v.shape[-1]
    with torch.autocast(device_type=phi_q.device.type, enabled=False):
        phi_k = zero_padded(phi_k, key_padding_mask)
        v = zero_padded(v.to(dt), key_padding_mask)
        if segment_ids is not None:
            if lq != lk:
                raise ValueError("segment_ids need queries and keys of the same length")
            return _segmented(phi_q, phi_k, v, segment_ids, "both", eps, chunk_size)
        if lq * lk * (m + d) < (lq + lk) * m * d:
            # Short rows (L below ~M*D/(M+D), e.g. 50 tokens at M=256, D=64): the same products in
            # the other order, (phi_q phi_k^T) v, cost less than the (M, D) state of every row.
            scores = phi_q @ phi_k.transpose(-1, -2)  # (B,H,Lq,L)
            return (scores @ v) / scores.sum(dim=-1, keepdim=True).clamp_min(eps)
        kv = phi_k.transpose(-1, -2) @ v  # (B,H,M,D)
        ksum = phi_k.sum(dim=-2)  # (B,H,M)
        num = phi_q @ kv  # (B,H,Lq,D)
        den = (phi_q @ ksum.unsqueeze(-1)).clamp_min(eps)  # (B,H,Lq,1)
        return num / den


def favor_causal(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    *,
    segment_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Causal linear attention: ``out_t = phi_q[t] sum_{s<=t} phi_k[s] v_s^T / max(phi_q[t] sum_{s<=t} phi_k[s], eps)``.

    The normaliser rides along as an extra all-ones value column, so one chunked pass (and one
    recomputing backward) yields numerator and normaliser together. Memory O(L*(M+D)).

    Args:
        phi_q: ``(B, H, L, M)``.
        phi_k: ``(B, H, L, M)``.
        v: ``(B, H, L, D)``.
        key_padding_mask: bool ``(B, L)``, True at padding.
        eps: floor of the normaliser.
        chunk_size: tokens per exact masked-quadratic chunk.
        segment_ids: integer ``(B, L)``: the prefix restarts at each segment (a maximal run of
            equal ids), so query ``t`` sees keys ``s <= t`` of its own segment only.

    Returns:
        ``(B, H, L, D)`` in the features' dtype.
    """
    dt = phi_q.dtype
    with torch.autocast(device_type=phi_q.device.type, enabled=False):
        phi_k = zero_padded(phi_k, key_padding_mask)
        v = zero_padded(v.to(dt), key_padding_mask)
        if segment_ids is not None:
            return _segmented(phi_q, phi_k, v, segment_ids, "causal", eps, chunk_size)
        ones = torch.ones(*v.shape[:-1], 1, dtype=dt, device=v.device)
        nd = causal_linear_attention(phi_q, phi_k, torch.cat([v, ones], dim=-1), chunk=chunk_size)
        num, den = nd[..., :-1], nd[..., -1:]
        return num / den.clamp_min(eps)


def _segmented(phi_q, phi_k, v, segment_ids, window: str, eps: float, chunk_size: int) -> Tensor:
    """Normalised segmented linear attention (padded keys and values already zeroed); the normaliser
    rides along as an all-ones value column, as in :func:`favor_causal`. Short rows take the
    quadratic form, masked by segment equality (``L <= ~M*D/(M+D)``, like the bidirectional path)."""
    labels = segment_labels(segment_ids, phi_q.shape[-2]).to(phi_q.device)
    length, m, d = phi_q.shape[-2], phi_q.shape[-1], v.shape[-1]
    if length * (m + d) < 2 * m * d:
        allowed = labels[:, None, :, None] == labels[:, None, None, :]  # (B,1,L,L)
        if window == "causal":
            allowed = allowed.tril()
        scores = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~allowed, 0.0)  # (B,H,L,L)
        return (scores @ v) / scores.sum(dim=-1, keepdim=True).clamp_min(eps)
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    nd = segmented_linear_attention(
        phi_q, phi_k, torch.cat([v, ones], dim=-1), labels[:, None, :], window, chunk=chunk_size
    )
    num, den = nd[..., :-1], nd[..., -1:]
    return num / den.clamp_min(eps)
