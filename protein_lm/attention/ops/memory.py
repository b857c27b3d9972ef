"""Persistent memory slots in attention (all-attention, Sukhbaatar et al. 2019): the pure functions.

``N`` key/value slots, the same for every input, are prepended to the keys and values (and ``N`` zero
dummy queries to the queries), so that the unchanged base attention gives the slots and the context
one softmax / one normaliser; the slots get no positions, no padding and no causal mask. The learned
slots and the kernel module are in :mod:`protein_lm.attention.modules.memory`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .exact import exact_attention
from .masks import allowed_keys

__all__ = ["prepend_memory", "persistent_exact_attention", "persistent_attention_probs"]


def prepend_memory(
    q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Prepend ``N`` memory slots to keys/values and ``N`` zero dummy queries to queries.

    Padded context positions of ``q, k, v`` are zeroed (so huge or non-finite padding cannot leak).

    ``q, k, v: (B, H, L, D)``, ``mem_k, mem_v: (H, N, D)`` -> ``(B, H, N + L, D)`` x3 and the padding
    mask extended with ``False`` (memory is never padding) to ``(B, N + L)``.
    """
    b, n = q.shape[0], mem_k.shape[1]
    if key_padding_mask is not None:
        # Zero padded q/k/v: the base kernels mask scores/features, but inf/NaN left in a padded
        # value or key would still meet a 0 weight (0 * inf = NaN) forward or in the backward.
        pad = key_padding_mask.to(torch.bool)[:, None, :, None]
        q, k, v = (x.masked_fill(pad, 0.0) for x in (q, k, v))
    mk = mem_k.to(k.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    mv = mem_v.to(v.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    q2 = torch.cat([q.new_zeros(b, q.shape[1], n, q.shape[3]), q], dim=2)
    k2 = torch.cat([mk, k], dim=2)
    v2 = torch.cat([mv, v], dim=2)
    kpm = None
    if key_padding_mask is not None:
        kpm = torch.cat([key_padding_mask.new_zeros(b, n), key_padding_mask.to(torch.bool)], dim=1)
    return q2, k2, v2, kpm


def persistent_exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Exact softmax attention over context + persistent memory, one softmax.

    Args:
        q, k, v: ``(B, H, L, D)`` (positions already encoded).
        mem_k, mem_v: ``(H, N, D)`` effective memory keys/values.
        causal: context keys ``j <= i``; memory always visible.
        key_padding_mask: bool ``(B, L)``, True at padding (context keys only).

    Returns:
        ``(B, H, L, D)``.
    """
    n = mem_k.shape[1]
    if n == 0:
        return exact_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    q2, k2, v2, kpm = prepend_memory(q, k, v, mem_k, mem_v, key_padding_mask)
    return exact_attention(q2, k2, v2, causal=causal, key_padding_mask=kpm)[:, :, n:]


def persistent_attention_probs(
    q: Tensor,
    k: Tensor,
    mem_k: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Explicit softmax probabilities over ``[memory (N), context (L)]``: ``(B, H, L, N + L)``.

    Rows sum to 1 over memory + context. O(L^2): for analysis and tests.
    """
    d = q.shape[-1]
    length = q.shape[-2]
    n = mem_k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    s_ctx = (q @ k.transpose(-1, -2)).to(ct) * d**-0.5  # (B,H,L,L)
    s_mem = torch.einsum("bhld,hnd->bhln", q, mem_k.to(q.dtype)).to(ct) * d**-0.5  # (B,H,L,N)
    allowed = allowed_keys(length, length, causal, key_padding_mask, q.device)
    if allowed is not None:
        s_ctx = s_ctx.masked_fill(~allowed, -math.inf)
    scores = torch.cat([s_mem, s_ctx], dim=-1)
    if n == 0:
        scores = torch.nan_to_num(scores, neginf=-1e30)
    return torch.softmax(scores, dim=-1)
