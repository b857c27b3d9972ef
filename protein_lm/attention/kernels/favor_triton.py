"""Fused Triton kernels for FAVOR+ attention (bidirectional and causal, softmax and ReLU features).

Same API and numerics as the PyTorch reference (:mod:`protein_lm.attention.favor`,
docs/architecture.md "Softmax-kernel numerics"), but the ``(B, H, L, M)`` feature tensors are never
written to memory: every kernel recomputes the features of the rows it touches from ``q``/``k``
and the projection (one ``(T, D) x (D, BM)`` product per tile and feature slice), applies the
stabiliser and ``exp`` in registers and feeds them straight into the next tensor-core product.

The M features are handled in ``NS = M / BM`` slices of ``BM`` (<= 64) columns, so no ``(T, M)`` tile
is ever live. ``T`` = 64-row tile; a *split* is a run of consecutive tiles owned by one program.

Shared by both modes:

* ``_key_state_kernel``  per (split, slice): ``sum phi_k^T V`` (BM x D) and ``sum phi_k`` (BM), with an
  online max so that one pass gives the shared key shift (``max`` over real keys of ``u + h``) --
  partial sums are rescaled like flash attention's.

Bidirectional (the states are constant over the sequence: each tile reads them, per slice, from L2):

* ``_bid_fwd_kernel``       ``out = phi_q S / max(phi_q z, eps)``; the per-query shift is an online max
  over the slices (accumulators rescaled), stored for the backward.
* ``_bid_dq_state_kernel``  per (split, slice): slice j's part of ``dq`` and the split's partial query
  state ``G_j = sum phi_q^T dN`` (``dN = dO / den``), ``gz_j = sum phi_q ddn`` in one pass.
* ``_bid_dkv_kernel``       ``dk, dv`` one tile at a time from ``G``.

Causal (a running state per slice is carried along each split: one slice per program, so the
state is one ``(BM, D)`` fp32 tile and never spills):

* ``_rowmax_kernel``      the per-query shift (max over all M features), needed before any slice.
* ``_causal_fwd_kernel``  ``num, den += phi_q S + tril(phi_q phi_k^T) [V, 1]``, then ``S += phi_k^T V``.
* ``_causal_dq_kernel``   the same walk, producing ``dq`` and the split's partial query state.
* ``_causal_dkv_kernel``  the reverse walk (suffix states of ``phi_q^T dN``), producing ``dk, dv``.

Slice-parallel programs add their contributions (linear in the slices) to zeroed float32 buffers
with atomics; a cast / divide in PyTorch finishes them.
Between kernels, tiny PyTorch ops combine the per-split partial sums (``(B*H, splits, M, D)``,
a few tens of MB): a max-rescaled sum (bidirectional) or an exclusive prefix / suffix scan (causal).
Backward recomputes everything from ``q, k, v, out`` and the per-row normaliser and shift.

Precision: inputs bf16 (or fp32). The projection ``x W^T`` that feeds ``exp`` runs as two bf16
products against ``W = W_hi + W_lo`` (about 16 mantissa bits, the cost of one tf32 product);
features, normalisers and all accumulators are float32; the products of features with values or
states use bf16 operands with float32 accumulation (float32/tf32 when the inputs are float32).
Shifts are treated as constants in backward (they cancel in the ratio), as in the reference.
The float32 atomic sums (``dq``; causal ``out``, ``dk``, ``dv``) depend in their last bits on the
order the slices land in, so two runs can differ by float32 rounding (not bitwise reproducible).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["favor_attention_triton", "DEFAULT_BLOCK"]

RELU_EPS = 1e-3
DEFAULT_BLOCK = 64
_NEG = -1.0e30
LAST_LAUNCH: dict = {}  # kernel name -> last compiled kernel (register / spill report for tuning)
_NEG_K = tl.constexpr(-1.0e30)  # the same, usable inside kernels


# --------------------------------------------------------------------------------------------- #
# jit helpers
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _logits(x, whi, wlo, scale, SOFTMAX: tl.constexpr, SPLIT_W: tl.constexpr):
    """``(T, D)`` rows -> ``(T, BM)`` float32: ``u + h`` (softmax, with x' = x*scale) or ``u`` (relu)."""
    if SPLIT_W:
        u = tl.dot(x, tl.trans(whi)) + tl.dot(x, tl.trans(wlo))
    else:
        u = tl.dot(x.to(tl.float32), tl.trans(whi.to(tl.float32)))
    if SOFTMAX:
        xf = x.to(tl.float32)
        u = u * scale - (0.5 * scale * scale) * tl.sum(xf * xf, axis=1)[:, None]
    return u


@triton.jit
def _key_phi(s, valid, shift, inv_sqrt_m, SOFTMAX: tl.constexpr):
    if SOFTMAX:
        phi = tl.exp(s - shift) * inv_sqrt_m
    else:
        phi = tl.maximum(s, 0.0) + 1e-3
    return tl.where(valid[:, None], phi, 0.0)


@triton.jit
def _qphi_from_logits(sq, c_row, inv_sqrt_m, SOFTMAX: tl.constexpr):
    if SOFTMAX:
        phi = tl.exp(sq - c_row[:, None]) * inv_sqrt_m
    else:
        phi = tl.maximum(sq, 0.0) + 1e-3
    return phi


@triton.jit
def _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX: tl.constexpr, SPLIT_W: tl.constexpr):
    """Query logits and features with the stored per-row shift ``c_row``."""
    sq = _logits(q, whi, wlo, scale, SOFTMAX, SPLIT_W)
    return sq, _qphi_from_logits(sq, c_row, inv_sqrt_m, SOFTMAX)


