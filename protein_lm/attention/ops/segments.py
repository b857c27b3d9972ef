"""Packed sequences: linear attention that stays inside each segment, in O(L * (M + E)) memory.

A row of a packed batch holds several proteins; ``segment_ids (B, L)`` (any integer dtype) marks
them. A *segment* is a maximal run of equal ids, so the non-decreasing ids of a packed row give one
segment per protein. Query ``t`` sees key ``s`` only inside its own segment (and ``s <= t`` when
causal); padding is handled by the callers (zero key features and values).

The primitive, for ``q, k: (..., L, M)``, ``v: (..., L, E)`` and a window ``W`` (causal ``s <= t``,
anticausal ``s >= t``, or both = the whole segment)::

    N_t = sum_{s in W(t), seg(s) = seg(t)} (q_t . k_s) v_s

Algorithm (the chunked form of :mod:`protein_lm.attention.ops.causal`, with resets): inside a chunk of
``C`` tokens the quadratic term is masked by the window *and* by segment equality. Across chunks a
carried ``M x E`` state ``U_c = sum (k_s v_s^T)`` over the keys *before* chunk ``c`` (in the
direction of travel) that belong to the segment open at ``c``'s entry, i.e. the segment of the last
token of chunk ``c - 1``. Only the queries of that segment read it. Segments are runs, so

    U_{c+1} = contrib_c + [exit_c == exit_{c-1}] * U_c

where ``exit_c`` is the segment of chunk ``c``'s last token and ``contrib_c`` sums ``k v^T`` over
chunk ``c``'s keys of segment ``exit_c`` (the state passes through a chunk only if one segment fills
it). A block of chunks solves this binary-gated recurrence at once with a log-depth scan of affine
maps ``U -> a U + b`` (sums only, never ``inclusive - x``, which cancels badly when one chunk holds
huge values such as ``dO / eps`` in backward). Bidirectional attention runs the prefix pass and a
suffix pass (chunks walked from the end, the entry being a chunk's *first* token).

Backward (recomputing, saves only ``q, k, v`` and the labels): the gradients are segmented linear
attentions with the mirrored window, since segment equality is symmetric::

    dQ = seg(dN, V, K, W)      dK = seg(V, dN, Q, W^T)      dV = seg(K, Q, dN, W^T)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .causal import DEFAULT_BLOCK_BYTES_CPU, DEFAULT_BLOCK_BYTES_CUDA, DEFAULT_CHUNK

__all__ = ["segment_labels", "segment_amax", "segmented_linear_attention", "WINDOWS"]

WINDOWS = ("causal", "anticausal", "both")
_MIRROR = {"causal": "anticausal", "anticausal": "causal", "both": "both"}


def segment_labels(segment_ids: Tensor, length: int | None = None) -> Tensor:
    """``(B, L)`` integer ids -> ``(B, L)`` int64 labels ``0, 1, ...``: the index of each position's run
    of equal ids in its row (non-decreasing by construction; labels of labels are the same labels)."""
    if segment_ids.dim() != 2 or segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(
            f"segment_ids must be an integer (B, L) tensor, got {segment_ids.dtype} "
            f"{tuple(segment_ids.shape)}"
        )
    if length is not None and segment_ids.shape[1] != length:
        raise ValueError(f"segment_ids length {segment_ids.shape[1]} != L = {length}")
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).to(torch.int64)  # (B, L-1)
    return F.pad(change.cumsum(dim=1), (1, 0))


def segment_amax(x: Tensor, labels: Tensor) -> Tensor:
    """Max of ``x (B, H, L)`` over each position's segment, gathered back to ``(B, H, L)``.

    ``labels``: ``(B, L)`` from :func:`segment_labels` (< L, so an L-long buffer holds every segment
    without a host sync to count them). Entries of ``-inf`` (padding) never win unless a whole
    segment is ``-inf``."""
    idx = labels[:, None, :].expand_as(x)
    seg_max = torch.full_like(x, -math.inf).scatter_reduce(-1, idx, x, "amax", include_self=True)
    return seg_max.gather(-1, idx)


def _block_chunks(batch: int, n: int, c: int, m: int, e: int, elem: int, budget: int) -> int:
    """Chunks per block so that a block's transients fit ``budget`` bytes: four ``g*M*E`` state
    buffers (contributions, the scan's two, the states entering each chunk), ``g*C*C`` scores and
    two ``g*C*E`` outputs."""
    per_chunk = batch * (4 * m * e + c * c + 2 * c * e) * elem
    return max(1, min(n, budget // max(1, per_chunk)))


def _affine_scan(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive composition of the maps ``U -> a_i U + b_i`` along dim -3 (``a (..., g)`` 0/1,
    ``b (..., g, M, E)``): returns ``A_i = prod_{j<=i} a_j`` and ``B_i`` with
    ``f_i(...f_0(U)) = A_i U + B_i``. Hillis-Steele doubling: log2(g) steps of additions only."""
    g = b.shape[-3]
    d = 1
    while d < g:
        b_new = b.clone()
        b_new[..., d:, :, :] += a[..., d:, None, None] * b[..., :-d, :, :]
        a_new = a.clone()
        a_new[..., d:] *= a[..., :-d]
        a, b = a_new, b_new
        d *= 2
    return a, b


def _carry_pass(qc, kc, vc, sc, out, reverse: bool, g: int) -> None:
    """Adds to ``out (..., n, C, E)`` the carried-state term: each query's same-segment keys in earlier
    chunks (``reverse``: later chunks). Chunked inputs ``(..., n, C, *)``, labels ``sc (..., n, C)``."""
    n = qc.shape[-3]
    starts = list(range(0, n, g))
    if reverse:
        starts.reverse()
    state = None  # (..., M, E): carried into the next block (travel order)
    state_seg = None  # (...,): the segment that state belongs to (label of the last token passed)
    for start in starts:
        sl = slice(start, min(n, start + g))
        qb, kb, vb, sb = qc[..., sl, :, :], kc[..., sl, :, :], vc[..., sl, :, :], sc[..., sl, :]
        exit_seg = sb[..., 0] if reverse else sb[..., -1]  # (..., g): label of the last token passed
        # contribution of each chunk to the state leaving it: its keys of the exit segment
        kx = kb * (sb == exit_seg[..., None]).to(kb.dtype)[..., None]
        contrib = kx.transpose(-1, -2) @ vb  # (..., g, M, E)
        del kx
        if reverse:  # the scan runs in travel order
            contrib, exit_seg = contrib.flip(-3), exit_seg.flip(-1)
        if state_seg is None:
            state_seg = torch.full_like(exit_seg[..., :1], -1)
        entry_seg = torch.cat([state_seg, exit_seg[..., :-1]], dim=-1)  # segment open at each entry
        through = (exit_seg == entry_seg).to(contrib.dtype)  # one segment fills the chunk
        a, b = _affine_scan(through, contrib)
        del contrib
        # state entering chunk i = f_{i-1}(...f_0(state)): A_{i-1} state + B_{i-1}
        enter = torch.zeros_like(b)
        enter[..., 1:, :, :] = b[..., :-1, :, :]
        if state is not None:
            a_prev = torch.cat([torch.ones_like(a[..., :1]), a[..., :-1]], dim=-1)
            enter += a_prev[..., None, None] * state[..., None, :, :]
            state = b[..., -1, :, :] + a[..., -1, None, None] * state
        else:
            state = b[..., -1, :, :].clone()
        state_seg = exit_seg[..., -1:]
        del a, b
        if reverse:
            enter, entry_seg = enter.flip(-3), entry_seg.flip(-1)
        # only the queries of the segment open at the chunk's entry have keys outside it
        qx = qb * (sb == entry_seg[..., None]).to(qb.dtype)[..., None]
        out[..., sl, :, :] += qx @ enter
        del qx, enter


def _segmented_forward(
    q: Tensor, k: Tensor, v: Tensor, labels: Tensor, window: str, chunk: int, block_bytes: int | None
) -> Tensor:
    """``N_t = sum_{s in window(t), seg(s) = seg(t)} (q_t . k_s) v_s``;
    ``(...,L,M), (...,L,M), (...,L,E), labels (...,L) broadcastable -> (...,L,E)``."""
    *batch, length, m = q.shape
    e = v.shape[-1]
    c = max(1, min(chunk, length))
    n = math.ceil(length / c)
    pad = n * c - length
    if pad:  # zero keys/values add nothing; the padded labels repeat the last one
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        labels = torch.cat([labels, labels[..., -1:].expand(*labels.shape[:-1], pad)], dim=-1)
    qc = q.reshape(*batch, n, c, m)
    kc = k.reshape(*batch, n, c, m)
    vc = v.reshape(*batch, n, c, e)
    sc = labels.reshape(*labels.shape[:-1], n, c)
    if block_bytes is None:
        block_bytes = DEFAULT_BLOCK_BYTES_CUDA if q.is_cuda else DEFAULT_BLOCK_BYTES_CPU
    g = _block_chunks(math.prod(batch), n, c, m, e, q.element_size(), block_bytes)
    out = torch.empty(*batch, n, c, e, dtype=v.dtype, device=v.device)
    # intra-chunk: the quadratic term under the window and the same-segment mask
    tri = torch.ones(c, c, dtype=torch.bool, device=q.device)
    tri = {"causal": tri.tril(), "anticausal": tri.triu(), "both": tri}[window]
    for start in range(0, n, g):
        sl = slice(start, min(n, start + g))
        sb = sc[..., sl, :]
        allowed = (sb[..., :, None] == sb[..., None, :]) & tri  # (..., g, C, C), broadcast over heads
        scores = (qc[..., sl, :, :] @ kc[..., sl, :, :].transpose(-1, -2)).masked_fill_(~allowed, 0.0)
        out[..., sl, :, :] = scores @ vc[..., sl, :, :]
        del scores, allowed
    if window in ("causal", "both"):
        _carry_pass(qc, kc, vc, sc, out, reverse=False, g=g)
    if window in ("anticausal", "both"):
        _carry_pass(qc, kc, vc, sc, out, reverse=True, g=g)
    out = out.reshape(*batch, n * c, e)
    return out[..., :length, :] if pad else out


class _SegmentedLinearAttention(torch.autograd.Function):
    """Autograd wrapper whose backward recomputes the carried states instead of storing them."""

    @staticmethod
    def forward(ctx, q, k, v, labels, window, chunk, block_bytes):  # type: ignore[override]
        ctx.save_for_backward(q, k, v, labels)
        ctx.window, ctx.chunk, ctx.block_bytes = window, chunk, block_bytes
        return _segmented_forward(q, k, v, labels, window, chunk, block_bytes)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, labels = ctx.saved_tensors
        w, c, bt = ctx.window, ctx.chunk, ctx.block_bytes
        grad_out = grad_out.contiguous()
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = _segmented_forward(grad_out, v, k, labels, w, c, bt)
        if ctx.needs_input_grad[1]:
            dk = _segmented_forward(v, grad_out, q, labels, _MIRROR[w], c, bt)
        if ctx.needs_input_grad[2]:
            dv = _segmented_forward(k, q, grad_out, labels, _MIRROR[w], c, bt)
        return dq, dk, dv, None, None, None, None


def segmented_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    labels: Tensor,
    window: str = "causal",
    chunk: int = DEFAULT_CHUNK,
    block_bytes: int | None = None,
) -> Tensor:
    """Unnormalised linear attention inside segments: ``N_t = sum_{s in window(t), seg(s)=seg(t)} (q_t.k_s) v_s``.

    Args:
        q: ``(..., L, M)`` query features.
        k: ``(..., L, M)`` key features.
        v: ``(..., L, E)`` values.
        labels: integer segment labels broadcastable to ``(..., L)`` (e.g. ``(B, 1, L)`` for
            ``(B, H, L, *)`` inputs), non-decreasing along L (:func:`segment_labels`).
        window: ``"causal"`` (``s <= t``), ``"anticausal"`` (``s >= t``) or ``"both"``.
        chunk: tokens per exact masked-quadratic chunk.
        block_bytes: bound on the transient memory of one block of chunks (as in
            :func:`protein_lm.attention.ops.causal.causal_linear_attention`).

    Returns:
        ``(..., L, E)``; memory O(L*(M+E)) in forward and backward.
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    labels = labels.to(device=q.device, dtype=torch.int64)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), labels, window, chunk, block_bytes)
    return _SegmentedLinearAttention.apply(*args)
