"""Fused Triton kernels for FAVOR+ attention (bidirectional and causal, softmax and ReLU features).

Same API and numerics as the PyTorch reference (:mod:`protein_lm.attention.favor`,
docs/architecture.md "Softmax-kernel numerics"), but the ``(B, H, L, M)`` feature tensors are never
written to memory: every kernel recomputes the features of the rows it touches from ``q``/``k``
and the projection (one ``(64, D) x (D, M)`` product per tile), applies the stabiliser and ``exp``
in registers and feeds them straight into the next tensor-core product.

Four kernels (``T`` = 64-row tile, ``S`` = a split of consecutive tiles owned by one program):

* ``_state_kernel``    per split: ``sum phi^T Y`` (M x D) and ``sum phi^T w`` (M).
  Forward (keys): ``Y = V``, ``w = 1``, with an online max so that one pass gives the shared key
  shift (``max`` over real keys of ``u + h``) -- partial sums are rescaled like flash attention's.
  Backward (queries): ``Y = dO / den``, ``w = -rowsum(dO * O) / den``.
* ``_fwd_kernel``      per split (causal) or tile (bidirectional): ``out = phi_q S / max(phi_q z, eps)``.
  Causal: ``S, z`` start at the split's exclusive prefix and are advanced tile by tile; the
  diagonal tile is the exact masked product ``tril(phi_q phi_k^T) V``.
* ``_bwd_dq_kernel``   same walk as the forward, producing ``dq``.
* ``_bwd_dkv_kernel``  the reverse walk (suffix states of ``phi_q^T dN``), producing ``dk, dv``.

Between kernels, tiny PyTorch ops combine the per-split partial sums (``(B*H, splits, M, D)``,
a few MB): a max-rescaled sum (bidirectional) or an exclusive prefix / suffix scan (causal).
Backward recomputes everything from ``q, k, v, out`` and the per-row normaliser; memory is
``O(L * D)`` per head besides the inputs.

Precision: inputs bf16 (or fp32). The projection ``x W^T`` that feeds ``exp`` runs as two bf16
products against ``W = W_hi + W_lo`` (about 16 mantissa bits, the cost of one tf32 product);
features, normalisers and all accumulators are float32; the products of features with values or
states use bf16 operands with float32 accumulation (float32/tf32 when the inputs are float32).
Shifts are treated as constants in backward (they cancel in the ratio), as in the reference.
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
    """``(T, D)`` rows -> ``(T, M)`` float32: ``u + h`` (softmax, with x' = x*scale) or ``u`` (relu)."""
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
def _state_tile(S0, Z0, st, j: tl.constexpr, w0, offs_bm, M: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
    """Slice ``j`` of a ``(M, D)`` state and its ``(M,)`` normaliser state."""
    s = tl.load(S0 + st * M * D + j * BM * D + w0)
    z = tl.load(Z0 + st * M + j * BM + offs_bm)
    return s, z


# --------------------------------------------------------------------------------------------- #
# kernels
#
# The M features are processed in NS slices of BM (<= 64) columns, so that no (T, M) tile is ever
# live: per slice, one (T, D) x (D, BM) projection, the exp, and the products with the slice's
# (BM, D) state. Query features need the max over all M before exp: the forward kernel keeps an
# online per-row max (rescaling its accumulators, as flash attention does) and stores it; the
# backward kernels read it back. Running states of the causal walks are NS separate (BM, D)
# float32 register tiles (S0..S3), so M <= 4 * BM.
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _state_kernel(
    X,
    Y,
    O,
    DEN,
    ROWC,
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
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    IS_QUERY: tl.constexpr,
):
    """Per (split, feature slice): SP = sum phi^T Y', ZP = sum phi^T w, MP = running key shift."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    ms = tl.program_id(2)
    b = bh // H
    offs_t = tl.arange(0, T)
    offs_d = tl.arange(0, D)
    offs_m = ms * BM + tl.arange(0, BM)
    base = bh.to(tl.int64) * L * D
    w_off = offs_m[:, None] * D + offs_d[None, :]
    acc = tl.zeros([BM, D], dtype=tl.float32)
    z = tl.zeros([BM], dtype=tl.float32)
    m_run = tl.max(tl.full([T], _NEG_K, tl.float32), axis=0)
    start = sp * split_len
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    for t0 in range(0, split_len, T):
        rows = start + t0 + offs_t
        inb = rows < L
        valid = _rows_valid(PAD, b, rows, L, HAS_PAD)
        ptr = base + rows[:, None] * D + offs_d[None, :]
        x = tl.load(X + ptr, mask=valid[:, None], other=0.0)
        s = _logits(x, whi, wlo, scale, SOFTMAX, SPLIT_W)
        if IS_QUERY:
            if SOFTMAX:
                c = tl.load(ROWC + bh.to(tl.int64) * L + rows, mask=inb, other=0.0)
                phi = tl.exp(s - c[:, None]) * inv_sqrt_m
            else:
                phi = tl.maximum(s, 0.0) + 1e-3
            phi = tl.where(inb[:, None], phi, 0.0)
            do = tl.load(Y + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
            o = tl.load(O + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
            den = tl.load(DEN + bh.to(tl.int64) * L + rows, mask=inb, other=1.0)
            dn_c = (do / den[:, None]).to(Y.dtype.element_ty)
            # d(out)/d(den) from the same rounded dN the products use: dN.(v - o) cancels exactly
            wrow = tl.where(den > eps, -tl.sum(dn_c.to(tl.float32) * o, axis=1), 0.0)
            acc += tl.dot(tl.trans(phi.to(Y.dtype.element_ty)), dn_c)
            z += tl.sum(phi * wrow[:, None], axis=0)
        else:
            y = tl.load(Y + ptr, mask=valid[:, None], other=0.0)
            if SOFTMAX:
                tmax = tl.max(tl.max(tl.where(valid[:, None], s, _NEG_K), axis=1), axis=0)
                m_new = tl.maximum(m_run, tmax)
                alpha = tl.exp(m_run - m_new)
                acc = acc * alpha
                z = z * alpha
                m_run = m_new
            phi = _key_phi(s, valid, m_run, inv_sqrt_m, SOFTMAX)
            acc += tl.dot(tl.trans(phi.to(y.dtype)), y)
            z += tl.sum(phi, axis=0)
    out = (bh * n_split + sp).to(tl.int64)
    tl.store(SP + out * M * D + w_off, acc)
    tl.store(ZP + out * M + offs_m, z)
    tl.store(MP + out * (M // BM) + ms + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + m_run)


@triton.jit
def _fwd_slice(
    q,
    k,
    v,
    valid,
    w_off,
    WHI,
    WLO,
    S,
    z,
    num,
    den,
    a,
    m_row,
    gmax,
    scale,
    inv_sqrt_m,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    sq = _logits(q, whi, wlo, scale, SOFTMAX, SPLIT_W)
    if SOFTMAX:
        m_new = tl.maximum(m_row, tl.max(sq, axis=1))
        alpha = tl.exp(m_row - m_new)
        num = num * alpha[:, None]
        den = den * alpha
        if CAUSAL:
            a = a * alpha[:, None]
        phi_q = tl.exp(sq - m_new[:, None]) * inv_sqrt_m
        m_row = m_new
    else:
        phi_q = tl.maximum(sq, 0.0) + 1e-3
    num += tl.dot(phi_q.to(v.dtype), S.to(v.dtype))
    den += tl.sum(phi_q * z[None, :], axis=1)
    if CAUSAL:
        phi_k = _key_phi(_logits(k, whi, wlo, scale, SOFTMAX, SPLIT_W), valid, gmax, inv_sqrt_m, SOFTMAX)
        a += tl.dot(phi_q, tl.trans(phi_k))
        S += tl.dot(tl.trans(phi_k.to(v.dtype)), v)
        z += tl.sum(phi_k, axis=0)
    return S, z, num, den, a, m_row


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    PAD,
    WHI,
    WLO,
    S0,
    Z0,
    GMAX,
    O,
    DEN,
    ROWC,
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
    CAUSAL: tl.constexpr,
):
    NS: tl.constexpr = M // BM
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    offs_t = tl.arange(0, T)
    offs_d = tl.arange(0, D)
    offs_bm = tl.arange(0, BM)
    base = bh.to(tl.int64) * L * D
    w0 = offs_bm[:, None] * D + offs_d[None, :]
    if CAUSAL:
        st = (bh * n_split + sp).to(tl.int64)
    else:
        st = bh.to(tl.int64)
    gmax = tl.load(GMAX + bh)
    if CAUSAL:  # running states live in registers; bidirectional ones are re-read per tile (L2)
        s0, z0 = _state_tile(S0, Z0, st, 0, w0, offs_bm, M, D, BM)
        if NS >= 2:
            s1, z1 = _state_tile(S0, Z0, st, 1, w0, offs_bm, M, D, BM)
        if NS >= 4:
            s2, z2 = _state_tile(S0, Z0, st, 2, w0, offs_bm, M, D, BM)
            s3, z3 = _state_tile(S0, Z0, st, 3, w0, offs_bm, M, D, BM)
    start = sp * split_len
    for t0 in range(0, split_len, T):
        rows = start + t0 + offs_t
        inb = rows < L
        valid = _rows_valid(PAD, b, rows, L, HAS_PAD)
        ptr = base + rows[:, None] * D + offs_d[None, :]
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        if CAUSAL:
            k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
            v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        else:
            k = q
            v = q
        num = tl.zeros([T, D], dtype=tl.float32)
        den = tl.zeros([T], dtype=tl.float32)
        a = tl.zeros([T, T], dtype=tl.float32)
        m_row = tl.full([T], _NEG_K, tl.float32)
        if not CAUSAL:
            s0, z0 = _state_tile(S0, Z0, st, 0, w0, offs_bm, M, D, BM)
        s0, z0, num, den, a, m_row = _fwd_slice(
            q,
            k,
            v,
            valid,
            w0,
            WHI,
            WLO,
            s0,
            z0,
            num,
            den,
            a,
            m_row,
            gmax,
            scale,
            inv_sqrt_m,
            SOFTMAX,
            SPLIT_W,
            CAUSAL,
        )
        if NS >= 2:
            if not CAUSAL:
                s1, z1 = _state_tile(S0, Z0, st, 1, w0, offs_bm, M, D, BM)
            s1, z1, num, den, a, m_row = _fwd_slice(
                q,
                k,
                v,
                valid,
                w0 + BM * D,
                WHI,
                WLO,
                s1,
                z1,
                num,
                den,
                a,
                m_row,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
        if NS >= 4:
            if not CAUSAL:
                s2, z2 = _state_tile(S0, Z0, st, 2, w0, offs_bm, M, D, BM)
            s2, z2, num, den, a, m_row = _fwd_slice(
                q,
                k,
                v,
                valid,
                w0 + 2 * BM * D,
                WHI,
                WLO,
                s2,
                z2,
                num,
                den,
                a,
                m_row,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
            if not CAUSAL:
                s3, z3 = _state_tile(S0, Z0, st, 3, w0, offs_bm, M, D, BM)
            s3, z3, num, den, a, m_row = _fwd_slice(
                q,
                k,
                v,
                valid,
                w0 + 3 * BM * D,
                WHI,
                WLO,
                s3,
                z3,
                num,
                den,
                a,
                m_row,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
        if CAUSAL:
            a = tl.where(offs_t[:, None] >= offs_t[None, :], a, 0.0)
            num += tl.dot(a.to(v.dtype), v)
            den += tl.sum(a, axis=1)
        den = tl.maximum(den, eps)
        out = num / den[:, None]
        tl.store(O + ptr, out.to(O.dtype.element_ty), mask=inb[:, None])
        tl.store(DEN + bh.to(tl.int64) * L + rows, den, mask=inb)
        if SOFTMAX:
            tl.store(ROWC + bh.to(tl.int64) * L + rows, m_row, mask=inb)


@triton.jit
def _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX: tl.constexpr, SPLIT_W: tl.constexpr):
    sq = _logits(q, whi, wlo, scale, SOFTMAX, SPLIT_W)
    if SOFTMAX:
        phi = tl.exp(sq - c_row[:, None]) * inv_sqrt_m
    else:
        phi = tl.maximum(sq, 0.0) + 1e-3
    return sq, phi


@triton.jit
def _dq_slice(
    q,
    k,
    v,
    valid,
    dn_c,
    ddn,
    p,
    c_row,
    w_off,
    WHI,
    WLO,
    WF,
    S,
    z,
    dq,
    gmax,
    scale,
    inv_sqrt_m,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    sq, phi_q = _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX, SPLIT_W)
    dphi = tl.dot(dn_c, tl.trans(S.to(dn_c.dtype))) + ddn[:, None] * z[None, :]
    if CAUSAL:
        phi_k = _key_phi(_logits(k, whi, wlo, scale, SOFTMAX, SPLIT_W), valid, gmax, inv_sqrt_m, SOFTMAX)
        dphi += tl.dot(p, phi_k)
        S += tl.dot(tl.trans(phi_k.to(v.dtype)), v)
        z += tl.sum(phi_k, axis=0)
    wf = tl.load(WF + w_off)
    dq += _feat_grad(dphi, phi_q, sq, q, wf, scale, SOFTMAX)
    return S, z, dq


@triton.jit
def _bwd_dq_kernel(
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
    CAUSAL: tl.constexpr,
):
    NS: tl.constexpr = M // BM
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    offs_t = tl.arange(0, T)
    offs_d = tl.arange(0, D)
    offs_bm = tl.arange(0, BM)
    base = bh.to(tl.int64) * L * D
    w0 = offs_bm[:, None] * D + offs_d[None, :]
    if CAUSAL:
        st = (bh * n_split + sp).to(tl.int64)
    else:
        st = bh.to(tl.int64)
    gmax = tl.load(GMAX + bh)
    if CAUSAL:  # running states live in registers; bidirectional ones are re-read per tile (L2)
        s0, z0 = _state_tile(S0, Z0, st, 0, w0, offs_bm, M, D, BM)
        if NS >= 2:
            s1, z1 = _state_tile(S0, Z0, st, 1, w0, offs_bm, M, D, BM)
        if NS >= 4:
            s2, z2 = _state_tile(S0, Z0, st, 2, w0, offs_bm, M, D, BM)
            s3, z3 = _state_tile(S0, Z0, st, 3, w0, offs_bm, M, D, BM)
    start = sp * split_len
    for t0 in range(0, split_len, T):
        rows = start + t0 + offs_t
        inb = rows < L
        valid = _rows_valid(PAD, b, rows, L, HAS_PAD)
        ptr = base + rows[:, None] * D + offs_d[None, :]
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        do = tl.load(DO + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
        o = tl.load(O + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
        den = tl.load(DEN + bh.to(tl.int64) * L + rows, mask=inb, other=1.0)
        c_row = tl.load(ROWC + bh.to(tl.int64) * L + rows, mask=inb, other=0.0)
        dn = do / den[:, None]
        dn_c = dn.to(Q.dtype.element_ty)
        ddn = tl.where(den > eps, -tl.sum(dn_c.to(tl.float32) * o, axis=1), 0.0)
        if CAUSAL:
            k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
            v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
            p = tl.where(offs_t[:, None] >= offs_t[None, :], tl.dot(dn_c, tl.trans(v)) + ddn[:, None], 0.0)
        else:
            k = q
            v = q
            p = dn
        dq = tl.zeros([T, D], dtype=tl.float32)
        if not CAUSAL:
            s0, z0 = _state_tile(S0, Z0, st, 0, w0, offs_bm, M, D, BM)
        s0, z0, dq = _dq_slice(
            q,
            k,
            v,
            valid,
            dn_c,
            ddn,
            p,
            c_row,
            w0,
            WHI,
            WLO,
            WF,
            s0,
            z0,
            dq,
            gmax,
            scale,
            inv_sqrt_m,
            SOFTMAX,
            SPLIT_W,
            CAUSAL,
        )
        if NS >= 2:
            if not CAUSAL:
                s1, z1 = _state_tile(S0, Z0, st, 1, w0, offs_bm, M, D, BM)
            s1, z1, dq = _dq_slice(
                q,
                k,
                v,
                valid,
                dn_c,
                ddn,
                p,
                c_row,
                w0 + BM * D,
                WHI,
                WLO,
                WF,
                s1,
                z1,
                dq,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
        if NS >= 4:
            if not CAUSAL:
                s2, z2 = _state_tile(S0, Z0, st, 2, w0, offs_bm, M, D, BM)
            s2, z2, dq = _dq_slice(
                q,
                k,
                v,
                valid,
                dn_c,
                ddn,
                p,
                c_row,
                w0 + 2 * BM * D,
                WHI,
                WLO,
                WF,
                s2,
                z2,
                dq,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
            if not CAUSAL:
                s3, z3 = _state_tile(S0, Z0, st, 3, w0, offs_bm, M, D, BM)
            s3, z3, dq = _dq_slice(
                q,
                k,
                v,
                valid,
                dn_c,
                ddn,
                p,
                c_row,
                w0 + 3 * BM * D,
                WHI,
                WLO,
                WF,
                s3,
                z3,
                dq,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
        dq = tl.where(valid[:, None], dq, 0.0)
        tl.store(DQ + ptr, dq.to(DQ.dtype.element_ty), mask=inb[:, None])


@triton.jit
def _dkv_slice(
    k,
    v,
    valid,
    q,
    inb,
    dn_c,
    ddn,
    pt,
    at,
    c_row,
    w_off,
    WHI,
    WLO,
    WF,
    G,
    gz,
    dk,
    dv,
    gmax,
    scale,
    inv_sqrt_m,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    sk = _logits(k, whi, wlo, scale, SOFTMAX, SPLIT_W)
    phi_k = _key_phi(sk, valid, gmax, inv_sqrt_m, SOFTMAX)
    g_c = G.to(v.dtype)
    dphi = tl.dot(v, tl.trans(g_c)) + gz[None, :]
    dv += tl.dot(phi_k.to(v.dtype), g_c)
    if CAUSAL:
        sq, phi_q = _qphi(q, whi, wlo, c_row, scale, inv_sqrt_m, SOFTMAX, SPLIT_W)
        phi_q = tl.where(inb[:, None], phi_q, 0.0)
        at += tl.dot(phi_k, tl.trans(phi_q))
        dphi += tl.dot(pt, phi_q)
        G += tl.dot(tl.trans(phi_q.to(v.dtype)), dn_c)
        gz += tl.sum(phi_q * ddn[:, None], axis=0)
    dphi = tl.where(valid[:, None], dphi, 0.0)
    wf = tl.load(WF + w_off)
    dk += _feat_grad(dphi, phi_k, sk, k, wf, scale, SOFTMAX)
    return G, gz, dk, dv, at


@triton.jit
def _bwd_dkv_kernel(
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
    CAUSAL: tl.constexpr,
):
    NS: tl.constexpr = M // BM
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    offs_t = tl.arange(0, T)
    offs_d = tl.arange(0, D)
    offs_bm = tl.arange(0, BM)
    base = bh.to(tl.int64) * L * D
    w0 = offs_bm[:, None] * D + offs_d[None, :]
    if CAUSAL:
        st = (bh * n_split + sp).to(tl.int64)
    else:
        st = bh.to(tl.int64)
    gmax = tl.load(GMAX + bh)
    if CAUSAL:  # running states live in registers; bidirectional ones are re-read per tile (L2)
        g0, gz0 = _state_tile(G0, GZ0, st, 0, w0, offs_bm, M, D, BM)
        if NS >= 2:
            g1, gz1 = _state_tile(G0, GZ0, st, 1, w0, offs_bm, M, D, BM)
        if NS >= 4:
            g2, gz2 = _state_tile(G0, GZ0, st, 2, w0, offs_bm, M, D, BM)
            g3, gz3 = _state_tile(G0, GZ0, st, 3, w0, offs_bm, M, D, BM)
    start = sp * split_len
    n_t = tl.cdiv(split_len, T)
    for i in range(0, n_t):
        t0 = (n_t - 1 - i) * T  # reverse walk: suffix states
        rows = start + t0 + offs_t
        inb = rows < L
        valid = _rows_valid(PAD, b, rows, L, HAS_PAD)
        ptr = base + rows[:, None] * D + offs_d[None, :]
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        if CAUSAL:
            q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
            do = tl.load(DO + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
            o = tl.load(O + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
            den = tl.load(DEN + bh.to(tl.int64) * L + rows, mask=inb, other=1.0)
            c_row = tl.load(ROWC + bh.to(tl.int64) * L + rows, mask=inb, other=0.0)
            dn_c = (do / den[:, None]).to(v.dtype)
            ddn = tl.where(den > eps, -tl.sum(dn_c.to(tl.float32) * o, axis=1), 0.0)
            causal = offs_t[:, None] <= offs_t[None, :]  # [key j, query i]: i >= j
            pt = tl.where(causal, tl.dot(v, tl.trans(dn_c)) + ddn[None, :], 0.0)
        else:
            q = k
            dn_c = v
            ddn = tl.zeros([T], dtype=tl.float32)
            c_row = ddn
            pt = tl.zeros([T, T], dtype=tl.float32)
        at = tl.zeros([T, T], dtype=tl.float32)
        dk = tl.zeros([T, D], dtype=tl.float32)
        dv = tl.zeros([T, D], dtype=tl.float32)
        if not CAUSAL:
            g0, gz0 = _state_tile(G0, GZ0, st, 0, w0, offs_bm, M, D, BM)
        g0, gz0, dk, dv, at = _dkv_slice(
            k,
            v,
            valid,
            q,
            inb,
            dn_c,
            ddn,
            pt,
            at,
            c_row,
            w0,
            WHI,
            WLO,
            WF,
            g0,
            gz0,
            dk,
            dv,
            gmax,
            scale,
            inv_sqrt_m,
            SOFTMAX,
            SPLIT_W,
            CAUSAL,
        )
        if NS >= 2:
            if not CAUSAL:
                g1, gz1 = _state_tile(G0, GZ0, st, 1, w0, offs_bm, M, D, BM)
            g1, gz1, dk, dv, at = _dkv_slice(
                k,
                v,
                valid,
                q,
                inb,
                dn_c,
                ddn,
                pt,
                at,
                c_row,
                w0 + BM * D,
                WHI,
                WLO,
                WF,
                g1,
                gz1,
                dk,
                dv,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
        if NS >= 4:
            if not CAUSAL:
                g2, gz2 = _state_tile(G0, GZ0, st, 2, w0, offs_bm, M, D, BM)
            g2, gz2, dk, dv, at = _dkv_slice(
                k,
                v,
                valid,
                q,
                inb,
                dn_c,
                ddn,
                pt,
                at,
                c_row,
                w0 + 2 * BM * D,
                WHI,
                WLO,
                WF,
                g2,
                gz2,
                dk,
                dv,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
            if not CAUSAL:
                g3, gz3 = _state_tile(G0, GZ0, st, 3, w0, offs_bm, M, D, BM)
            g3, gz3, dk, dv, at = _dkv_slice(
                k,
                v,
                valid,
                q,
                inb,
                dn_c,
                ddn,
                pt,
                at,
                c_row,
                w0 + 3 * BM * D,
                WHI,
                WLO,
                WF,
                g3,
                gz3,
                dk,
                dv,
                gmax,
                scale,
                inv_sqrt_m,
                SOFTMAX,
                SPLIT_W,
                CAUSAL,
            )
        if CAUSAL:
            at = tl.where(causal, at, 0.0)
            dv += tl.dot(at.to(v.dtype), dn_c)
        dk = tl.where(valid[:, None], dk, 0.0)
        tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=inb[:, None])
        tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=inb[:, None])


# --------------------------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------------------------- #
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split_len(length: int, bh: int, tile: int, device: torch.device, waves: float) -> int:
    """Rows per program so that about ``waves * SMs`` programs run (multiple of the tile)."""
    want = max(1, int(waves * _num_sms(device)))
    per = math.ceil(length * bh / want)
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
        self.BM = slice_m or min(64, m)
        if m % self.BM or (m // self.BM) not in (1, 2, 4):
            raise ValueError(f"num_features M={m} must be 1, 2 or 4 slices of {self.BM}")
        self.NS = m // self.BM
        self.softmax = kernel == "softmax"
        self.causal = causal
        self.eps = float(eps)
        self.scale = d**-0.25 if self.softmax else 1.0
        self.inv_sqrt_m = m**-0.5
        dev = q.device
        n_tiles = math.ceil(length / tile)
        if causal:
            # one split = one sequential walk; the state kernel uses the same splits
            split = walk_split or _split_len(length, self.BH, tile, dev, waves=2.0)
            self.split = split
            self.walk_split = split
        else:
            self.split = state_split or _split_len(length, self.BH * self.NS, tile, dev, waves=4.0)
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


def _forward(q, k, v, pad, whi, wlo, split_w, p: _Plan):
    dev = q.device
    BH, M, D, L = p.BH, p.M, p.D, p.L
    sp = torch.empty(BH, p.n_split, M, D, device=dev, dtype=torch.float32)
    zp = torch.empty(BH, p.n_split, M, device=dev, dtype=torch.float32)
    mp = torch.empty(BH, p.n_split, p.NS, device=dev, dtype=torch.float32)
    has_pad = pad is not None
    pad_t = pad if has_pad else q  # dummy pointer
    common = p.consts(has_pad, split_w)
    LAST_LAUNCH["_state_kernel"] = _state_kernel[(BH, p.n_split, p.NS)](
        k,
        v,
        k,
        mp,
        mp,
        pad_t,
        whi,
        wlo,
        sp,
        zp,
        mp,
        p.H,
        L,
        p.split,
        p.n_split,
        p.scale,
        p.inv_sqrt_m,
        p.eps,
        IS_QUERY=False,
        **common,
    )
    if p.softmax:
        gmax = mp.amax(dim=(1, 2))  # (BH,)
        gmax = torch.where(gmax > _NEG / 2, gmax, torch.zeros_like(gmax))  # all-padding heads
        w = torch.exp(mp - gmax[:, None, None])  # (BH, n_split, NS)
        sp = (sp.view(BH, p.n_split, p.NS, p.BM, D) * w[..., None, None]).view(BH, p.n_split, M, D)
        zp = (zp.view(BH, p.n_split, p.NS, p.BM) * w[..., None]).view(BH, p.n_split, M)
    else:
        gmax = torch.zeros(BH, device=dev, dtype=torch.float32)
    if p.causal:
        s0 = _exclusive_scan(sp)  # state entering each split
        z0 = _exclusive_scan(zp)
    else:
        # the kernels multiply the state in the input dtype anyway: cast once here, halving its reads
        s0 = sp.sum(dim=1).to(q.dtype).contiguous()
        z0 = zp.sum(dim=1).contiguous()
    del sp, zp
    o = torch.empty(q.shape, device=dev, dtype=v.dtype)
    den = torch.empty(BH, L, device=dev, dtype=torch.float32)
    rowc = torch.zeros(BH, L, device=dev, dtype=torch.float32)
    LAST_LAUNCH["_fwd_kernel"] = _fwd_kernel[(BH, p.n_walk)](
        q,
        k,
        v,
        pad_t,
        whi,
        wlo,
        s0,
        z0,
        gmax,
        o,
        den,
        rowc,
        p.H,
        L,
        p.walk_split,
        p.n_walk,
        p.scale,
        p.inv_sqrt_m,
        p.eps,
        CAUSAL=p.causal,
        **common,
    )
    return o, den, rowc, s0, z0, gmax


def _backward(q, k, v, o, do, den, rowc, pad, whi, wlo, wf, split_w, s0, z0, gmax, p: _Plan):
    dev = q.device
    BH, M, D, L = p.BH, p.M, p.D, p.L
    has_pad = pad is not None
    pad_t = pad if has_pad else q
    common = p.consts(has_pad, split_w)
    gp = torch.empty(BH, p.n_split, M, D, device=dev, dtype=torch.float32)
    gzp = torch.empty(BH, p.n_split, M, device=dev, dtype=torch.float32)
    mp = torch.empty(BH, p.n_split, p.NS, device=dev, dtype=torch.float32)
    LAST_LAUNCH["_state_kernel_q"] = _state_kernel[(BH, p.n_split, p.NS)](
        q,
        do,
        o,
        den,
        rowc,
        pad_t,
        whi,
        wlo,
        gp,
        gzp,
        mp,
        p.H,
        L,
        p.split,
        p.n_split,
        p.scale,
        p.inv_sqrt_m,
        p.eps,
        IS_QUERY=True,
        **common,
    )
    if p.causal:
        g0 = _exclusive_scan(gp, reverse=True)  # suffix state after each split
        gz0 = _exclusive_scan(gzp, reverse=True)
    else:
        g0 = gp.sum(dim=1).to(q.dtype).contiguous()
        gz0 = gzp.sum(dim=1).contiguous()
    del gp, gzp
    dq = torch.empty(q.shape, device=dev, dtype=q.dtype)
    dk = torch.empty(k.shape, device=dev, dtype=k.dtype)
    dv = torch.empty(v.shape, device=dev, dtype=v.dtype)
    LAST_LAUNCH["_bwd_dq_kernel"] = _bwd_dq_kernel[(BH, p.n_walk)](
        q,
        k,
        v,
        o,
        do,
        den,
        rowc,
        pad_t,
        whi,
        wlo,
        wf,
        s0,
        z0,
        gmax,
        dq,
        p.H,
        L,
        p.walk_split,
        p.n_walk,
        p.scale,
        p.inv_sqrt_m,
        p.eps,
        CAUSAL=p.causal,
        **common,
    )
    LAST_LAUNCH["_bwd_dkv_kernel"] = _bwd_dkv_kernel[(BH, p.n_walk)](
        q,
        k,
        v,
        o,
        do,
        den,
        rowc,
        pad_t,
        whi,
        wlo,
        wf,
        g0,
        gz0,
        gmax,
        dk,
        dv,
        p.H,
        L,
        p.walk_split,
        p.n_walk,
        p.scale,
        p.inv_sqrt_m,
        p.eps,
        CAUSAL=p.causal,
        **common,
    )
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
        projection: ``(M, D)`` random projection; kernels need M = 1, 2 or 4 slices of min(64, M)
            features (M = 16...64, 128, 256), else the PyTorch path is used.
        kernel: ``"softmax"`` or ``"relu"``.
        causal: prefix (unidirectional) attention.
        key_padding_mask: bool ``(B, L)``, True at padding.
        eps: floor of the normaliser.
        tile: rows per tile (64; 16/32 for tiny tests).
        state_split: rows per program of the partial-state kernel (bidirectional; tuning knob).
        walk_split: rows per program of the output/gradient walks (for causal also the state splits).
        slice_m: features per slice (default min(64, M)); M must be 1, 2 or 4 slices.
        split_projection: force (True) or forbid (False) the hi/lo bf16 split of the projection
            (default: split for bf16/fp16 inputs); for tests.

    Returns:
        ``(B, H, L, D)`` in ``v``'s dtype.
    """
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}")
    d = q.shape[-1]
    m = projection.shape[0]
    bm = slice_m or min(64, m)
    supported = (
        q.shape == k.shape == v.shape  # self-attention (no extra persistent-memory keys)
        and d >= 16
        and not d & (d - 1)
        and m >= 16
        and m % bm == 0
        and m // bm in (1, 2, 4)
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