@triton.jit
def _feat_grad(dphi, phi, s, x, wf, scale, SOFTMAX: tl.constexpr):
    """Gradient of the feature map w.r.t. the input rows ``x`` (shift treated as constant)."""
    if SOFTMAX:
        ds = dphi * phi
        dx = tl.dot(ds, wf) * scale - (scale * scale) * x.to(tl.float32) * tl.sum(ds, axis=1)[:, None]
    else:
        du = tl.where(s > 0.0, dphi, 0.0)
        dx = tl.dot(du, wf)
    return dx


@triton.jit
def _rows_valid(PAD, b, rows, L, HAS_PAD: tl.constexpr):
    valid = rows < L
    if HAS_PAD:
        p = tl.load(PAD + b * L + rows, mask=rows < L, other=1)
        valid = valid & (p == 0)
    return valid


@triton.jit
def _tile(PAD, b, base, row0, L, T: tl.constexpr, D: tl.constexpr, HAS_PAD: tl.constexpr):
    """Rows ``row0 .. row0 + T`` of one (batch, head): their indices, in-bounds and real-token masks,
    and the ``(T, D)`` element offsets of those rows in q / k / v / o (``base`` = the head's start)."""
    rows = row0 + tl.arange(0, T)
    ptr = base + rows[:, None] * D + tl.arange(0, D)[None, :]
    return rows, rows < L, _rows_valid(PAD, b, rows, L, HAS_PAD), ptr


@triton.jit
def _slice_offsets(j, BM: tl.constexpr, D: tl.constexpr):
    """Feature indices of slice ``j`` and the ``(BM, D)`` offsets of its rows in W or in a state."""
    offs_m = j * BM + tl.arange(0, BM)
    return offs_m, offs_m[:, None] * D + tl.arange(0, D)[None, :]


@triton.jit
def _walk_program(n_walk, walk_len):
    """Per-tile kernels: program -> (row of B*H, first row of its walk)."""
    pid = tl.program_id(0)
    return pid // n_walk, (pid % n_walk) * walk_len


@triton.jit
def _split_slice(n_split, NS: tl.constexpr):
    """Program -> (row of B*H, split, feature slice); the slices of one split are adjacent programs,
    so the rows they all read are fetched from memory once and then hit L2."""
    pid = tl.program_id(0)
    j = pid % NS
    rest = pid // NS
    return rest // n_split, rest % n_split, j


