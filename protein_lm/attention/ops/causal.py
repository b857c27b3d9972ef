"""Causal (prefix-sum) linear attention in O(L * (M + D)) memory, forward and backward.

The primitive is ``N_t = sum_{s <= t} (q_t . k_s) v_s`` for ``q, k: (..., L, M)``, ``v: (..., L, E)``.

Algorithm (chunked, "block-parallel" form): split L into chunks of ``C`` tokens. Inside a chunk the
masked quadratic term ``tril(Q_c K_c^T) V_c`` is computed exactly (C x C per chunk, L*C in all);
across chunks a running ``M x E`` state ``S_c = sum_{c' < c} K_c'^T V_c'`` carries the prefix, so
``N_c = Q_c S_c + tril(Q_c K_c^T) V_c``. The states of a block of chunks are formed at once with a
batched matmul and a cumsum (vectorised over batch, heads and chunks); a short Python loop runs over
blocks only, carrying one ``M x E`` state, so the transient memory is bounded by ``block_bytes``.
The anti-causal variant (used by backward) runs the same loop from the end, with no flipped copies.

Backward is a ``torch.autograd.Function`` that saves only ``q, k, v`` (the inputs, O(L*(M+E)))
and recomputes the states. Each gradient is itself a (reverse-)causal linear attention::

    dQ_t = sum_{s <= t} (dN_t . v_s) k_s   = causal(dN, V, K)
    dK_s = sum_{t >= s} (v_s . dN_t) q_t   = anticausal(V, dN, Q)
    dV_s = sum_{t >= s} (k_s . q_t) dN_t   = anticausal(K, Q, dN)

so nothing of size L*M*E (the prefix-sum tensor of naive implementations) or L/C*M*E (the per-chunk
states a Python loop under autograd would keep) is ever stored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["causal_linear_attention", "causal_linear_reference", "DEFAULT_CHUNK", "DEFAULT_BLOCK_BYTES_CPU"]

DEFAULT_CHUNK = 128  # tokens per exact-quadratic chunk (see docs/attention.md for the timing sweep)
DEFAULT_BLOCK_BYTES_CPU = 16 << 20  # transient bytes per block (small blocks are reused by malloc)
DEFAULT_BLOCK_BYTES_CUDA = 256 << 20


def _block_chunks(batch: int, n: int, c: int, m: int, e: int, elem: int, budget: int) -> int:
    """Chunks per block so that a block's states and scores fit ``budget`` bytes: it counts two
    ``g*M*E`` state buffers (inclusive sums and their shifted copy; the reverse scan's flips briefly
    need a third), ``g*C*C`` scores and two ``g*C*E`` outputs."""
    per_chunk = batch * (2 * m * e + c * c + 2 * c * e) * elem
    return max(1, min(n, budget // max(1, per_chunk)))


def _causal_linear_forward(
    q: Tensor, k: Tensor, v: Tensor, chunk: int, block_bytes: int | None = None, reverse: bool = False
) -> Tensor:
    """``N_t = sum_{s<=t} (q_t.k_s) v_s`` (``s >= t`` if ``reverse``); ``(...,L,M),(...,L,M),(...,L,E) -> (...,L,E)``."""
    *batch, length, m = q.shape
    e = v.shape[-1]
    c = max(1, min(chunk, length))
    n = math.ceil(length / c)
    pad = n * c - length
    if pad:  # zero keys/values add nothing; outputs of padded queries are sliced off
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qc = q.reshape(*batch, n, c, m)
    kc = k.reshape(*batch, n, c, m)
    vc = v.reshape(*batch, n, c, e)
    # excluded[t, s]: key s is not visible to query t inside a chunk (s > t; s < t when reverse)
    excluded = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    if reverse:
        excluded = excluded.T
    out = torch.empty(*batch, n, c, e, dtype=v.dtype, device=v.device)
    if block_bytes is None:
        block_bytes = DEFAULT_BLOCK_BYTES_CUDA if q.is_cuda else DEFAULT_BLOCK_BYTES_CPU
    g = _block_chunks(math.prod(batch), n, c, m, e, q.element_size(), block_bytes)
    starts = list(range(0, n, g))
    if reverse:
        starts.reverse()
    state = None  # (..., 1, M, E): sum of k^T v over all blocks already processed
    for start in starts:
        sl = slice(start, min(n, start + g))
        qb, kb, vb = qc[..., sl, :, :], kc[..., sl, :, :], vc[..., sl, :, :]
        kv = kb.transpose(-1, -2) @ vb  # (..., g, M, E): each chunk's contribution
        incl = kv.flip(-3).cumsum(dim=-3).flip(-3) if reverse else kv.cumsum(dim=-3)
        del kv
        # State entering each chunk: the inclusive sums shifted by one chunk. Not `incl - kv`, which
        # cancels catastrophically when one chunk holds huge values (in backward, dN = dO / eps of
        # queries that see no real key, e.g. under leading padding: 20-50% error in dK, dV).
        excl = torch.zeros_like(incl)
        if reverse:
            excl[..., :-1, :, :] = incl[..., 1:, :, :]
        else:
            excl[..., 1:, :, :] = incl[..., :-1, :, :]
        total = incl[..., :1, :, :] if reverse else incl[..., -1:, :, :]  # a view of incl
        if state is not None:
            excl += state
        state = total.clone() if state is None else total + state  # a copy: incl can go now
        del incl, total
        ob = qb @ excl
        scores = (qb @ kb.transpose(-1, -2)).masked_fill_(excluded, 0.0)  # (..., g, C, C)
        ob += scores @ vb
        out[..., sl, :, :] = ob
        del excl, scores, ob
    out = out.reshape(*batch, n * c, e)
    return out[..., :length, :] if pad else out


class _CausalLinearAttention(torch.autograd.Function):
    """Autograd wrapper whose backward recomputes chunk states instead of storing them."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, chunk: int, block_bytes: int | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        ctx.chunk = chunk
        ctx.block_bytes = block_bytes
        return _causal_linear_forward(q, k, v, chunk, block_bytes)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        c, bt = ctx.chunk, ctx.block_bytes
        grad_out = grad_out.contiguous()
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = _causal_linear_forward(grad_out, v, k, c, bt)
        if ctx.needs_input_grad[1]:
            dk = _causal_linear_forward(v, grad_out, q, c, bt, reverse=True)
        if ctx.needs_input_grad[2]:
            dv = _causal_linear_forward(k, q, grad_out, c, bt, reverse=True)
        return dq, dk, dv, None, None


def causal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, chunk: int = DEFAULT_CHUNK, block_bytes: int | None = None
) -> Tensor:
    """Unnormalised causal linear attention ``N_t = sum_{s<=t} (q_t . k_s) v_s``.

    Args:
        q: ``(..., L, M)`` query features.
        k: ``(..., L, M)`` key features.
        v: ``(..., L, E)`` values.
        chunk: tokens per exact masked-quadratic chunk.
        block_bytes: bound on the transient memory of one block of chunks (states ``g*M*E`` and
            scores ``g*C*C``); default 16 MiB on CPU (stays in malloc's reusable heap), 256 MiB on CUDA.

    Returns:
        ``(..., L, E)``; memory O(L*(M+E)) in forward and backward.
    """
    if q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return _CausalLinearAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), chunk, block_bytes)


def causal_linear_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Quadratic reference ``(tril(q k^T)) v`` -- O(L^2) memory, for tests only."""
    length = q.shape[-2]
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return ((q @ k.transpose(-1, -2)) * mask) @ v
