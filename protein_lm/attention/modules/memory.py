"""Persistent memory key/value vectors ("all-attention", Sukhbaatar et al. 2019, arXiv 1907.01470).

Each attention layer owns ``N`` learned key/value pairs per head that do not depend on the input.
They are concatenated to the context keys and values and share the context's softmax, so a query
can put its attention mass on context tokens or on the persistent slots. With enough slots the
persistent vectors can take over the role of the feed-forward sublayer (the paper's all-attention
layer, ``memory.replace_ffn: true`` in :class:`protein_lm.model.ModelConfig`).

What the memory slots get and do not get:

* no positional encoding (they are concatenated after rotary/relative encodings are applied),
* no padding mask and no adaptive-span mask (they are always visible, mask value 1),
* visible to every query, also in causal models (FAVOR+: they initialise the running prefix state).

Parametrisation. The paper stores the persistent vectors small and rescales them where they are
used; we store ``key ~ N(0, 1/d_h)`` and ``value ~ N(0, 1/N)`` and use ``sqrt(d_h) * key`` and
``sqrt(N) * value``. The effective vectors start with unit-variance entries, like projected
context keys/values of a LayerNorm-ed input, while an Adam step on the stored parameter moves the
effective vector ``sqrt(d_h)`` (resp. ``sqrt(N)``) times faster -- the point of the rescaling.

Implementation: both backends prepend the ``N`` slots to the key/value sequence and ``N`` dummy
queries to the query sequence, then call the unchanged base kernel
(:func:`protein_lm.attention.ops.exact.exact_attention` or ``FavorAttention.forward``, Triton included)
and drop the dummy outputs. With the slots first, causal query ``N + t`` sees all slots and context
keys ``<= t``; for FAVOR+ the slots are ordinary real keys of the sequence, so they enter the shared
key stabiliser, the feature map and the normaliser exactly like context keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from protein_lm.attention.ops.implied import implied_attention
from protein_lm.attention.ops.memory import (
    persistent_attention_probs,
    persistent_exact_attention,
    prepend_memory,
)

__all__ = ["PersistentMemory", "persistent_favor_attention", "PersistentMemoryKernel"]


class PersistentMemory(nn.Module):
    """``N`` persistent key/value vectors per head.

    Args:
        num_heads: ``H``.
        dim_head: ``d_h``.
        num_slots: ``N`` (0 is allowed and makes every function here the base attention).

    Parameters: ``key (H, N, d_h)`` and ``value (H, N, d_h)``, stored scaled down; use
    :meth:`keys` / :meth:`values` (or :meth:`forward`) for the effective vectors.
    """

    def __init__(self, num_heads: int, dim_head: int, num_slots: int) -> None:
        super().__init__()
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_heads, self.dim_head, self.num_slots = num_heads, dim_head, num_slots
        self.key = nn.Parameter(torch.randn(num_heads, num_slots, dim_head) * dim_head**-0.5)
        self.value = nn.Parameter(torch.randn(num_heads, num_slots, dim_head) * max(num_slots, 1) ** -0.5)

    def keys(self) -> Tensor:
        """Effective keys ``sqrt(d_h) * key``: ``(H, N, d_h)``."""
        return self.key * math.sqrt(self.dim_head)

    def values(self) -> Tensor:
        """Effective values ``sqrt(N) * value``: ``(H, N, d_h)``."""
        return self.value * math.sqrt(max(self.num_slots, 1))

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(keys, values)``, each ``(H, N, d_h)``."""
        return self.keys(), self.values()

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, dim_head={self.dim_head}, slots={self.num_slots}"


def persistent_favor_attention(
    favor: nn.Module,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """FAVOR+ over context + persistent memory with one normaliser (``favor.causal`` respected).

    The memory keys are ordinary (unpadded) keys of the prepended sequence, so they share the key
    stabiliser and feature map with the context keys; in causal mode they sit before position 0 and
    are therefore part of every query's running state.

    Args:
        favor: a :class:`protein_lm.attention.modules.favor.FavorAttention`.
        q, k, v: ``(B, H, L, D)``.
        mem_k, mem_v: ``(H, N, D)``.
        key_padding_mask: bool ``(B, L)``, True at padding.

    Returns:
        ``(B, H, L, D)``.
    """
    n = mem_k.shape[1]
    if n == 0:
        return favor(q, k, v, key_padding_mask=key_padding_mask)
    q2, k2, v2, kpm = prepend_memory(q, k, v, mem_k, mem_v, key_padding_mask)
    return favor(q2, k2, v2, key_padding_mask=kpm)[:, :, n:]


class PersistentMemoryKernel(nn.Module):
    """A base attention kernel (exact or ``FavorAttention``) plus persistent memory slots.

    ``forward(q, k, v, key_padding_mask=None) -> (B, H, L, D)``, the model's kernel signature.

    Args:
        base: ``FavorAttention`` (``favor=True``) or any module with a ``causal`` attribute whose
            forward is exact softmax attention.
        memory: the layer's :class:`PersistentMemory`.
        causal: unidirectional attention.
        favor: whether ``base`` is a FAVOR+ kernel.
    """

    def __init__(self, base: nn.Module, memory: PersistentMemory, causal: bool, favor: bool) -> None:
        super().__init__()
        self.base, self.memory, self.causal, self.favor = base, memory, causal, favor

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        mk, mv = self.memory()
        if self.favor:
            return persistent_favor_attention(self.base, q, k, v, mk, mv, key_padding_mask)
        return persistent_exact_attention(q, k, v, mk, mv, self.causal, key_padding_mask)

    @torch.no_grad()
    def attention_probs(
        self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None, rows: range | None = None
    ) -> Tensor:
        """Attention over the context ``(B, H, R, L)``; rows sum to 1 minus the memory's share."""
        n = self.memory.num_slots
        mk, _ = self.memory()
        rows = range(q.shape[-2]) if rows is None else rows
        if not self.favor:
            probs = persistent_attention_probs(q, k, mk, self.causal, key_padding_mask)[..., n:]
            return probs[:, :, rows.start : rows.stop]
        q2, k2, _, kpm = prepend_memory(q, k, k, mk, mk, key_padding_mask)
        probs = implied_attention(
            q2,
            k2,
            self.base.projection,
            self.base.kernel,
            causal=self.causal,
            key_padding_mask=kpm,
            eps=self.base.eps,
            rows=range(n + rows.start, n + rows.stop),
        )
        return probs[:, :, :, n:]