@triton.jit
def _dn(DO, O, DEN_ROW, rows, ptr, inb, eps, dtype: tl.constexpr):
    """``dN = dO / den`` (rounded to the product dtype) and ``d(out)/d(den) = -rowsum(dN * O)``
    computed from that same rounded dN, so that ``dN . (v - o)`` cancels exactly."""
    do = tl.load(DO + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
    o = tl.load(O + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
    den = tl.load(DEN_ROW + rows, mask=inb, other=1.0)
    dn_c = (do / den[:, None]).to(dtype)
    ddn = tl.where(den > eps, -tl.sum(dn_c.to(tl.float32) * o, axis=1), 0.0)
    return dn_c, ddn, den


# --------------------------------------------------------------------------------------------- #
# kernels shared by both modes
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _key_state_kernel(
    K,
    V,
    PAD,
    WHI,
    WLO,
    SP,
    ZP,
    MP,
    H,
    L,
    split_len,
    n_split,
    scale,
    inv_sqrt_m,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Per (split, feature slice): SP = sum phi_k^T V, ZP = sum phi_k, MP = the split's key shift."""
    NS: tl.constexpr = M // BM
    bh, sp, ms = _split_slice(n_split, NS)
    b = bh // H
    offs_m, w_off = _slice_offsets(ms, BM, D)
    base = bh.to(tl.int64) * L * D
    acc = tl.zeros([BM, D], dtype=tl.float32)
    z = tl.zeros([BM], dtype=tl.float32)
    m_run = tl.max(tl.full([T], _NEG_K, tl.float32), axis=0)
    start = sp * split_len
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    for t0 in range(0, split_len, T):
        rows, _, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        s = _logits(k, whi, wlo, scale, SOFTMAX, SPLIT_W)
        if SOFTMAX:  # online max over the split's real keys; partial sums rescaled as it grows
            tmax = tl.max(tl.max(tl.where(valid[:, None], s, _NEG_K), axis=1), axis=0)
            m_new = tl.maximum(m_run, tmax)
            alpha = tl.exp(m_run - m_new)
            acc = acc * alpha
            z = z * alpha
            m_run = m_new
        phi = _key_phi(s, valid, m_run, inv_sqrt_m, SOFTMAX)
        acc += tl.dot(tl.trans(phi.to(v.dtype)), v)
        z += tl.sum(phi, axis=0)
    out = (bh * n_split + sp).to(tl.int64)
    tl.store(SP + out * M * D + w_off, acc)
    tl.store(ZP + out * M + offs_m, z)
    tl.store(MP + out * NS + ms + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + m_run)


# --------------------------------------------------------------------------------------------- #
# bidirectional: the (M, D) states are constant, read per slice and tile from L2 (in the input dtype)
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _bid_fwd_kernel(
    Q,
    PAD,
    WHI,
    WLO,
    S0,
    Z0,
    O,
    DEN,
    ROWC,
    H,
    L,
    walk_len,
    n_walk,
    scale,
    inv_sqrt_m,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    NS: tl.constexpr = M // BM
    bh, start = _walk_program(n_walk, walk_len)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    st = bh.to(tl.int64)
    for t0 in range(0, walk_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        num = tl.zeros([T, D], dtype=tl.float32)
        den = tl.zeros([T], dtype=tl.float32)
        m_row = tl.full([T], _NEG_K, tl.float32)
        for j in tl.static_range(NS):
            offs_m, w_off = _slice_offsets(j, BM, D)
            sq = _logits(q, tl.load(WHI + w_off), tl.load(WLO + w_off), scale, SOFTMAX, SPLIT_W)
            s = tl.load(S0 + st * M * D + w_off)
            z = tl.load(Z0 + st * M + offs_m)
            if SOFTMAX:  # online per-row max over the slices; accumulators rescaled as it grows
                m_new = tl.maximum(m_row, tl.max(sq, axis=1))
                alpha = tl.exp(m_row - m_new)
                num = num * alpha[:, None]
                den = den * alpha
                phi = tl.exp(sq - m_new[:, None]) * inv_sqrt_m
                m_row = m_new
            else:
                phi = tl.maximum(sq, 0.0) + 1e-3
            num += tl.dot(phi.to(s.dtype), s)
            den += tl.sum(phi * z[None, :], axis=1)
        den = tl.maximum(den, eps)
        tl.store(O + ptr, (num / den[:, None]).to(O.dtype.element_ty), mask=inb[:, None])
        tl.store(DEN + bh.to(tl.int64) * L + rows, den, mask=inb)
        if SOFTMAX:
            tl.store(ROWC + bh.to(tl.int64) * L + rows, m_row, mask=inb)


@triton.jit
def _bid_dq_state_kernel(
    Q,
    O,
    DO,
    DEN,
    ROWC,
    PAD,
    WHI,
    WLO,
    WF,
    S0,
    Z0,
    GP,
    GZP,
    DQ,
    H,
    L,
    split_len,
    n_split,
    scale,
    inv_sqrt_m,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Per (split, slice j): adds slice j's part of dq to DQ and stores the split's partial query
    state ``G_j = sum phi_q^T dN``, ``gz_j = sum phi_q ddn`` -- one pass over the queries for both."""
    NS: tl.constexpr = M // BM
    bh, sp, j = _split_slice(n_split, NS)
    b = bh // H
    offs_m, w_off = _slice_offsets(j, BM, D)
    base = bh.to(tl.int64) * L * D
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    wf = tl.load(WF + w_off)
    s = tl.load(S0 + bh.to(tl.int64) * M * D + w_off)  # (BM, D) key state, input dtype
    z = tl.load(Z0 + bh.to(tl.int64) * M + offs_m)
    g = tl.zeros([BM, D], dtype=tl.float32)
    gz = tl.zeros([BM], dtype=tl.float32)
    start = sp * split_len
    for t0 in range(0, split_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        c_row = tl.load(ROWC + bh.to(tl.int64) * L + rows, mask=inb, other=0.0)
        dn_c, ddn, den = _dn(DO, O, DEN + bh.to(tl.int64) * L, rows, ptr, inb, eps, Q.dtype.element_ty)
        sq, phi_q = _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX, SPLIT_W)
        phi_q = tl.where(inb[:, None], phi_q, 0.0)
        g += tl.dot(tl.trans(phi_q.to(dn_c.dtype)), dn_c)
        gz += tl.sum(phi_q * ddn[:, None], axis=0)
        dphi = tl.dot(dn_c, tl.trans(s.to(dn_c.dtype))) + ddn[:, None] * z[None, :]
        dq = tl.where(valid[:, None], _feat_grad(dphi, phi_q, sq, q, wf, scale, SOFTMAX), 0.0)
        tl.atomic_add(DQ + ptr, dq, mask=inb[:, None], sem="relaxed")
    out = (bh * n_split + sp).to(tl.int64)
    tl.store(GP + out * M * D + w_off, g)
    tl.store(GZP + out * M + offs_m, gz)


@triton.jit
def _bid_dkv_kernel(
    K,
    V,
    PAD,
    WHI,
    WLO,
    WF,
    G0,
    GZ0,
    GMAX,
    DK,
    DV,
    H,
    L,
    walk_len,
    n_walk,
    scale,
    inv_sqrt_m,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    NS: tl.constexpr = M // BM
    bh, start = _walk_program(n_walk, walk_len)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    st = bh.to(tl.int64)
    gmax = tl.load(GMAX + bh)
    for t0 in range(0, walk_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        dk = tl.zeros([T, D], dtype=tl.float32)
        dv = tl.zeros([T, D], dtype=tl.float32)
        for j in tl.static_range(NS):
            offs_m, w_off = _slice_offsets(j, BM, D)
            sk = _logits(k, tl.load(WHI + w_off), tl.load(WLO + w_off), scale, SOFTMAX, SPLIT_W)
            phi_k = _key_phi(sk, valid, gmax, inv_sqrt_m, SOFTMAX)
            g = tl.load(G0 + st * M * D + w_off).to(v.dtype)
            gz = tl.load(GZ0 + st * M + offs_m)
            dphi = tl.where(valid[:, None], tl.dot(v, tl.trans(g)) + gz[None, :], 0.0)
            dv += tl.dot(phi_k.to(v.dtype), g)
            dk += _feat_grad(dphi, phi_k, sk, k, tl.load(WF + w_off), scale, SOFTMAX)
        dk = tl.where(valid[:, None], dk, 0.0)
        tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=inb[:, None])
        tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=inb[:, None])


# --------------------------------------------------------------------------------------------- #
# causal: one feature slice per program, its running (BM, D) state carried along the split
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _rowmax_kernel(
    Q,
    PAD,
    WHI,
    WLO,
    ROWC,
    H,
    L,
    walk_len,
    n_walk,
    scale,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Per-query shift of the softmax features: ``max_m (u + h)`` over all M (rows as in the forward)."""
    NS: tl.constexpr = M // BM
    bh, start = _walk_program(n_walk, walk_len)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    for t0 in range(0, walk_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        m_row = tl.full([T], _NEG_K, tl.float32)
        for j in tl.static_range(NS):
            offs_m, w_off = _slice_offsets(j, BM, D)
            sq = _logits(q, tl.load(WHI + w_off), tl.load(WLO + w_off), scale, True, SPLIT_W)
            m_row = tl.maximum(m_row, tl.max(sq, axis=1))
        tl.store(ROWC + bh.to(tl.int64) * L + rows, m_row, mask=inb)


@triton.jit
def _causal_fwd_kernel(
    Q,
    K,
    V,
    PAD,
    WHI,
    WLO,
    S0,
    Z0,
    GMAX,
    ROWC,
    NUM,
    DEN,
    H,
    L,
    split_len,
    n_split,
    scale,
    inv_sqrt_m,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Adds slice j's part of the numerator and normaliser of every row of the split to NUM / DEN."""
    NS: tl.constexpr = M // BM
    bh, sp, j = _split_slice(n_split, NS)
    b = bh // H
    offs_t = tl.arange(0, T)
    offs_m, w_off = _slice_offsets(j, BM, D)
    base = bh.to(tl.int64) * L * D
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    st = (bh * n_split + sp).to(tl.int64)
    s = tl.load(S0 + st * M * D + w_off)  # (BM, D) fp32 state entering the split
    z = tl.load(Z0 + st * M + offs_m)
    gmax = tl.load(GMAX + bh)
    causal = offs_t[:, None] >= offs_t[None, :]
    start = sp * split_len
    for t0 in range(0, split_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        c_row = tl.load(ROWC + bh.to(tl.int64) * L + rows, mask=inb, other=0.0)
        _, phi_q = _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX, SPLIT_W)
        phi_k = _key_phi(_logits(k, whi, wlo, scale, SOFTMAX, SPLIT_W), valid, gmax, inv_sqrt_m, SOFTMAX)
        a = tl.where(causal, tl.dot(phi_q, tl.trans(phi_k)), 0.0)  # (T, T) intra-tile scores
        num = tl.dot(phi_q.to(v.dtype), s.to(v.dtype)) + tl.dot(a.to(v.dtype), v)
        den = tl.sum(phi_q * z[None, :], axis=1) + tl.sum(a, axis=1)
        s += tl.dot(tl.trans(phi_k.to(v.dtype)), v)
        z += tl.sum(phi_k, axis=0)
        tl.atomic_add(NUM + ptr, num, mask=inb[:, None], sem="relaxed")
        tl.atomic_add(DEN + bh.to(tl.int64) * L + rows, den, mask=inb, sem="relaxed")


@triton.jit
def _causal_dq_kernel(
    Q,
    K,
    V,
    O,
    DO,
    DEN,
    ROWC,
    PAD,
    WHI,
    WLO,
    WF,
    S0,
    Z0,
    GMAX,
    DQ,
    GP,
    GZP,
    H,
    L,
    split_len,
    n_split,
    scale,
    inv_sqrt_m,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Adds slice j's part of dq (the forward walk again, with dphi_q = dN S^T + ddn z + P phi_k) and
    stores the split's partial query state ``G_j = sum phi_q^T dN``, ``gz_j`` that the dk/dv walk needs."""
    NS: tl.constexpr = M // BM
    bh, sp, j = _split_slice(n_split, NS)
    b = bh // H
    offs_t = tl.arange(0, T)
    offs_m, w_off = _slice_offsets(j, BM, D)
    base = bh.to(tl.int64) * L * D
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    wf = tl.load(WF + w_off)
    st = (bh * n_split + sp).to(tl.int64)
    s = tl.load(S0 + st * M * D + w_off)
    z = tl.load(Z0 + st * M + offs_m)
    gmax = tl.load(GMAX + bh)
    causal = offs_t[:, None] >= offs_t[None, :]
    g = tl.zeros([BM, D], dtype=tl.float32)
    gz = tl.zeros([BM], dtype=tl.float32)
    start = sp * split_len
    for t0 in range(0, split_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        c_row = tl.load(ROWC + bh.to(tl.int64) * L + rows, mask=inb, other=0.0)
        dn_c, ddn, den = _dn(DO, O, DEN + bh.to(tl.int64) * L, rows, ptr, inb, eps, Q.dtype.element_ty)
        p = tl.where(causal, tl.dot(dn_c, tl.trans(v)) + ddn[:, None], 0.0)  # (T query, T key)
        sq, phi_q = _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX, SPLIT_W)
        phi_m = tl.where(inb[:, None], phi_q, 0.0)
        g += tl.dot(tl.trans(phi_m.to(dn_c.dtype)), dn_c)
        gz += tl.sum(phi_m * ddn[:, None], axis=0)
        phi_k = _key_phi(_logits(k, whi, wlo, scale, SOFTMAX, SPLIT_W), valid, gmax, inv_sqrt_m, SOFTMAX)
        dphi = tl.dot(dn_c, tl.trans(s.to(dn_c.dtype))) + ddn[:, None] * z[None, :] + tl.dot(p, phi_k)
        s += tl.dot(tl.trans(phi_k.to(v.dtype)), v)
        z += tl.sum(phi_k, axis=0)
        dq = tl.where(valid[:, None], _feat_grad(dphi, phi_q, sq, q, wf, scale, SOFTMAX), 0.0)
        tl.atomic_add(DQ + ptr, dq, mask=inb[:, None], sem="relaxed")
    tl.store(GP + st * M * D + w_off, g)
    tl.store(GZP + st * M + offs_m, gz)


@triton.jit
def _causal_dkv_kernel(
    Q,
    K,
    V,
    O,
    DO,
    DEN,
    ROWC,
    PAD,
    WHI,
    WLO,
    WF,
    G0,
    GZ0,
    GMAX,
    DK,
    DV,
    H,
    L,
    split_len,
    n_split,
    scale,
    inv_sqrt_m,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Adds slice j's part of dk and dv: a reverse walk carrying the suffix state G = sum phi_q^T dN."""
    NS: tl.constexpr = M // BM
    bh, sp, j = _split_slice(n_split, NS)
    b = bh // H
    offs_t = tl.arange(0, T)
    offs_m, w_off = _slice_offsets(j, BM, D)
    base = bh.to(tl.int64) * L * D
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    wf = tl.load(WF + w_off)
    st = (bh * n_split + sp).to(tl.int64)
    g = tl.load(G0 + st * M * D + w_off)  # (BM, D) fp32 suffix state after the split
    gz = tl.load(GZ0 + st * M + offs_m)
    gmax = tl.load(GMAX + bh)
    causal_t = offs_t[:, None] <= offs_t[None, :]  # [key j, query i]: i >= j
    start = sp * split_len
    n_t = tl.cdiv(split_len, T)
    for i in range(0, n_t):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + (n_t - 1 - i) * T, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        c_row = tl.load(ROWC + bh.to(tl.int64) * L + rows, mask=inb, other=0.0)
        dn_c, ddn, den = _dn(DO, O, DEN + bh.to(tl.int64) * L, rows, ptr, inb, eps, v.dtype)
        pt = tl.where(causal_t, tl.dot(v, tl.trans(dn_c)) + ddn[None, :], 0.0)  # (T key, T query)
        sk = _logits(k, whi, wlo, scale, SOFTMAX, SPLIT_W)
        phi_k = _key_phi(sk, valid, gmax, inv_sqrt_m, SOFTMAX)
        _, phi_q = _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX, SPLIT_W)
        phi_q = tl.where(inb[:, None], phi_q, 0.0)
        g_c = g.to(v.dtype)
        dphi = tl.dot(v, tl.trans(g_c)) + gz[None, :] + tl.dot(pt, phi_q)
        at = tl.where(causal_t, tl.dot(phi_k, tl.trans(phi_q)), 0.0)
        dv = tl.dot(phi_k.to(v.dtype), g_c) + tl.dot(at.to(v.dtype), dn_c)
        g += tl.dot(tl.trans(phi_q.to(v.dtype)), dn_c)
        gz += tl.sum(phi_q * ddn[:, None], axis=0)
        dphi = tl.where(valid[:, None], dphi, 0.0)
        dk = tl.where(valid[:, None], _feat_grad(dphi, phi_k, sk, k, wf, scale, SOFTMAX), 0.0)
        tl.atomic_add(DK + ptr, dk, mask=inb[:, None], sem="relaxed")
        tl.atomic_add(DV + ptr, dv, mask=inb[:, None], sem="relaxed")


# --------------------------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------------------------- #
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split_len(length: int, programs_per_row: int, tile: int, device: torch.device, waves: float) -> int:
    """Rows per program so that about ``waves * SMs`` programs run (multiple of the tile)."""
    want = max(1, int(waves * _num_sms(device)))
    per = math.ceil(length * programs_per_row / want)
    per = max(tile, math.ceil(per / tile) * tile)
    n_tiles = math.ceil(length / tile)
    return min(per, n_tiles * tile)


def _config(device: torch.device) -> dict:
    """Launch options; ``FAVOR_TRITON_CFG="warps,stages"`` overrides them (tuning)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return {"num_warps": 4, "num_stages": 1}
    env = os.environ.get("FAVOR_TRITON_CFG")
    if env:
        w, st = (int(x) for x in env.split(","))
        return {"num_warps": w, "num_stages": st}
    return {
        "num_warps": 4,
        "num_stages": 1,
    }  # measured on H100: 4 warps 1.6x faster than 8 (bench/NOTES_gpu.md)


# Programs per SM the launches aim for (bench/NOTES_gpu.md: short walks in many programs beat long ones).
STATE_WAVES = 16.0
CAUSAL_WAVES = 8.0


def _slice_width(m: int, slice_m: int | None = None) -> int | None:
    """Features per slice for M features: ``slice_m`` if given, else the widest power of two <= 64
    that divides M (M = 256 -> 64, 96 -> 32, 48 -> 16). ``None`` when the kernels cannot cover M
    (slices must be a power of two from 16 to 64 that divides M)."""
    if slice_m is None:
        slice_m = next((w for w in (64, 32, 16) if m % w == 0), 0)
    ok = 16 <= slice_m <= 64 and not slice_m & (slice_m - 1) and m % slice_m == 0
    return slice_m if ok else None


class _Plan:
    """Launch geometry and derived constants shared by forward and backward."""

    def __init__(
        self,
        q: Tensor,
        projection: Tensor,
        kernel: str,
        causal: bool,
        eps: float,
        tile: int,
        state_split: int | None,
        walk_split: int | None,
        slice_m: int | None,
    ):
        b, h, length, d = q.shape
        m = projection.shape[0]
        self.B, self.H, self.L, self.D, self.M = b, h, length, d, m
        self.BH = b * h
        self.T = tile
        bm = _slice_width(m, slice_m)
        if bm is None:
            raise ValueError(
                f"num_features M={m}: no slice width in 16, 32, 64 divides it (slice_m={slice_m})"
            )
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"tile must be a power of two >= 16, got {tile}")
        for name, rows in (("state_split", state_split), ("walk_split", walk_split)):
            if rows is not None and (rows <= 0 or rows % tile):
                # a walk covers whole tiles: a partial one would re-add the next split's rows
                raise ValueError(f"{name} must be a positive multiple of tile={tile}, got {rows}")
        self.BM = bm
        self.NS = m // self.BM
        self.softmax = kernel == "softmax"
        self.causal = causal
        self.eps = float(eps)
        self.scale = d**-0.25 if self.softmax else 1.0
        self.inv_sqrt_m = m**-0.5
        dev = q.device
        n_tiles = math.ceil(length / tile)
        if causal:  # one split = one sequential walk per slice; the state kernel uses the same splits
            split = walk_split or _split_len(length, self.BH * self.NS, tile, dev, waves=CAUSAL_WAVES)
            self.split = self.walk_split = split
        else:
            self.split = state_split or _split_len(length, self.BH * self.NS, tile, dev, waves=STATE_WAVES)
            self.walk_split = min(walk_split or 4 * tile, n_tiles * tile)
        self.n_split = math.ceil(length / self.split)
        self.n_walk = math.ceil(length / self.walk_split)
        self.cfg = _config(dev)

    def consts(self, has_pad: bool, split_w: bool) -> dict:
        return dict(
            D=self.D,
            M=self.M,
            BM=self.BM,
            T=self.T,
            SOFTMAX=self.softmax,
            SPLIT_W=split_w,
            HAS_PAD=has_pad,
            **self.cfg,
        )


def _weights(
    projection: Tensor, dtype: torch.dtype, split: bool | None = None
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``W`` as (hi, lo, float32, split?): bf16 inputs multiply ``W_hi + W_lo`` (two bf16 products).

    ``split=True`` with float32 inputs keeps the hi/lo split (hi rounded to bf16, stored as fp32):
    it exercises the split code path where Triton's interpreter cannot do bf16 products.
    """
    wf = projection.detach().float().contiguous()
    if split is None:
        split = dtype in (torch.bfloat16, torch.float16)
    if split:
        hi_dt = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        whi = wf.to(hi_dt)
        wlo = (wf - whi.float()).to(hi_dt)
        if dtype == torch.float32:
            whi, wlo = whi.float(), (wf - whi.float())
        return whi.contiguous(), wlo.contiguous(), wf, True
    return wf, wf, wf, False


def _exclusive_scan(x: Tensor, reverse: bool = False) -> Tensor:
    """Exclusive prefix (or suffix) sum over dim 1, without ``cumsum - x`` (which cancels badly
    when one split holds huge values, e.g. ``dO / eps`` of queries that see only padding)."""
    if reverse:
        return _exclusive_scan(x.flip(1)).flip(1).contiguous()
    out = torch.zeros_like(x)
    if x.shape[1] > 1:
        torch.cumsum(x[:, :-1], dim=1, out=out[:, 1:])
    return out


def _launch(name: str, kernel, grid: int, *args, **kwargs) -> None:
    LAST_LAUNCH[name] = kernel[(grid,)](*args, **kwargs)


def _key_states(k, v, pad, whi, wlo, p: _Plan, common: dict):
    """Per-split partial key states ``(BH, n_split, M, D)``, ``(BH, n_split, M)`` and key shifts."""
    BH, M, D = p.BH, p.M, p.D
    sp = torch.empty(BH, p.n_split, M, D, device=k.device, dtype=torch.float32)
    zp = torch.empty(BH, p.n_split, M, device=k.device, dtype=torch.float32)
    mp = torch.empty(BH, p.n_split, p.NS, device=k.device, dtype=torch.float32)
    args = (k, v, pad, whi, wlo, sp, zp, mp, p.H, p.L, p.split, p.n_split, p.scale, p.inv_sqrt_m)
    _launch("_key_state_kernel", _key_state_kernel, BH * p.n_split * p.NS, *args, **common)
    return sp, zp, mp


def _forward(q, k, v, pad, whi, wlo, split_w, p: _Plan):
    dev = q.device
    BH, M, D, L = p.BH, p.M, p.D, p.L
    has_pad = pad is not None
    pad_t = pad if has_pad else q  # dummy pointer
    common = p.consts(has_pad, split_w)
    sp, zp, mp = _key_states(k, v, pad_t, whi, wlo, p, common)
    if p.softmax:
        gmax = mp.amax(dim=(1, 2))  # (BH,)
        gmax = torch.where(gmax > _NEG / 2, gmax, torch.zeros_like(gmax))  # all-padding heads
        w = torch.exp(mp - gmax[:, None, None])  # (BH, n_split, NS)
        sp = (sp.view(BH, p.n_split, p.NS, p.BM, D) * w[..., None, None]).view(BH, p.n_split, M, D)
        zp = (zp.view(BH, p.n_split, p.NS, p.BM) * w[..., None]).view(BH, p.n_split, M)
    else:
        gmax = torch.zeros(BH, device=dev, dtype=torch.float32)
    rowc = torch.zeros(BH, L, device=dev, dtype=torch.float32)
    if p.causal:
        s0 = _exclusive_scan(sp)  # state entering each split
        z0 = _exclusive_scan(zp)
        del sp, zp
        if p.softmax:
            args = (q, pad_t, whi, wlo, rowc, p.H, L, p.walk_split, p.n_walk, p.scale)
            shape = dict(D=D, M=M, BM=p.BM, T=p.T, SPLIT_W=split_w, HAS_PAD=has_pad)
            _launch("_rowmax_kernel", _rowmax_kernel, BH * p.n_walk, *args, **shape, **p.cfg)
        num = torch.zeros(BH, L, D, device=dev, dtype=torch.float32)
        den = torch.zeros(BH, L, device=dev, dtype=torch.float32)
        args = (q, k, v, pad_t, whi, wlo, s0, z0, gmax, rowc, num, den, p.H, L, p.split, p.n_split)
        _launch(
            "_causal_fwd_kernel",
            _causal_fwd_kernel,
            BH * p.n_split * p.NS,
            *args,
            p.scale,
            p.inv_sqrt_m,
            **common,
        )
        den.clamp_min_(p.eps)
        o = num.div_(den[..., None]).to(v.dtype).view(q.shape)
        del num
    else:
        # the kernels multiply the state in the input dtype anyway: cast once here, halving its reads
        s0 = sp.sum(dim=1).to(q.dtype).contiguous()
        z0 = zp.sum(dim=1).contiguous()
        del sp, zp
        o = torch.empty(q.shape, device=dev, dtype=v.dtype)
        den = torch.empty(BH, L, device=dev, dtype=torch.float32)
        args = (q, pad_t, whi, wlo, s0, z0, o, den, rowc, p.H, L, p.walk_split, p.n_walk)
        _launch(
            "_bid_fwd_kernel", _bid_fwd_kernel, BH * p.n_walk, *args, p.scale, p.inv_sqrt_m, p.eps, **common
        )
    return o, den, rowc, s0, z0, gmax


def _backward(q, k, v, o, do, den, rowc, pad, whi, wlo, wf, split_w, s0, z0, gmax, p: _Plan):
    dev = q.device
    BH, M, D, L = p.BH, p.M, p.D, p.L
    has_pad = pad is not None
    pad_t = pad if has_pad else q
    common = p.consts(has_pad, split_w)
    consts = (p.scale, p.inv_sqrt_m, p.eps)
    grid = BH * p.n_split * p.NS
    # dq: float32 sum of the slices' contributions (atomics), cast once the dq pass is done
    dq32 = torch.zeros(q.shape, device=dev, dtype=torch.float32)
    gp = torch.empty(BH, p.n_split, M, D, device=dev, dtype=torch.float32)  # per-split query states
    gzp = torch.empty(BH, p.n_split, M, device=dev, dtype=torch.float32)
    if p.causal:
        args = (q, k, v, o, do, den, rowc, pad_t, whi, wlo, wf, s0, z0, gmax, dq32, gp, gzp, p.H, L, p.split)
        _launch(
            "_causal_dq_kernel",
            _causal_dq_kernel,
            grid,
            *args,
            p.n_split,
            *consts,
            **common,
        )
        g0 = _exclusive_scan(gp, reverse=True)  # suffix state after each split
        gz0 = _exclusive_scan(gzp, reverse=True)
    else:
        args = (q, o, do, den, rowc, pad_t, whi, wlo, wf, s0, z0, gp, gzp, dq32, p.H, L, p.split, p.n_split)
        _launch("_bid_dq_state_kernel", _bid_dq_state_kernel, grid, *args, *consts, **common)
        g0 = gp.sum(dim=1).to(q.dtype).contiguous()  # read per tile in the input dtype, like S
        gz0 = gzp.sum(dim=1).contiguous()
    del gp, gzp
    dq = dq32.to(q.dtype, copy=p.causal)  # causal reuses dq32 below: copy even for float32 inputs
    if p.causal:
        dk32 = dq32.zero_()  # reuse dq's float32 buffer: peak stays at two of them plus the outputs
        dv32 = torch.zeros(v.shape, device=dev, dtype=torch.float32)
        args = (q, k, v, o, do, den, rowc, pad_t, whi, wlo, wf, g0, gz0, gmax, dk32, dv32, p.H, L, p.split)
        _launch("_causal_dkv_kernel", _causal_dkv_kernel, grid, *args, p.n_split, *consts, **common)
        del dq32
        dk = dk32.to(k.dtype)
        del dk32
        return dq, dk, dv32.to(v.dtype)
    del dq32
    dk = torch.empty(k.shape, device=dev, dtype=k.dtype)
    dv = torch.empty(v.shape, device=dev, dtype=v.dtype)
    args = (k, v, pad_t, whi, wlo, wf, g0, gz0, gmax, dk, dv, p.H, L, p.walk_split, p.n_walk)
    _launch("_bid_dkv_kernel", _bid_dkv_kernel, BH * p.n_walk, *args, p.scale, p.inv_sqrt_m, **common)
    return dq, dk, dv


class _FavorTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, kernel, causal, pad, eps, opts):  # type: ignore[override]
        p = _Plan(
            q,
            projection,
            kernel,
            causal,
            eps,
            opts["tile"],
            opts["state_split"],
            opts["walk_split"],
            opts["slice_m"],
        )
        whi, wlo, wf, split_w = _weights(projection, q.dtype, opts["split_projection"])
        o, den, rowc, s0, z0, gmax = _forward(q, k, v, pad, whi, wlo, split_w, p)
        ctx.save_for_backward(
            q, k, v, o, den, rowc, s0, z0, gmax, whi, wlo, wf, *([pad] if pad is not None else [])
        )
        ctx.plan = p
        ctx.split_w = split_w
        ctx.has_pad = pad is not None
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        saved = ctx.saved_tensors
        q, k, v, o, den, rowc, s0, z0, gmax, whi, wlo, wf = saved[:12]
        pad = saved[12] if ctx.has_pad else None
        if pad is not None:
            # Queries that see no real key (leading padding under a causal mask, or a row that is all
            # padding) have output 0 and, in exact arithmetic, zero gradient: their normaliser is 0,
            # floored at eps. Their dO / eps (up to 1e30 * dO) would otherwise amplify bf16 rounding
            # into garbage dk/dv (measured on an H100: 26-29% error with leading padding).
            do = do.masked_fill(_blind_queries(pad, ctx.plan.causal)[:, None, :, None], 0)
        do = do.contiguous()
        if do.dtype != o.dtype:
            do = do.to(o.dtype)
        dq, dk, dv = _backward(
            q, k, v, o, do, den, rowc, pad, whi, wlo, wf, ctx.split_w, s0, z0, gmax, ctx.plan
        )
        return dq, dk, dv, None, None, None, None, None, None


def _blind_queries(pad: Tensor, causal: bool) -> Tensor:
    """``(B, L)`` bool: query positions with no real key to attend to (``pad`` uint8, 1 at padding)."""
    real = pad == 0
    visible = real.cumsum(dim=1) if causal else real.sum(dim=1, keepdim=True).expand_as(real)
    return visible == 0


def _torch_fallback(q, k, v, projection, kernel, causal, key_padding_mask, eps):
    from protein_lm.attention.favor import favor_bidirectional, favor_causal, favor_features

    phi_q, phi_k = favor_features(q, k, projection, kernel, key_padding_mask)
    fn = favor_causal if causal else favor_bidirectional
    return fn(phi_q, phi_k, v, key_padding_mask, eps).to(v.dtype)


def favor_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-30,
    *,
    tile: int = DEFAULT_BLOCK,
    state_split: int | None = None,
    walk_split: int | None = None,
    slice_m: int | None = None,
    split_projection: bool | None = None,
) -> Tensor:
    """FAVOR+ attention through fused Triton kernels: ``(B, H, L, D) x3 -> (B, H, L, D)``.

    Matches :class:`protein_lm.attention.FavorAttention`'s PyTorch path (same features, shifts,
    ``max(normaliser, eps)``, padding rules) up to bf16 rounding, with autograd for ``q, k, v``
    (the projection is a buffer and gets no gradient).

    Args:
        q, k, v: ``(B, H, L, D)``, bf16, fp16 or fp32, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
            The kernels cover self-attention (equal shapes) with D a power of two >= 16; other
            shapes (e.g. extra persistent-memory keys) fall back to the PyTorch path.
        projection: ``(M, D)`` random projection; kernels need M to be a multiple of 16 (slices of
            16, 32 or 64 features, the widest that divides M), else the PyTorch path is used.
        kernel: ``"softmax"`` or ``"relu"``.
        causal: prefix (unidirectional) attention.
        key_padding_mask: bool ``(B, L)``, True at padding.
        eps: floor of the normaliser.
        tile: rows per tile, a power of two >= 16 (64; 16/32 for tiny tests).
        state_split: rows per program of the key-state and dq passes (bidirectional; tuning knob),
            a multiple of ``tile``.
        walk_split: rows per program of the output / dk, dv walks (causal: of every pass), a
            multiple of ``tile``.
        slice_m: features per slice, 16, 32 or 64 dividing M (default: the widest that does).
        split_projection: force (True) or forbid (False) the hi/lo bf16 split of the projection
            (default: split for bf16/fp16 inputs); for tests.

    Returns:
        ``(B, H, L, D)`` in ``v``'s dtype.
    """
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}")
    d = q.shape[-1]
    m = projection.shape[0]
    supported = (
        q.shape == k.shape == v.shape  # self-attention (no extra persistent-memory keys)
        and d >= 16
        and not d & (d - 1)
        and _slice_width(m, slice_m) is not None
    )
    if not supported:  # shapes the kernels do not cover: the reference path, same numerics
        return _torch_fallback(q, k, v, projection, kernel, causal, key_padding_mask, eps)
    dtype = v.dtype
    cdt = torch.float32 if dtype == torch.float16 else dtype  # fp16 lacks exp range for features
    q, k, v = (t.to(cdt).contiguous() for t in (q, k, v))
    pad = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (q.shape[0], q.shape[2]):
            raise ValueError("key_padding_mask must be bool (B, L), True at padding")
        pad = key_padding_mask.contiguous().view(torch.uint8)
    opts = {
        "tile": tile,
        "state_split": state_split,
        "walk_split": walk_split,
        "slice_m": slice_m,
        "split_projection": split_projection,
    }
    out = _FavorTriton.apply(q, k, v, projection, kernel, causal, pad, eps, opts)
    return out.to(dtype)
