"""Fused Triton kernels for FAVOR+ attention (bidirectional and causal, softmax and ReLU features).

Same API and numerics as the PyTorch reference (:mod:`protein_lm.attention.ops.favor`,
docs/architecture.md "Softmax-kernel numerics"), but the ``(B, H, L, M)`` feature tensors are never
written to memory: every kernel recomputes the features of the rows it touches from ``q``/``k``
and the projection (one ``(T, D) x (D, BM)`` product per tile and feature slice), applies the
stabiliser and ``exp2`` in registers and feeds them straight into the next tensor-core product.

The M features are handled in ``NS = M / BM`` slices of ``BM`` (<= 64) columns, so no ``(T, M)`` tile
is ever live. ``T`` = 64-row tile; a *split* is a run of consecutive tiles owned by one program.

Softmax features in log2 units: the host folds ``d^-1/4 * log2(e)`` into the projection, so a
feature is ``exp2(u - shift_row)`` with ``u = x W'^T`` and one per-row shift that also holds the
key term ``|k|^2 / 2`` and the ``1/sqrt(M)`` factor: one subtraction and one ``exp2`` per element.
The query term ``-|q|^2 / 2`` is a per-row constant; like the per-row max it cancels in the ratio,
so it is not computed at all, and neither is its gradient (exactly zero, but computed it is a sum
that cancels badly in floating point: a 2-4 % error in dq).

Shared by both modes:

* ``_key_state_kernel``  per (split, slice): ``sum phi_k^T V`` (BM x D) and ``sum phi_k`` (BM), with an
  online max so that one pass gives the shared key shift (``max`` over real keys of ``u + h``) --
  partial sums are rescaled like flash attention's.

Bidirectional (the states are constant over the sequence: each tile reads them, per slice, from L2):

* ``_bid_fwd_kernel``       ``out = phi_q S / max(phi_q z, eps)``; the per-query shift is an online max
  over the slices (accumulators rescaled), stored for the backward.
* ``_bid_query_state_kernel``  per (split, slice j): the split's partial query state
  ``G_j = sum phi_q^T dN`` (``dN = dO / den``) and ``gz_j = sum phi_q ddn``, like the key state.
* ``_bid_dq_kernel``        ``dq`` one tile at a time from ``S``, every slice in registers.
* ``_bid_dkv_kernel``       ``dk, dv`` one tile at a time from ``G``.

Causal (a running state per slice is carried along each split, so the live state is one ``(BM, D)``
fp32 tile and never spills):

* ``_rowmax_kernel``      the per-query shift (max over all M features), needed before any slice.
* ``_causal_fwd_kernel``  ``num, den += phi_q S + tril(phi_q phi_k^T) [V, 1]``, then ``S += phi_k^T V``;
  ``_finish_kernel`` divides.
* ``_causal_dq_kernel``   the same walk, producing ``dq`` and the split's partial query state.
* ``_causal_dkv_kernel``  the reverse walk (suffix states of ``phi_q^T dN``), producing ``dk, dv``.

The bidirectional passes use no atomics: their results are bitwise reproducible. In the causal
walks the slices' contributions to a row (linear in the slices) are summed in one of two ways:

* default: one program per (split, slice), adding to zeroed float32 buffers with atomics (the
  forward's are zeroed by the key-state pass, the backward's by PyTorch, which casts them).
  Fastest, but the last float32 bits depend on the order the slices land in.
* deterministic (``torch.use_deterministic_algorithms(True)`` or ``deterministic=True``): one program
  per split walks the slices in turn; the first stores to a float32 scratch, later ones add, the
  last writes the output dtype (the forward takes its shift as an online max over the slices
  instead of ``_rowmax_kernel``). Bitwise reproducible, ~1.7x slower (bench/NOTES_gpu.md).

Eager calls run the host code through an ``autograd.Function``. Under ``torch.compile`` the same code
runs as two registered torch ops (``protein_lm::favor_triton_fwd`` / ``_bwd``, with fake tensor shapes
and the autograd formula registered), so a model compiles to one graph around them instead of
breaking at every attention layer.

Between kernels, the per-split partial sums (``(B*H, splits, M, D)``) are combined: a max-rescaled
sum in PyTorch (bidirectional) or ``_exclusive_scan_kernel``'s prefix / suffix scan (causal). Backward
recomputes everything from ``q, k, v, out`` and the per-row normaliser and shift.

Packed rows (``segment_ids``; every branch behind the ``HAS_SEG`` constexpr or in kernels of their
own, so that without segments the kernels compile to code with no segment logic at all):

* ``_segment_layout_kernel``: labels (runs of equal ids) and, per 64-row tile, the first / last row
  of its first and last segment. ``_rowmax_kernel`` (KEYS) + ``_segment_max_kernel``: one key shift
  per segment instead of per (batch, head), as a per-row ``(B*H, L)`` array.
* bidirectional: a segment is *long* if it reaches beyond one tile, *short* if it lies inside one.
  At most two long segments meet a tile (its first and last), and each starts in a different tile,
  so their states live in the slot of their start tile, ``(B*H, n_tiles, M, D)``.
  ``_seg_state_kernel`` fills the slots (segments inside a split directly; the parts of those that
  cross splits are summed in order by ``_seg_combine_kernel``: no atomics). The walks read one slot
  per tile (two where long segments meet); the rows of short segments are left to
  ``_bid_short_fwd_kernel`` / ``_bid_short_bwd_kernel``, the tile's masked quadratic form, which
  return at once on tiles without one.
* causal: the carried state belongs to one segment, is read by its rows only and restarts at a
  boundary; intra-tile scores are masked to equal labels; the split scan restarts at a split that
  holds a boundary; the split parts are the last (forward) / first (backward) segment's only.
* queries that see no key get ``dN = 0`` in the kernels (``_dn`` BLIND), not a host-side mask.

Precision: inputs bf16 (or fp32). The projection ``x W^T`` that feeds ``exp`` runs as two bf16
products against ``W = W_hi + W_lo`` (about 16 mantissa bits) by default; ``logit_precision="bf16"``
uses one bf16 product (faster, ~3 significant digits in the logits). Features, normalisers and all
accumulators are float32; the products of features with values, states or each other (the causal
intra-tile scores) and of feature gradients with W use bf16 operands with float32 accumulation
(float32/tf32 for float32 inputs; bf16 intra-tile scores measured no less accurate than tf32 ones).
Shifts are treated as constants in backward (they cancel in the ratio), as in the reference.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["favor_attention_triton", "supported", "why_unsupported", "DEFAULT_BLOCK", "LOGIT_PRECISIONS"]

RELU_EPS = 1e-3
DEFAULT_BLOCK = 64
LOGIT_PRECISIONS = ("split", "bf16", "tf32")
_NEG = -1.0e30
_LOG2E = 1.4426950408889634
_NEG_K = tl.constexpr(-1.0e30)  # the same, usable inside kernels
_RELU_EPS_K = tl.constexpr(RELU_EPS)


# --------------------------------------------------------------------------------------------- #
# jit helpers
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _proj(x, whi, wlo, SPLIT_W: tl.constexpr):
    """``(T, D)`` rows x ``(BM, D)`` weights -> ``(T, BM)`` float32 ``x W^T`` (``W = hi + lo`` if split)."""
    if SPLIT_W:
        u = tl.dot(x, tl.trans(whi)) + tl.dot(x, tl.trans(wlo))
    else:
        u = tl.dot(x.to(whi.dtype), tl.trans(whi))
    return u


@triton.jit
def _key_bias(k, hk2):
    """``(T,)``: the softmax key term ``-|k'|^2 / 2`` in log2 units (``hk2 = log2(e) d^-1/2 / 2``)."""
    kf = k.to(tl.float32)
    return -hk2 * tl.sum(kf * kf, axis=1)


@triton.jit
def _features(u, shift_row, SOFTMAX: tl.constexpr):
    """Logits ``(T, BM)`` -> features: ``exp2(u - shift)`` (softmax) or ``relu(u) + eps``."""
    if SOFTMAX:
        phi = tl.exp2(u - shift_row[:, None])
    else:
        phi = tl.maximum(u, 0.0) + _RELU_EPS_K
    return phi


@triton.jit
def _key_features(k, whi, wlo, valid, gk, hk2, SOFTMAX: tl.constexpr, SPLIT_W: tl.constexpr):
    """Key logits and features (zero at padding / out of range) with the head's shift ``gk``."""
    u = _proj(k, whi, wlo, SPLIT_W)
    if SOFTMAX:
        shift = gk - _key_bias(k, hk2)
    else:
        shift = gk
    return u, tl.where(valid[:, None], _features(u, shift, SOFTMAX), 0.0)


@triton.jit
def _row_shift(ROWC_ROW, rows, inb, SOFTMAX: tl.constexpr):
    """The stored per-query shift (softmax; ReLU features have none)."""
    if SOFTMAX:
        c = tl.load(ROWC_ROW + rows, mask=inb, other=0.0)
    else:
        c = tl.zeros(rows.shape, tl.float32)
    return c


@triton.jit
def _feat_grad(dphi, phi, u, wg, SOFTMAX: tl.constexpr):
    """``(T, BM)`` feature gradient -> ``(T, D)`` input gradient through ``x W^T`` (per-row terms left
    to the caller) and ``ds`` = the logit gradient (softmax: ``dphi * phi``)."""
    if SOFTMAX:
        ds = dphi * phi
    else:
        ds = tl.where(u > 0.0, dphi, 0.0)
    return tl.dot(ds.to(wg.dtype), wg), ds


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
def _split_program(n_split):
    """Split kernels that loop over the slices themselves: program -> (row of B*H, split)."""
    pid = tl.program_id(0)
    return pid // n_split, pid % n_split


@triton.jit
def _split_slice(n_split, NS: tl.constexpr):
    """Program -> (row of B*H, split, feature slice); the slices of one split are adjacent programs,
    so the rows they all read are fetched from memory once and then hit L2."""
    pid = tl.program_id(0)
    j = pid % NS
    rest = pid // NS
    return rest // n_split, rest % n_split, j


@triton.jit
def _slice_range(n_split, NS: tl.constexpr, ATOMIC: tl.constexpr):
    """Program -> (row of B*H, split, first slice, number of slices it walks): one slice per program
    whose sums meet in float32 atomics (ATOMIC), or every slice in turn (deterministic)."""
    if ATOMIC:
        bh, sp, j0 = _split_slice(n_split, NS)
        n_j = 1
    else:
        bh, sp = _split_program(n_split)
        j0 = 0
        n_j = NS
    return bh, sp, j0, n_j


@triton.jit
def _dn(DO, O, DEN_ROW, rows, ptr, inb, eps, dtype: tl.constexpr, BLIND: tl.constexpr):
    """``dN = dO / den`` (rounded to the product dtype) and ``d(out)/d(den) = -rowsum(dN * O)``
    computed from that same rounded dN, so that ``dN . (v - o)`` cancels exactly. BLIND (packed
    rows): ``dN = 0`` where the normaliser was floored at eps, i.e. for queries that see no key
    (whose output is 0); without segments the host zeroes their dO instead (``_blind_queries``)."""
    do = tl.load(DO + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
    o = tl.load(O + ptr, mask=inb[:, None], other=0.0).to(tl.float32)
    den = tl.load(DEN_ROW + rows, mask=inb, other=1.0)
    dn = do / den[:, None]
    if BLIND:
        dn = tl.where((den > eps)[:, None], dn, 0.0)
    dn_c = dn.to(dtype)
    ddn = tl.where(den > eps, -tl.sum(dn_c.to(tl.float32) * o, axis=1), 0.0)
    return dn_c, ddn


@triton.jit
def _add_slice(ACC, OUT, ptr, inb, x, j, NS: tl.constexpr, ATOMIC: tl.constexpr):
    """Slice ``j``'s ``(T, D)`` float32 contribution. ATOMIC: added to the zeroed float32 ``ACC`` with
    an atomic (the host casts it). Deterministic: the first slice stores it to the float32 scratch
    ``ACC``, later ones add to it, the last writes the total to ``OUT`` in its dtype (one program
    owns these rows: no zero-fill, no atomics, no cast pass)."""
    if ATOMIC:
        tl.atomic_add(ACC + ptr, x, mask=inb[:, None], sem="relaxed")
    else:
        if j > 0:
            x += tl.load(ACC + ptr, mask=inb[:, None], other=0.0)
        if j == NS - 1:
            tl.store(OUT + ptr, x.to(OUT.dtype.element_ty), mask=inb[:, None])
        else:
            tl.store(ACC + ptr, x, mask=inb[:, None])


@triton.jit
def _slice_done(ATOMIC: tl.constexpr):
    """Deterministic walks: this slice's scratch writes become visible to the next slice's threads."""
    if not ATOMIC:
        tl.debug_barrier()


@triton.jit
def _own_rows(inb, j, T: tl.constexpr, NS: tl.constexpr):
    """The tile rows that slice ``j``'s program handles in a pass shared out among the slices (row r
    goes to slice r % NS): one slice doing all of it would make its programs the slowest."""
    return inb & ((tl.arange(0, T) % NS) == j)


@triton.jit
def _row_key_shift(GKR, row_base, rows, inb):
    """Packed rows: the key shift of each row's segment (``(B*H, L)`` from the host)."""
    return tl.load(GKR + row_base + rows, mask=inb, other=0.0)


@triton.jit
def _seg_key_shift(GKR, row_base, rows, inb, SOFTMAX: tl.constexpr):
    """Packed rows: per-row key shifts (softmax), zeros for ReLU (no shift)."""
    if SOFTMAX:
        gk = _row_key_shift(GKR, row_base, rows, inb)
    else:
        gk = tl.zeros(rows.shape, tl.float32)
    return gk


@triton.jit
def _labels(LAB, b, rows, inb, L):
    """Packed rows: the ``(T,)`` segment labels of the tile (-1 out of range)."""
    return tl.load(LAB + b.to(tl.int64) * L + rows, mask=inb, other=-1)


@triton.jit
def _label_at(LAB, b, row, L):
    """The segment label of one row (clamped into the sequence)."""
    return tl.load(LAB + b.to(tl.int64) * L + tl.minimum(tl.maximum(row, 0), L - 1))


@triton.jit
def _when(cond, mask):
    """``mask`` where the scalar ``cond`` holds, else all False (``&`` with a scalar bool broadcasts to
    the wrong dtype in Triton's interpreter)."""
    return tl.where(cond, mask, False)


@triton.jit
def _tile_segments(TAB, b, row0, L, T: tl.constexpr):
    """Packed rows, bidirectional: the tile's layout from the host table ``(B, n_tiles, 4)`` = start and
    end rows of the tile's first and last segment. A segment is *long* if it reaches beyond the tile
    (its state lives in the slot of its start tile), *short* if it lies inside it (the tile's masked
    quadratic term covers it). At most two long segments meet a tile: the first and the last.
    Returns ``(fs, fe, ls, first_long, last_long, has_short)``; nothing is long past the end."""
    live = row0 < L
    tile = tl.minimum(row0, L - 1) // T
    ptr = TAB + (b.to(tl.int64) * tl.cdiv(L, T) + tile) * 4
    fs = tl.load(ptr)
    fe = tl.load(ptr + 1)
    ls = tl.load(ptr + 2)
    le = tl.load(ptr + 3)
    first_long = live & ((fs < row0) | (fe >= row0 + T))
    last_long = live & (ls != fs) & (le >= row0 + T)  # a distinct last segment starts in the tile
    # short: a first or last segment that is not long, or any segment in between
    has_short = live & (~first_long | ((ls != fs) & ~last_long) | (fe + 1 < ls))
    return fs, fe, ls, first_long, last_long, has_short


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min2(a, b):
    return tl.minimum(a, b)


@triton.jit
def _seg_max2(v1, f1, v2, f2):
    """Segmented running max: a set flag starts a new segment."""
    return tl.where(f2, v2, tl.maximum(v1, v2)), f1 | f2


# --------------------------------------------------------------------------------------------- #
# packed rows: segment layout and per-segment key shifts (one program per row, two walks over L)
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _segment_layout_kernel(IDS, LAB, TAB, L, BLOCK: tl.constexpr, T: tl.constexpr):
    """Per batch row: ``LAB`` int32 = the index of each position's run of equal ids, and ``TAB
    (n_tiles, 4)`` = first and last row of each tile's first segment, then of its last one (a forward
    walk for starts, a backward walk for ends, each a scan per block with a carry). The backward
    walk indexes its blocks in descending order and scans forward (no ``reverse=True`` scans)."""
    b = tl.program_id(0).to(tl.int64)
    ids = IDS + b * L
    tab = TAB + b * tl.cdiv(L, T) * 4
    label = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)  # label of the last row walked
    start = label  # first row of the segment open at the end of the last block
    for r0 in range(0, L, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        inb = r < L
        new = inb & (r > 0) & (tl.load(ids + r, mask=inb) != tl.load(ids + r - 1, mask=inb & (r > 0)))
        lab = label + tl.cumsum(new.to(tl.int32), axis=0)
        st = tl.maximum(tl.associative_scan(tl.where(new, r, 0), 0, _max2), start)
        tl.store(LAB + b * L + r, lab, mask=inb)
        first = inb & (r % T == 0)
        last = inb & ((r % T == T - 1) | (r == L - 1))
        tl.store(tab + (r // T) * 4, st, mask=first)
        tl.store(tab + (r // T) * 4 + 2, st, mask=last)
        label += tl.sum(new.to(tl.int32), axis=0)
        start = tl.max(tl.where(inb, st, 0), axis=0)
    end = L - 1  # last row of the segment open at the start of the last block walked
    for i in range(0, tl.cdiv(L, BLOCK)):
        hi = L - 1 - i * BLOCK
        r = hi - tl.arange(0, BLOCK)  # descending rows
        inb = r >= 0
        nxt = inb & (r < L - 1)
        stop = inb & ((r == L - 1) | (tl.load(ids + r, mask=inb) != tl.load(ids + r + 1, mask=nxt)))
        en = tl.minimum(tl.associative_scan(tl.where(stop, r, L), 0, _min2), end)
        first = inb & (r % T == 0)
        last = inb & ((r % T == T - 1) | (r == L - 1))
        tl.store(tab + (r // T) * 4 + 1, en, mask=first)
        tl.store(tab + (r // T) * 4 + 3, en, mask=last)
        end = tl.min(tl.where(inb, en, L), axis=0)


@triton.jit
def _segment_max_kernel(X, LAB, OUT, H, L, fill, BLOCK: tl.constexpr):
    """Per row of ``(B*H, L)``: ``OUT = `` the max of ``X`` over each position's segment (``fill``
    where it is ``_NEG``: a segment of padding only). A forward walk takes the running max within
    segments (carried across blocks), a backward walk spreads each segment's last value back."""
    bh = tl.program_id(0)
    lab = LAB + (bh // H).to(tl.int64) * L
    x_row = X + bh.to(tl.int64) * L
    out = OUT + bh.to(tl.int64) * L
    run = tl.max(tl.full([BLOCK], _NEG_K, tl.float32), axis=0)
    for r0 in range(0, L, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        inb = r < L
        x = tl.load(x_row + r, mask=inb, other=_NEG_K)
        new = tl.load(lab + r, mask=inb) != tl.load(lab + r - 1, mask=inb & (r > 0), other=-1)
        v, _ = tl.associative_scan((x, new), 0, _seg_max2)
        v = tl.where(tl.cumsum(new.to(tl.int32), axis=0) == 0, tl.maximum(v, run), v)  # the open one
        tl.store(out + r, v, mask=inb)
        run = tl.max(tl.where(r == tl.minimum(r0 + BLOCK, L) - 1, v, _NEG_K), axis=0)
    run = tl.max(tl.full([BLOCK], _NEG_K, tl.float32), axis=0)
    for i in range(0, tl.cdiv(L, BLOCK)):
        hi = L - 1 - i * BLOCK
        r = hi - tl.arange(0, BLOCK)  # descending rows: a forward scan walks them backwards
        inb = r >= 0
        v = tl.load(out + r, mask=inb, other=_NEG_K)
        stop = tl.load(lab + r, mask=inb) != tl.load(lab + r + 1, mask=inb & (r < L - 1), other=-1)
        w, _ = tl.associative_scan((v, stop), 0, _seg_max2)
        w = tl.where(tl.cumsum(stop.to(tl.int32), axis=0) == 0, tl.maximum(w, run), w)  # the open segment
        tl.store(out + r, tl.where(w > _NEG_K / 2, w, fill), mask=inb)
        run = tl.max(tl.where(r == tl.maximum(hi - BLOCK + 1, 0), w, _NEG_K), axis=0)


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
    NUM,
    DEN,
    H,
    L,
    split_len,
    n_split,
    hk2,
    lg_sqrt_m,
    LAB,
    GKR,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    ZERO_SUMS: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    """Per (split, feature slice): SP = sum phi_k^T V, ZP = sum phi_k, MP = the split's key shift.
    ZERO_SUMS: the slices also zero their share of the split's rows of the causal forward's float32
    sums NUM / DEN (the same splits), which saves a fill pass over memory before the atomic walk.
    HAS_SEG (causal, packed rows): only the keys of the split's last segment (the state it hands on)
    enter the sums, with the per-row key shift ``GKR`` of their segment (no online max)."""
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
    if HAS_SEG:
        split_last = _label_at(LAB, b, tl.minimum(start + split_len, L) - 1, L)
    for t0 in range(0, split_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        if ZERO_SUMS:
            own = _own_rows(inb, ms, T, NS)
            tl.store(NUM + ptr, tl.zeros([T, D], tl.float32), mask=own[:, None])
            tl.store(DEN + bh.to(tl.int64) * L + rows, tl.zeros([T], tl.float32), mask=own)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        u = _proj(k, whi, wlo, SPLIT_W)
        live = valid
        if HAS_SEG:
            live = valid & (_labels(LAB, b, rows, inb, L) == split_last)
            if SOFTMAX:
                shift = _row_key_shift(GKR, bh.to(tl.int64) * L, rows, inb) - _key_bias(k, hk2)
            else:
                shift = tl.zeros([T], tl.float32)
        elif SOFTMAX:  # online max over the split's real keys; partial sums rescaled as it grows
            hb = _key_bias(k, hk2)
            tmax = tl.max(tl.where(valid, tl.max(u, axis=1) + hb, _NEG_K), axis=0)
            m_new = tl.maximum(m_run, tmax)
            alpha = tl.exp2(m_run - m_new)
            acc = acc * alpha
            z = z * alpha
            m_run = m_new
            shift = m_run + lg_sqrt_m - hb
        else:
            shift = tl.zeros([T], tl.float32)
        phi = tl.where(live[:, None], _features(u, shift, SOFTMAX), 0.0)
        acc += tl.dot(tl.trans(phi.to(v.dtype)), v)
        z += tl.sum(phi, axis=0)
    out = (bh * n_split + sp).to(tl.int64)
    tl.store(SP + out * M * D + w_off, acc)
    tl.store(ZP + out * M + offs_m, z)
    tl.store(MP + out * NS + ms + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + m_run)


@triton.jit
def _long_segments(TAB, b, bh, rows, row0, L, T: tl.constexpr):
    """Per tile of the bidirectional walks over packed rows: whether its first / last segment is
    long, the rows of each (``in_f``, ``in_l``) and their state slots in ``(B*H, n_tiles, ...)``.
    The rows of short segments are left to the ``_bid_short_*`` kernels."""
    fs, fe, ls, first_long, last_long, _ = _tile_segments(TAB, b, row0, L, T)
    n_tiles = tl.cdiv(L, T)
    slot_f = (bh * n_tiles + fs // T).to(tl.int64)
    slot_l = (bh * n_tiles + ls // T).to(tl.int64)
    in_f = _when(first_long, rows <= fe)
    in_l = _when(last_long, rows >= ls)
    return first_long, last_long, in_f, in_l, slot_f, slot_l


@triton.jit
def _short_segments(TAB, LAB, b, rows, inb, row0, L, T: tl.constexpr):
    """Per tile: whether it holds a short segment, the rows of short segments, and ``same (T, T)``:
    equal labels (so a short row's partners are exactly the keys of its own segment)."""
    fs, fe, ls, first_long, last_long, has_short = _tile_segments(TAB, b, row0, L, T)
    short = inb & ~(_when(first_long, rows <= fe) | _when(last_long, rows >= ls))
    lab = _labels(LAB, b, rows, _when(has_short, inb), L)
    return has_short, short, lab[:, None] == lab[None, :]


@triton.jit
def _put_state(S, Z, idx, acc, z, w_off, offs_m, M: tl.constexpr, D: tl.constexpr):
    """Stores one (BM, D) state slice and its (BM,) sums at entry ``idx`` of ``S`` / ``Z``."""
    tl.store(S + idx.to(tl.int64) * M * D + w_off, acc.to(S.dtype.element_ty))
    tl.store(Z + idx.to(tl.int64) * M + offs_m, z)


@triton.jit
def _seg_state_kernel(
    X,
    Y,
    O,
    DO,
    DEN,
    ROWC,
    GKR,
    PAD,
    WHI,
    WLO,
    TAB,
    SLOT,
    ZSLOT,
    HEAD,
    ZHEAD,
    TAIL,
    ZTAIL,
    H,
    L,
    split_len,
    n_split,
    hk2,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    QUERY: tl.constexpr,
    ZERO_SLOTS: tl.constexpr,
):
    """Bidirectional, packed rows, per (split, slice): the states of the long segments (those reaching
    beyond one tile). Keys (X=K, Y=V): ``S = sum phi_k^T v``, ``z = sum phi_k``; QUERY (X=Q, with O, DO,
    DEN, ROWC): ``G = sum phi_q^T dN``, ``gz = sum phi_q ddn``. A segment that starts and ends in the
    split goes straight to ``SLOT[its start tile]`` (input dtype); the part of one that crosses the
    split's start goes to ``HEAD[split]``, of one that starts in it and crosses its end to
    ``TAIL[split]`` (float32), for ``_seg_combine_kernel``. The walk carries one open segment.
    ZERO_SLOTS: the slots of tiles where no long segment starts are zeroed (the forward returns the
    key slots from the registered op, whose outputs must be fully defined)."""
    NS: tl.constexpr = M // BM
    bh, sp, ms = _split_slice(n_split, NS)
    b = bh // H
    offs_m, w_off = _slice_offsets(ms, BM, D)
    base = bh.to(tl.int64) * L * D
    row_base = bh.to(tl.int64) * L
    n_tiles = tl.cdiv(L, T)
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    z = tl.zeros([BM], dtype=tl.float32)
    start = sp * split_len
    open_start = start * 0 - 1  # start row of the segment left open in acc by the last tile (-1: none)
    for t0 in range(0, split_len, T):
        row0 = start + t0
        rows, inb, valid, ptr = _tile(PAD, b, base, row0, L, T, D, HAS_PAD)
        if QUERY:
            x = tl.load(X + ptr, mask=valid[:, None], other=0.0)
            c_row = _row_shift(ROWC + row_base, rows, inb, SOFTMAX)
            val, zw = _dn(DO, O, DEN + row_base, rows, ptr, inb, eps, X.dtype.element_ty, True)
            phi = tl.where(inb[:, None], _features(_proj(x, whi, wlo, SPLIT_W), c_row, SOFTMAX), 0.0)
        else:
            x = tl.load(X + ptr, mask=valid[:, None], other=0.0)
            val = tl.load(Y + ptr, mask=valid[:, None], other=0.0)
            if SOFTMAX:
                gk = _row_key_shift(GKR, row_base, rows, inb)
            else:
                gk = tl.zeros([T], tl.float32)
            _, phi = _key_features(x, whi, wlo, valid, gk, hk2, SOFTMAX, SPLIT_W)
            zw = tl.full([T], 1.0, tl.float32)
        fs, fe, ls, first_long, last_long, _ = _tile_segments(TAB, b, row0, L, T)
        if first_long:
            pm = tl.where((rows <= fe)[:, None], phi, 0.0)
            acc += tl.dot(tl.trans(pm.to(val.dtype)), val)
            z += tl.sum(pm * zw[:, None], axis=0)
            if fe < row0 + T:  # it ends here: complete (started in the split) or the split's head part
                if fs >= start:
                    _put_state(SLOT, ZSLOT, bh * n_tiles + fs // T, acc, z, w_off, offs_m, M, D)
                else:
                    _put_state(HEAD, ZHEAD, bh * n_split + sp, acc, z, w_off, offs_m, M, D)
                acc = tl.zeros([BM, D], dtype=tl.float32)
                z = tl.zeros([BM], dtype=tl.float32)
        if last_long:
            pm = tl.where((rows >= ls)[:, None], phi, 0.0)
            acc += tl.dot(tl.trans(pm.to(val.dtype)), val)
            z += tl.sum(pm * zw[:, None], axis=0)
        if ZERO_SLOTS:
            if (row0 < L) & ~(last_long | (first_long & (fs >= row0))):
                zero = tl.zeros([BM, D], dtype=tl.float32)
                _put_state(
                    SLOT, ZSLOT, bh * n_tiles + row0 // T, zero, tl.sum(zero, axis=1), w_off, offs_m, M, D
                )
        open_start = tl.where(first_long & (fe >= row0 + T), fs, tl.where(last_long, ls, -1))
    if open_start >= start:  # starts in the split and runs past its end
        _put_state(TAIL, ZTAIL, bh * n_split + sp, acc, z, w_off, offs_m, M, D)
    elif open_start >= 0:  # runs through the split from before its start and past its end
        _put_state(HEAD, ZHEAD, bh * n_split + sp, acc, z, w_off, offs_m, M, D)


@triton.jit
def _seg_combine_kernel(
    TAIL, HEAD, SLOT, TAB, H, L, split_len, n_split, E, BLOCK: tl.constexpr, T: tl.constexpr
):
    """``SLOT[start tile] = TAIL[first split] + HEAD[each later split it reaches]`` for every long segment
    that crosses a split boundary (``(B*H, n, E)`` float32 parts, E = M*D or M): one program per (row
    of B*H, split, block of E), summing the splits in order (bitwise reproducible)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(E, BLOCK)
    rest = pid // n_blocks
    sp = rest % n_split
    bh = rest // n_split
    b = bh // H
    n_tiles = tl.cdiv(L, T)
    split_end = tl.minimum((sp + 1) * split_len, L)
    tp = TAB + (b.to(tl.int64) * n_tiles + (split_end - 1) // T) * 4
    ls = tl.load(tp + 2)  # the last segment of the split's last tile
    le = tl.load(tp + 3)
    if (ls >= sp * split_len) & (le >= split_end):
        cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < E
        acc = tl.load(TAIL + (bh * n_split + sp).to(tl.int64) * E + cols, mask=mask, other=0.0)
        for sp2 in range(sp + 1, le // split_len + 1):
            acc += tl.load(HEAD + (bh * n_split + sp2).to(tl.int64) * E + cols, mask=mask, other=0.0)
        dst = SLOT + (bh * n_tiles + ls // T).to(tl.int64) * E + cols
        tl.store(dst, acc.to(SLOT.dtype.element_ty), mask=mask)


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
    lg_sqrt_m,
    eps,
    TAB,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    """``out = phi_q S / max(phi_q z, eps)``. HAS_SEG (packed rows): S0 / Z0 are the long segments'
    slots; the rows of a long segment read its state (two dots where two long segments meet), the
    rows of short segments are written by ``_bid_short_fwd_kernel``."""
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
        c_row = tl.full([T], _NEG_K, tl.float32)
        if HAS_SEG:
            first_long, last_long, in_f, in_l, slot_f, slot_l = _long_segments(
                TAB, b, bh, rows, start + t0, L, T
            )
            inb = inb & (in_f | in_l)
        for j in tl.static_range(NS):
            offs_m, w_off = _slice_offsets(j, BM, D)
            u = _proj(q, tl.load(WHI + w_off), tl.load(WLO + w_off), SPLIT_W)
            if not HAS_SEG:
                s = tl.load(S0 + st * M * D + w_off)
                z = tl.load(Z0 + st * M + offs_m)
            if SOFTMAX:  # online per-row max over the slices; accumulators rescaled as it grows
                c_new = tl.maximum(c_row, tl.max(u, axis=1) + lg_sqrt_m)
                alpha = tl.exp2(c_row - c_new)
                num = num * alpha[:, None]
                den = den * alpha
                c_row = c_new
            phi = _features(u, c_row, SOFTMAX)
            if HAS_SEG:
                if first_long:
                    s = tl.load(S0 + slot_f * M * D + w_off)
                    pm = tl.where(in_f[:, None], phi, 0.0)
                    num += tl.dot(pm.to(s.dtype), s)
                    den += tl.sum(pm * tl.load(Z0 + slot_f * M + offs_m)[None, :], axis=1)
                if last_long:
                    s = tl.load(S0 + slot_l * M * D + w_off)
                    pm = tl.where(in_l[:, None], phi, 0.0)
                    num += tl.dot(pm.to(s.dtype), s)
                    den += tl.sum(pm * tl.load(Z0 + slot_l * M + offs_m)[None, :], axis=1)
            else:
                num += tl.dot(phi.to(s.dtype), s)
                den += tl.sum(phi * z[None, :], axis=1)
        den = tl.maximum(den, eps)
        tl.store(O + ptr, (num / den[:, None]).to(O.dtype.element_ty), mask=inb[:, None])
        tl.store(DEN + bh.to(tl.int64) * L + rows, den, mask=inb)
        if SOFTMAX:
            tl.store(ROWC + bh.to(tl.int64) * L + rows, c_row, mask=inb)


@triton.jit
def _bid_query_state_kernel(
    Q,
    O,
    DO,
    DEN,
    ROWC,
    PAD,
    WHI,
    WLO,
    GP,
    GZP,
    H,
    L,
    split_len,
    n_split,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Per (split, slice j): the split's partial query state ``G_j = sum phi_q^T dN`` (BM x D),
    ``gz_j = sum phi_q ddn`` (BM) that dk, dv need (the query-side twin of ``_key_state_kernel``)."""
    NS: tl.constexpr = M // BM
    bh, sp, j = _split_slice(n_split, NS)
    b = bh // H
    offs_m, w_off = _slice_offsets(j, BM, D)
    base = bh.to(tl.int64) * L * D
    whi = tl.load(WHI + w_off)
    wlo = tl.load(WLO + w_off)
    g = tl.zeros([BM, D], dtype=tl.float32)
    gz = tl.zeros([BM], dtype=tl.float32)
    start = sp * split_len
    for t0 in range(0, split_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        c_row = _row_shift(ROWC + bh.to(tl.int64) * L, rows, inb, SOFTMAX)
        dn_c, ddn = _dn(DO, O, DEN + bh.to(tl.int64) * L, rows, ptr, inb, eps, Q.dtype.element_ty, False)
        phi_q = tl.where(inb[:, None], _features(_proj(q, whi, wlo, SPLIT_W), c_row, SOFTMAX), 0.0)
        g += tl.dot(tl.trans(phi_q.to(dn_c.dtype)), dn_c)
        gz += tl.sum(phi_q * ddn[:, None], axis=0)
    out = (bh * n_split + sp).to(tl.int64)
    tl.store(GP + out * M * D + w_off, g)
    tl.store(GZP + out * M + offs_m, gz)


@triton.jit
def _bid_dq_kernel(
    Q,
    O,
    DO,
    DEN,
    ROWC,
    PAD,
    WHI,
    WLO,
    WG,
    S0,
    Z0,
    DQ,
    H,
    L,
    walk_len,
    n_walk,
    eps,
    TAB,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    """``dq`` one tile at a time, every slice in registers: ``dphi_q = dN S^T + ddn z``. HAS_SEG: each
    long segment's rows use its slot; ``_bid_short_dq_kernel`` writes the rows of short segments."""
    NS: tl.constexpr = M // BM
    bh, start = _walk_program(n_walk, walk_len)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    st = bh.to(tl.int64)
    for t0 in range(0, walk_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        c_row = _row_shift(ROWC + bh.to(tl.int64) * L, rows, inb, SOFTMAX)
        dn_c, ddn = _dn(DO, O, DEN + bh.to(tl.int64) * L, rows, ptr, inb, eps, Q.dtype.element_ty, HAS_SEG)
        dq = tl.zeros([T, D], dtype=tl.float32)
        if HAS_SEG:
            first_long, last_long, in_f, in_l, slot_f, slot_l = _long_segments(
                TAB, b, bh, rows, start + t0, L, T
            )
            inb = inb & (in_f | in_l)
        for j in tl.static_range(NS):
            offs_m, w_off = _slice_offsets(j, BM, D)
            u = _proj(q, tl.load(WHI + w_off), tl.load(WLO + w_off), SPLIT_W)
            if HAS_SEG:
                dphi = tl.zeros([T, BM], dtype=tl.float32)
                if first_long:
                    s = tl.load(S0 + slot_f * M * D + w_off)
                    z = tl.load(Z0 + slot_f * M + offs_m)
                    t = tl.dot(dn_c, tl.trans(s.to(dn_c.dtype))) + ddn[:, None] * z[None, :]
                    dphi += tl.where(in_f[:, None], t, 0.0)
                if last_long:
                    s = tl.load(S0 + slot_l * M * D + w_off)
                    z = tl.load(Z0 + slot_l * M + offs_m)
                    t = tl.dot(dn_c, tl.trans(s.to(dn_c.dtype))) + ddn[:, None] * z[None, :]
                    dphi += tl.where(in_l[:, None], t, 0.0)
            else:
                s = tl.load(S0 + st * M * D + w_off)  # (BM, D) key state, input dtype
                z = tl.load(Z0 + st * M + offs_m)
                dphi = tl.dot(dn_c, tl.trans(s.to(dn_c.dtype))) + ddn[:, None] * z[None, :]
            dq_j, _ = _feat_grad(dphi, _features(u, c_row, SOFTMAX), u, tl.load(WG + w_off), SOFTMAX)
            dq += dq_j
        dq = tl.where(valid[:, None], dq, 0.0)
        tl.store(DQ + ptr, dq.to(DQ.dtype.element_ty), mask=inb[:, None])


@triton.jit
def _bid_dkv_kernel(
    K,
    V,
    PAD,
    WHI,
    WLO,
    WG,
    G0,
    GZ0,
    GK,
    DK,
    DV,
    H,
    L,
    walk_len,
    n_walk,
    hk2,
    kgrad,
    TAB,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    """``dk, dv`` one tile at a time from the query state G. HAS_SEG: each long segment's rows use its
    slot (GK: per-row key shifts); ``_bid_short_dkv_kernel`` writes the rows of short segments."""
    NS: tl.constexpr = M // BM
    bh, start = _walk_program(n_walk, walk_len)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    st = bh.to(tl.int64)
    if not HAS_SEG:
        gk = tl.load(GK + bh)
    for t0 in range(0, walk_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        dk = tl.zeros([T, D], dtype=tl.float32)
        dv = tl.zeros([T, D], dtype=tl.float32)
        ds_sum = tl.zeros([T], dtype=tl.float32)
        if HAS_SEG:
            first_long, last_long, in_f, in_l, slot_f, slot_l = _long_segments(
                TAB, b, bh, rows, start + t0, L, T
            )
            inb = inb & (in_f | in_l)
            gk = _seg_key_shift(GK, st * L, rows, inb, SOFTMAX)
        for j in tl.static_range(NS):
            offs_m, w_off = _slice_offsets(j, BM, D)
            u, phi_k = _key_features(
                k, tl.load(WHI + w_off), tl.load(WLO + w_off), valid, gk, hk2, SOFTMAX, SPLIT_W
            )
            if HAS_SEG:
                dphi = tl.zeros([T, BM], dtype=tl.float32)
                if first_long:
                    g = tl.load(G0 + slot_f * M * D + w_off).to(v.dtype)
                    gz = tl.load(GZ0 + slot_f * M + offs_m)
                    dphi += tl.where(in_f[:, None], tl.dot(v, tl.trans(g)) + gz[None, :], 0.0)
                    dv += tl.dot(tl.where(in_f[:, None], phi_k, 0.0).to(v.dtype), g)
                if last_long:
                    g = tl.load(G0 + slot_l * M * D + w_off).to(v.dtype)
                    gz = tl.load(GZ0 + slot_l * M + offs_m)
                    dphi += tl.where(in_l[:, None], tl.dot(v, tl.trans(g)) + gz[None, :], 0.0)
                    dv += tl.dot(tl.where(in_l[:, None], phi_k, 0.0).to(v.dtype), g)
                dphi = tl.where(valid[:, None], dphi, 0.0)
            else:
                g = tl.load(G0 + st * M * D + w_off).to(v.dtype)
                gz = tl.load(GZ0 + st * M + offs_m)
                dphi = tl.where(valid[:, None], tl.dot(v, tl.trans(g)) + gz[None, :], 0.0)
                dv += tl.dot(phi_k.to(v.dtype), g)
            dk_j, ds = _feat_grad(dphi, phi_k, u, tl.load(WG + w_off), SOFTMAX)
            dk += dk_j
            ds_sum += tl.sum(ds, axis=1)
        if SOFTMAX:  # gradient of the key term -|k'|^2 / 2
            dk -= kgrad * k.to(tl.float32) * ds_sum[:, None]
        dk = tl.where(valid[:, None], dk, 0.0)
        tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=inb[:, None])
        tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=inb[:, None])


@triton.jit
def _short_program(H, L, T: tl.constexpr):
    """Per-tile kernels of short segments: program -> (row of B*H, batch, first row of its tile)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(L, T)
    bh = pid // n_tiles
    return bh, bh // H, (pid % n_tiles) * T


@triton.jit
def _bid_short_fwd_kernel(
    Q,
    K,
    V,
    PAD,
    WHI,
    WLO,
    GKR,
    LAB,
    TAB,
    O,
    DEN,
    ROWC,
    H,
    L,
    hk2,
    lg_sqrt_m,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Bidirectional, packed rows: the outputs of the rows of short segments (those inside one tile)
    from the tile's quadratic form ``(phi_q phi_k^T masked to the segment) [v, 1]``, with the same
    online per-query shift as ``_bid_fwd_kernel``. Tiles without a short segment return at once."""
    NS: tl.constexpr = M // BM
    bh, b, row0 = _short_program(H, L, T)
    base = bh.to(tl.int64) * L * D
    row_base = bh.to(tl.int64) * L
    rows, inb, valid, ptr = _tile(PAD, b, base, row0, L, T, D, HAS_PAD)
    has_short, short, same = _short_segments(TAB, LAB, b, rows, inb, row0, L, T)
    if has_short:
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        gk = _seg_key_shift(GKR, row_base, rows, inb, SOFTMAX)
        a = tl.zeros([T, T], dtype=tl.float32)  # (T query, T key)
        c_row = tl.full([T], _NEG_K, tl.float32)
        for j in tl.static_range(NS):
            _, w_off = _slice_offsets(j, BM, D)
            whi = tl.load(WHI + w_off)
            wlo = tl.load(WLO + w_off)
            uq = _proj(q, whi, wlo, SPLIT_W)
            if SOFTMAX:  # online per-row max over the slices, as in _bid_fwd_kernel
                c_new = tl.maximum(c_row, tl.max(uq, axis=1) + lg_sqrt_m)
                a = a * tl.exp2(c_row - c_new)[:, None]
                c_row = c_new
            phi_q = _features(uq, c_row, SOFTMAX)
            uk, phi_k = _key_features(k, whi, wlo, valid, gk, hk2, SOFTMAX, SPLIT_W)
            a += tl.dot(phi_q.to(k.dtype), tl.trans(phi_k.to(k.dtype)))
        a = tl.where(same & valid[None, :], a, 0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        den = tl.maximum(tl.sum(a, axis=1), eps)
        out = tl.dot(a.to(v.dtype), v) / den[:, None]
        tl.store(O + ptr, out.to(O.dtype.element_ty), mask=short[:, None])
        tl.store(DEN + row_base + rows, den, mask=short)
        if SOFTMAX:
            tl.store(ROWC + row_base + rows, c_row, mask=short)


@triton.jit
def _bid_short_bwd_kernel(
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
    WG,
    GKR,
    LAB,
    TAB,
    DQ,
    DK,
    DV,
    H,
    L,
    hk2,
    kgrad,
    eps,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Bidirectional, packed rows: dq, dk, dv of the rows of short segments from the tile's quadratic
    form: ``P = dN v^T + ddn`` (masked to the segment), ``dphi_q = P phi_k``, ``dphi_k = P^T phi_q``,
    ``dv = A^T dN`` with ``A = phi_q phi_k^T``. Tiles without a short segment return at once."""
    NS: tl.constexpr = M // BM
    bh, b, row0 = _short_program(H, L, T)
    base = bh.to(tl.int64) * L * D
    row_base = bh.to(tl.int64) * L
    rows, inb, valid, ptr = _tile(PAD, b, base, row0, L, T, D, HAS_PAD)
    has_short, short, same = _short_segments(TAB, LAB, b, rows, inb, row0, L, T)
    if has_short:
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
        c_row = _row_shift(ROWC + row_base, rows, inb, SOFTMAX)
        dn_c, ddn = _dn(DO, O, DEN + row_base, rows, ptr, inb, eps, v.dtype, True)
        gk = _seg_key_shift(GKR, row_base, rows, inb, SOFTMAX)
        live = same & valid[None, :]  # (T query, T key)
        p = tl.where(live, tl.dot(dn_c, tl.trans(v)) + ddn[:, None], 0.0).to(v.dtype)
        dq = tl.zeros([T, D], dtype=tl.float32)
        dk = tl.zeros([T, D], dtype=tl.float32)
        dv = tl.zeros([T, D], dtype=tl.float32)
        ds_sum = tl.zeros([T], dtype=tl.float32)
        for j in tl.static_range(NS):
            _, w_off = _slice_offsets(j, BM, D)
            whi = tl.load(WHI + w_off)
            wlo = tl.load(WLO + w_off)
            wg = tl.load(WG + w_off)
            uq = _proj(q, whi, wlo, SPLIT_W)
            phi_q = tl.where(inb[:, None], _features(uq, c_row, SOFTMAX), 0.0)
            uk, phi_k = _key_features(k, whi, wlo, valid, gk, hk2, SOFTMAX, SPLIT_W)
            dq_j, _ = _feat_grad(tl.dot(p, phi_k.to(v.dtype)), phi_q, uq, wg, SOFTMAX)
            dq += dq_j
            a = tl.where(live, tl.dot(phi_q.to(v.dtype), tl.trans(phi_k.to(v.dtype))), 0.0)
            dv += tl.dot(tl.trans(a.to(v.dtype)), dn_c)
            dphi_k = tl.where(valid[:, None], tl.dot(tl.trans(p), phi_q.to(v.dtype)), 0.0)
            dk_j, ds = _feat_grad(dphi_k, phi_k, uk, wg, SOFTMAX)
            dk += dk_j
            ds_sum += tl.sum(ds, axis=1)
        if SOFTMAX:  # gradient of the key term -|k'|^2 / 2
            dk -= kgrad * k.to(tl.float32) * ds_sum[:, None]
        tl.store(DQ + ptr, tl.where(valid[:, None], dq, 0.0).to(DQ.dtype.element_ty), mask=short[:, None])
        tl.store(DK + ptr, tl.where(valid[:, None], dk, 0.0).to(DK.dtype.element_ty), mask=short[:, None])
        tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=short[:, None])


# --------------------------------------------------------------------------------------------- #
# causal: the program walks its split once per feature slice, carrying that slice's (BM, D) state
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
    lg_sqrt_m,
    hk2,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEYS: tl.constexpr,
):
    """Per-query shift of the softmax features, ``max_m u + log2(sqrt(M))`` over all M, needed before
    the slice-parallel causal walks (the deterministic walk takes it as an online max instead).
    KEYS (packed rows): the same for keys, with their term ``-|k'|^2 / 2``, and ``_NEG`` at padding;
    the host takes its max over each segment as the segment's key shift."""
    NS: tl.constexpr = M // BM
    bh, start = _walk_program(n_walk, walk_len)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    for t0 in range(0, walk_len, T):
        rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
        q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
        c_row = tl.full([T], _NEG_K, tl.float32)
        for j in tl.static_range(NS):
            _, w_off = _slice_offsets(j, BM, D)
            u = _proj(q, tl.load(WHI + w_off), tl.load(WLO + w_off), SPLIT_W)
            c_row = tl.maximum(c_row, tl.max(u, axis=1))
        if KEYS:
            c_row = tl.where(valid, c_row + _key_bias(q, hk2), _NEG_K - lg_sqrt_m)
        tl.store(ROWC + bh.to(tl.int64) * L + rows, c_row + lg_sqrt_m, mask=inb)


@triton.jit
def _finish_kernel(NUM, DEN, O, n_rows, eps, D: tl.constexpr, R: tl.constexpr):
    """``O = NUM / max(DEN, eps)`` in O's dtype, DEN floored in place (atomic causal forward)."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    inb = rows < n_rows
    ptr = rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    den = tl.maximum(tl.load(DEN + rows, mask=inb, other=1.0), eps)
    num = tl.load(NUM + ptr, mask=inb[:, None], other=0.0)
    tl.store(O + ptr, (num / den[:, None]).to(O.dtype.element_ty), mask=inb[:, None])
    tl.store(DEN + rows, den, mask=inb)


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
    GK,
    ROWC,
    NUM,
    DEN,
    O,
    H,
    L,
    split_len,
    n_split,
    hk2,
    lg_sqrt_m,
    eps,
    LAB,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    """Adds slice j's part of every row's numerator and normaliser to NUM / DEN. ATOMIC: one slice per
    program, float32 atomics into zeroed buffers, the shift from ``_rowmax_kernel``, O written by
    ``_finish_kernel``. Deterministic: the program walks every slice in turn; the shift is an online
    max (earlier slices' sums rescaled when it grows) and the last slice writes O.
    HAS_SEG (packed rows): the carried state belongs to one segment (``s_seg``): only its rows read it,
    it restarts from the tile's last segment when that differs, the intra-tile scores are masked to
    equal labels, and GK holds per-row key shifts."""
    NS: tl.constexpr = M // BM
    bh, sp, j0, n_j = _slice_range(n_split, NS, ATOMIC)
    b = bh // H
    offs_t = tl.arange(0, T)
    base = bh.to(tl.int64) * L * D
    row_base = bh.to(tl.int64) * L
    st = (bh * n_split + sp).to(tl.int64)
    if not HAS_SEG:
        gk = tl.load(GK + bh)
    causal = offs_t[:, None] >= offs_t[None, :]
    start = sp * split_len
    if HAS_SEG:  # the segment of the state entering the split (the scan's)
        seg_in = tl.where(start > 0, _label_at(LAB, b, start - 1, L), -1)
    for j in range(j0, j0 + n_j):
        offs_m, w_off = _slice_offsets(j, BM, D)
        whi = tl.load(WHI + w_off)
        wlo = tl.load(WLO + w_off)
        s = tl.load(S0 + st * M * D + w_off)  # (BM, D) fp32 state entering the split
        z = tl.load(Z0 + st * M + offs_m)
        if HAS_SEG:
            s_seg = seg_in
        for t0 in range(0, split_len, T):
            rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
            q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
            k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
            v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
            if HAS_SEG:
                lab = _labels(LAB, b, rows, inb, L)
                last = _label_at(LAB, b, start + t0 + T - 1, L)
                gk = _seg_key_shift(GK, row_base, rows, inb, SOFTMAX)
            uq = _proj(q, whi, wlo, SPLIT_W)
            if SOFTMAX and ATOMIC:  # the final shift, from _rowmax_kernel
                c_row = tl.load(ROWC + row_base + rows, mask=inb, other=0.0)
                c_old = c_row
            elif SOFTMAX:  # online per-row max over the slices (slice j > 0 reads the running one)
                c_old = tl.load(ROWC + row_base + rows, mask=inb & (j > 0), other=_NEG_K)
                c_row = tl.maximum(c_old, tl.max(uq, axis=1) + lg_sqrt_m)
            else:
                c_row = tl.zeros([T], tl.float32)
                c_old = c_row
            phi_q = _features(uq, c_row, SOFTMAX)
            _, phi_k = _key_features(k, whi, wlo, valid, gk, hk2, SOFTMAX, SPLIT_W)
            if HAS_SEG:
                a = tl.where(
                    causal & (lab[:, None] == lab[None, :]),
                    tl.dot(phi_q.to(v.dtype), tl.trans(phi_k.to(v.dtype))),
                    0.0,
                )
                pq = tl.where((lab == s_seg)[:, None], phi_q, 0.0)
                num = tl.dot(pq.to(v.dtype), s.to(v.dtype)) + tl.dot(a.to(v.dtype), v)
                den = tl.sum(pq * z[None, :], axis=1) + tl.sum(a, axis=1)
                pk = tl.where((lab == last)[:, None], phi_k, 0.0)
                s = tl.where(last == s_seg, s, 0.0) + tl.dot(tl.trans(pk.to(v.dtype)), v)
                z = tl.where(last == s_seg, z, 0.0) + tl.sum(pk, axis=0)
                s_seg = last
            else:
                a = tl.where(
                    causal, tl.dot(phi_q.to(v.dtype), tl.trans(phi_k.to(v.dtype))), 0.0
                )  # (T, T) intra-tile scores
                num = tl.dot(phi_q.to(v.dtype), s.to(v.dtype)) + tl.dot(a.to(v.dtype), v)
                den = tl.sum(phi_q * z[None, :], axis=1) + tl.sum(a, axis=1)
                s += tl.dot(tl.trans(phi_k.to(v.dtype)), v)
                z += tl.sum(phi_k, axis=0)
            if ATOMIC:
                tl.atomic_add(NUM + ptr, num, mask=inb[:, None], sem="relaxed")
                tl.atomic_add(DEN + row_base + rows, den, mask=inb, sem="relaxed")
            else:
                _fold_slice(
                    NUM, DEN, ROWC, O, ptr, row_base, rows, inb, num, den, c_old, c_row, j, eps, NS, SOFTMAX
                )
        _slice_done(ATOMIC)


@triton.jit
def _fold_slice(
    NUM,
    DEN,
    ROWC,
    O,
    ptr,
    row_base,
    rows,
    inb,
    num,
    den,
    c_old,
    c_row,
    j,
    eps,
    NS: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    """Deterministic causal forward: folds slice j's numerator / normaliser into the running float32
    sums (rescaled from the old shift ``c_old`` to the grown ``c_row``); the last slice writes O and
    the floored normaliser."""
    if j > 0:
        num_old = tl.load(NUM + ptr, mask=inb[:, None], other=0.0)
        den_old = tl.load(DEN + row_base + rows, mask=inb, other=0.0)
        if SOFTMAX:
            alpha = tl.exp2(c_old - c_row)
            num_old = num_old * alpha[:, None]
            den_old = den_old * alpha
        num += num_old
        den += den_old
    # every thread has read this pass's old ROWC / DEN copies before any thread overwrites them
    tl.debug_barrier()
    if SOFTMAX:
        tl.store(ROWC + row_base + rows, c_row, mask=inb)
    if j == NS - 1:
        den = tl.maximum(den, eps)
        tl.store(O + ptr, (num / den[:, None]).to(O.dtype.element_ty), mask=inb[:, None])
    else:
        tl.store(NUM + ptr, num, mask=inb[:, None])
    tl.store(DEN + row_base + rows, den, mask=inb)


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
    WG,
    S0,
    Z0,
    GK,
    DQ32,
    DQ,
    GP,
    GZP,
    H,
    L,
    split_len,
    n_split,
    hk2,
    eps,
    LAB,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    """Per split, one forward walk per slice j (dphi_q = dN S^T + ddn z + P phi_k): adds slice j's
    part of dq and stores the split's partial query state ``G_j = sum phi_q^T dN``, ``gz_j``.
    HAS_SEG: the key state is carried and reset as in the forward; G sums only the queries of the
    split's first segment (the part the reverse scan hands to earlier splits)."""
    NS: tl.constexpr = M // BM
    bh, sp, j0, n_j = _slice_range(n_split, NS, ATOMIC)
    b = bh // H
    offs_t = tl.arange(0, T)
    base = bh.to(tl.int64) * L * D
    row_base = bh.to(tl.int64) * L
    st = (bh * n_split + sp).to(tl.int64)
    if not HAS_SEG:
        gk = tl.load(GK + bh)
    causal = offs_t[:, None] >= offs_t[None, :]
    start = sp * split_len
    if HAS_SEG:
        seg_in = tl.where(start > 0, _label_at(LAB, b, start - 1, L), -1)
        split_first = _label_at(LAB, b, start, L)
    for j in range(j0, j0 + n_j):
        offs_m, w_off = _slice_offsets(j, BM, D)
        whi = tl.load(WHI + w_off)
        wlo = tl.load(WLO + w_off)
        wg = tl.load(WG + w_off)
        s = tl.load(S0 + st * M * D + w_off)
        z = tl.load(Z0 + st * M + offs_m)
        g = tl.zeros([BM, D], dtype=tl.float32)
        gz = tl.zeros([BM], dtype=tl.float32)
        if HAS_SEG:
            s_seg = seg_in
        for t0 in range(0, split_len, T):
            rows, inb, valid, ptr = _tile(PAD, b, base, start + t0, L, T, D, HAS_PAD)
            q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
            k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
            v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
            c_row = _row_shift(ROWC + row_base, rows, inb, SOFTMAX)
            dn_c, ddn = _dn(DO, O, DEN + row_base, rows, ptr, inb, eps, Q.dtype.element_ty, HAS_SEG)
            if HAS_SEG:
                lab = _labels(LAB, b, rows, inb, L)
                last = _label_at(LAB, b, start + t0 + T - 1, L)
                gk = _seg_key_shift(GK, row_base, rows, inb, SOFTMAX)
                live = causal & (lab[:, None] == lab[None, :])
                p = tl.where(live, tl.dot(dn_c, tl.trans(v)) + ddn[:, None], 0.0)  # (T query, T key)
            else:
                p = tl.where(causal, tl.dot(dn_c, tl.trans(v)) + ddn[:, None], 0.0)  # (T query, T key)
            uq = _proj(q, whi, wlo, SPLIT_W)
            phi_q = _features(uq, c_row, SOFTMAX)
            if HAS_SEG:
                phi_m = tl.where((inb & (lab == split_first))[:, None], phi_q, 0.0)
            else:
                phi_m = tl.where(inb[:, None], phi_q, 0.0)
            g += tl.dot(tl.trans(phi_m.to(dn_c.dtype)), dn_c)
            gz += tl.sum(phi_m * ddn[:, None], axis=0)
            _, phi_k = _key_features(k, whi, wlo, valid, gk, hk2, SOFTMAX, SPLIT_W)
            if HAS_SEG:
                t_s = tl.dot(dn_c, tl.trans(s.to(dn_c.dtype))) + ddn[:, None] * z[None, :]
                dphi = tl.where((lab == s_seg)[:, None], t_s, 0.0) + tl.dot(p.to(v.dtype), phi_k.to(v.dtype))
                pk = tl.where((lab == last)[:, None], phi_k, 0.0)
                s = tl.where(last == s_seg, s, 0.0) + tl.dot(tl.trans(pk.to(v.dtype)), v)
                z = tl.where(last == s_seg, z, 0.0) + tl.sum(pk, axis=0)
                s_seg = last
            else:
                dphi = (
                    tl.dot(dn_c, tl.trans(s.to(dn_c.dtype)))
                    + ddn[:, None] * z[None, :]
                    + tl.dot(p.to(v.dtype), phi_k.to(v.dtype))
                )
                s += tl.dot(tl.trans(phi_k.to(v.dtype)), v)
                z += tl.sum(phi_k, axis=0)
            dq, _ = _feat_grad(dphi, phi_q, uq, wg, SOFTMAX)
            _add_slice(DQ32, DQ, ptr, inb, tl.where(valid[:, None], dq, 0.0), j, NS, ATOMIC)
        tl.store(GP + st * M * D + w_off, g)
        tl.store(GZP + st * M + offs_m, gz)
        _slice_done(ATOMIC)


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
    WG,
    G0,
    GZ0,
    GK,
    DK32,
    DV32,
    DK,
    DV,
    H,
    L,
    split_len,
    n_split,
    hk2,
    kgrad,
    eps,
    LAB,
    D: tl.constexpr,
    M: tl.constexpr,
    BM: tl.constexpr,
    T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SPLIT_W: tl.constexpr,
    HAS_PAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    """Per split, one reverse walk per slice j carrying the suffix state G = sum phi_q^T dN: adds
    slice j's part of dk and dv (finished in DK / DV by the last slice). HAS_SEG: G belongs to one
    segment (``g_seg``), read by its rows only and restarted from the tile's first segment."""
    NS: tl.constexpr = M // BM
    bh, sp, j0, n_j = _slice_range(n_split, NS, ATOMIC)
    b = bh // H
    offs_t = tl.arange(0, T)
    base = bh.to(tl.int64) * L * D
    row_base = bh.to(tl.int64) * L
    st = (bh * n_split + sp).to(tl.int64)
    if not HAS_SEG:
        gk = tl.load(GK + bh)
    causal_t = offs_t[:, None] <= offs_t[None, :]  # [key j, query i]: i >= j
    start = sp * split_len
    n_t = tl.cdiv(split_len, T)
    if HAS_SEG:  # the segment of the suffix state entering the split from its end (the scan's)
        end = start + split_len
        seg_in = tl.where(end < L, _label_at(LAB, b, end, L), -1)
    for j in range(j0, j0 + n_j):
        offs_m, w_off = _slice_offsets(j, BM, D)
        whi = tl.load(WHI + w_off)
        wlo = tl.load(WLO + w_off)
        wg = tl.load(WG + w_off)
        g = tl.load(G0 + st * M * D + w_off)  # (BM, D) fp32 suffix state after the split
        gz = tl.load(GZ0 + st * M + offs_m)
        if HAS_SEG:
            g_seg = seg_in
        for i in range(0, n_t):
            row0 = start + (n_t - 1 - i) * T
            rows, inb, valid, ptr = _tile(PAD, b, base, row0, L, T, D, HAS_PAD)
            q = tl.load(Q + ptr, mask=valid[:, None], other=0.0)
            k = tl.load(K + ptr, mask=valid[:, None], other=0.0)
            v = tl.load(V + ptr, mask=valid[:, None], other=0.0)
            c_row = _row_shift(ROWC + row_base, rows, inb, SOFTMAX)
            dn_c, ddn = _dn(DO, O, DEN + row_base, rows, ptr, inb, eps, v.dtype, HAS_SEG)
            if HAS_SEG:
                lab = _labels(LAB, b, rows, inb, L)
                first = _label_at(LAB, b, row0, L)
                gk = _seg_key_shift(GK, row_base, rows, inb, SOFTMAX)
                live_t = causal_t & (lab[:, None] == lab[None, :])
                pt = tl.where(live_t, tl.dot(v, tl.trans(dn_c)) + ddn[None, :], 0.0)  # (T key, T query)
            else:
                pt = tl.where(causal_t, tl.dot(v, tl.trans(dn_c)) + ddn[None, :], 0.0)  # (T key, T query)
            uk, phi_k = _key_features(k, whi, wlo, valid, gk, hk2, SOFTMAX, SPLIT_W)
            phi_q = tl.where(inb[:, None], _features(_proj(q, whi, wlo, SPLIT_W), c_row, SOFTMAX), 0.0)
            g_c = g.to(v.dtype)
            if HAS_SEG:
                gm = (lab == g_seg)[:, None]
                dphi = tl.where(gm, tl.dot(v, tl.trans(g_c)) + gz[None, :], 0.0)
                dphi += tl.dot(pt.to(v.dtype), phi_q.to(v.dtype))
                at = tl.where(live_t, tl.dot(phi_k.to(v.dtype), tl.trans(phi_q.to(v.dtype))), 0.0)
                dv = tl.dot(tl.where(gm, phi_k, 0.0).to(v.dtype), g_c) + tl.dot(at.to(v.dtype), dn_c)
                ph = tl.where((lab == first)[:, None], phi_q, 0.0)
                g = tl.where(first == g_seg, g, 0.0) + tl.dot(tl.trans(ph.to(v.dtype)), dn_c)
                gz = tl.where(first == g_seg, gz, 0.0) + tl.sum(ph * ddn[:, None], axis=0)
                g_seg = first
            else:
                dphi = tl.dot(v, tl.trans(g_c)) + gz[None, :] + tl.dot(pt.to(v.dtype), phi_q.to(v.dtype))
                at = tl.where(causal_t, tl.dot(phi_k.to(v.dtype), tl.trans(phi_q.to(v.dtype))), 0.0)
                dv = tl.dot(phi_k.to(v.dtype), g_c) + tl.dot(at.to(v.dtype), dn_c)
                g += tl.dot(tl.trans(phi_q.to(v.dtype)), dn_c)
                gz += tl.sum(phi_q * ddn[:, None], axis=0)
            dphi = tl.where(valid[:, None], dphi, 0.0)
            dk, ds = _feat_grad(dphi, phi_k, uk, wg, SOFTMAX)
            if SOFTMAX:  # gradient of the key term -|k'|^2 / 2
                dk -= kgrad * k.to(tl.float32) * tl.sum(ds, axis=1)[:, None]
            _add_slice(DK32, DK, ptr, inb, tl.where(valid[:, None], dk, 0.0), j, NS, ATOMIC)
            _add_slice(DV32, DV, ptr, inb, dv, j, NS, ATOMIC)
        _slice_done(ATOMIC)


@triton.jit
def _exclusive_scan_kernel(
    X, OUT, n, E, LAB, H, L, split_len, BLOCK: tl.constexpr, REVERSE: tl.constexpr, HAS_SEG: tl.constexpr
):
    """Exclusive prefix (REVERSE: suffix) sum over dim 1 of ``(R, n, E)`` float32: one program per row
    and block of E, walking the n splits in order, so the sums never depend on scheduling.
    HAS_SEG (packed rows, R = B*H): split i holds only its last (REVERSE: first) segment's part, and the
    running sum passes through it only if one segment fills it (``LAB`` at its first and last row)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(E, BLOCK)
    cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < E
    base = (pid // n_blocks).to(tl.int64) * n * E
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n):
        if REVERSE:
            step = n - 1 - i
        else:
            step = i
        off = base + step.to(tl.int64) * E + cols
        x = tl.load(X + off, mask=mask, other=0.0)
        tl.store(OUT + off, acc, mask=mask)
        if HAS_SEG:
            b = (pid // n_blocks) // H
            first = _label_at(LAB, b, step * split_len, L)
            last = _label_at(LAB, b, tl.minimum((step + 1) * split_len, L) - 1, L)
            acc = tl.where(first == last, acc, 0.0) + x
        else:
            acc += x


# --------------------------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------------------------- #
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _cdiv(a, b):
    return (a + b - 1) // b


def _split_len(length, programs_per_row: int, tile: int, device: torch.device, waves: float):
    """Rows per program so that about ``waves * SMs`` programs run (multiple of the tile). Integer
    arithmetic only: ``length`` may be a symbolic size (torch.compile, see ``_forward_fake``)."""
    want = max(1, int(waves * _num_sms(device)))
    per = torch.sym_max(tile, _cdiv(_cdiv(length * programs_per_row, want), tile) * tile)
    return torch.sym_min(per, _cdiv(length, tile) * tile)


def _causal_splits(
    length, bh: int, slices: int, tile: int, walk_split: int | None, deterministic: bool, device
):
    """``(rows per split, splits)`` of the causal walks: one walk per (split, slice) with atomics,
    one per split in the deterministic mode."""
    per_row = bh * (1 if deterministic else slices)
    split = walk_split or _split_len(length, per_row, tile, device, waves=CAUSAL_WAVES)
    return split, _cdiv(length, split)


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


def _check_options(
    m: int, tile: int, state_split: int | None, walk_split: int | None, slice_m: int | None
) -> int:
    """The slice width, or ``ValueError`` for options the kernels cannot run (no shape needed: the
    wrapper checks them before torch.compile traces the op, so the error is not buried in a trace)."""
    bm = _slice_width(m, slice_m)
    if bm is None:
        raise ValueError(f"num_features M={m}: no slice width in 16, 32, 64 divides it (slice_m={slice_m})")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    for name, rows in (("state_split", state_split), ("walk_split", walk_split)):
        if rows is not None and (rows <= 0 or rows % tile):
            # a walk covers whole tiles: a partial one would re-add the next split's rows
            raise ValueError(f"{name} must be a positive multiple of tile={tile}, got {rows}")
    return bm


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
        deterministic: bool | None = None,
    ):
        b, h, length, d = q.shape
        m = projection.shape[0]
        self.B, self.H, self.L, self.D, self.M = b, h, length, d, m
        self.BH = b * h
        self.T = tile
        self.BM = _check_options(m, tile, state_split, walk_split, slice_m)
        self.NS = m // self.BM
        self.softmax = kernel == "softmax"
        self.causal = causal
        self.eps = float(eps)
        # softmax logits in log2 units: x W'^T with W' = W d^-1/4 log2(e); key term -|k'|^2/2 likewise
        scale = d**-0.25 if self.softmax else 1.0
        self.w_logit = scale * _LOG2E if self.softmax else 1.0
        self.w_grad = scale  # d(logit)/dx in natural units: W d^-1/4 (ReLU: W)
        self.hk2 = 0.5 * scale * scale * _LOG2E  # key term in log2 units per |k|^2
        self.kgrad = scale * scale  # its gradient: -d^-1/2 k per unit of sum(ds)
        self.lg_sqrt_m = 0.5 * math.log2(m)  # the features' 1/sqrt(M) factor, folded into the shifts
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        # causal: slice-parallel programs summed by float32 atomics (fastest), or one program per split
        # that walks the slices in turn (bitwise reproducible, ~1.7x slower: bench/NOTES_gpu.md).
        # The bidirectional passes use no atomics at all.
        self.atomic = causal and not deterministic
        per_split = self.NS if self.atomic else 1  # programs per split of the slice-summed passes
        dev = q.device
        n_tiles = math.ceil(length / tile)
        if causal:  # one split = one walk per slice; the key-state kernel uses the same splits
            split = _causal_splits(length, self.BH, self.NS, tile, walk_split, deterministic, dev)[0]
            self.split = self.walk_split = split
        else:  # the key- and query-state passes: one program per (split, slice)
            self.split = state_split or _split_len(length, self.BH * self.NS, tile, dev, waves=STATE_WAVES)
            self.walk_split = min(walk_split or 4 * tile, n_tiles * tile)
        self.n_split = math.ceil(length / self.split)
        self.n_tiles = n_tiles
        self.n_walk = math.ceil(length / self.walk_split)
        self.per_split = per_split
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
    projection: Tensor, dtype: torch.dtype, p: _Plan, precision: str | None = None
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``(W_hi, W_lo, W_grad, split?)``: the logit weights (scaled, see ``_Plan``) and the gradient
    weights in the products' dtype.

    ``precision``: ``"split"`` multiplies ``W_hi + W_lo`` (two bf16 products, ~16 mantissa bits; the
    default for bf16 inputs), ``"bf16"`` one bf16 product, ``"tf32"`` one tf32 product (the default
    for float32 inputs, and for fp16 ones, which the caller upcasts; exact float32 in the
    interpreter). With float32 inputs, ``"split"`` and ``"bf16"`` keep the bf16 rounding of W but
    store it as float32: Triton's interpreter cannot multiply bf16 (tests).
    """
    wf = projection.detach().float()
    wl = (wf * p.w_logit).contiguous()
    low = dtype in (torch.bfloat16, torch.float16)
    precision = precision or ("split" if low else "tf32")  # validated by favor_attention_triton
    wg = (wf * p.w_grad).to(dtype if low else torch.float32).contiguous()
    if precision == "tf32":
        return wl, wl, wg, False
    hi = wl.to(torch.bfloat16)
    lo = (wl - hi.float()).to(torch.bfloat16)
    if not low:
        hi, lo = hi.float(), wl - hi.float()
    return hi.contiguous(), lo.contiguous(), wg, precision == "split"


def _exclusive_scan(x: Tensor, reverse: bool = False, lab: Tensor | None = None, p=None) -> Tensor:
    """Exclusive prefix (or suffix) sum over dim 1, without ``cumsum - x`` (which cancels badly
    when one split holds huge values, e.g. ``dO / eps`` of queries that see only padding).

    A sequential Triton scan: one pass over memory in either direction (``torch.cumsum`` took
    flips, a fill and copies, ~0.1 ms at 8k) and deterministic (``torch.cumsum`` on CUDA floats
    refuses to run under ``torch.use_deterministic_algorithms(True)``). Each program walks the
    splits one at a time: with the automatic splits that is ~33 steps for B*H = 8, but ~260 for a
    single head (not measured; a blocked walk would cut it). ``lab`` (packed rows, with the plan
    ``p``): the sum restarts wherever a split holds a segment boundary."""
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, n = x.shape[:2]
    width = x[0, 0].numel()
    block = 1024
    grid = rows * triton.cdiv(width, block)
    seg = (lab, p.H, p.L, p.split) if lab is not None else (None, None, None, None)
    args = (x, out, n, width, *seg, block, reverse)
    _launch("_exclusive_scan_kernel", _exclusive_scan_kernel, grid, *args, HAS_SEG=lab is not None)
    return out


def _launch(name: str, kernel, grid: int, *args, **kwargs) -> None:
    """One launch of ``kernel`` on a 1-D grid (``name`` labels the call site in tracebacks)."""
    kernel[(grid,)](*args, **kwargs)


def _scratch(out: Tensor, p: _Plan) -> Tensor:
    """float32 partial sums over the slices for the deterministic walks that finish in ``out`` (never
    zero-filled: the first slice stores). With one slice they are never touched, and a float32
    ``out`` is its own scratch (one program reads and then writes the same elements)."""
    if p.NS == 1 or out.dtype == torch.float32:
        return out
    return torch.empty(out.shape, device=out.device, dtype=torch.float32)


def _segment_layout(segment_ids: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """Packed rows: int32 labels ``(B, L)`` (runs of equal ids numbered 0, 1, ...) and the per-tile table
    ``(B, n_tiles, 4)`` = first row, last row of the tile's first segment, then of its last segment
    (the bidirectional kernels' long / short segments and state slots come from it). One launch."""
    b, length = segment_ids.shape
    lab = torch.empty(b, length, device=segment_ids.device, dtype=torch.int32)
    tab = torch.empty(b, _cdiv(length, tile), 4, device=segment_ids.device, dtype=torch.int32)
    _launch("_segment_layout_kernel", _segment_layout_kernel, b, segment_ids, lab, tab, length, 1024, tile)
    return lab, tab


def _segment_key_shifts(k, pad_t, whi, wlo, lab, p: _Plan, has_pad: bool, split_w: bool) -> Tensor:
    """Packed rows, softmax: ``(B*H, L)`` float32, each row's key shift = the max over the real keys of
    its segment of ``u + h`` (log2 units), plus the ``1/sqrt(M)`` factor. One per segment instead of
    one per (batch, head): a segment far below the row's largest key would underflow to zero."""
    km = torch.empty(p.BH, p.L, device=k.device, dtype=torch.float32)
    args = (k, pad_t, whi, wlo, km, p.H, p.L, p.walk_split, p.n_walk, p.lg_sqrt_m, p.hk2)
    shape = dict(D=p.D, M=p.M, BM=p.BM, T=p.T, SPLIT_W=split_w, HAS_PAD=has_pad, KEYS=True)
    _launch("_rowmax_kernel", _rowmax_kernel, p.BH * p.n_walk, *args, **shape, **p.cfg)
    gk = torch.empty_like(km)  # a segment of padding only gets a finite shift (any will do)
    _launch("_segment_max_kernel", _segment_max_kernel, p.BH, km, lab, gk, p.H, p.L, p.lg_sqrt_m, 1024)
    return gk


def _key_states(k, v, pad, whi, wlo, p: _Plan, common: dict, zero: tuple | None = None, seg=(None, None)):
    """Per-split partial key states ``(BH, n_split, M, D)``, ``(BH, n_split, M)`` and key shifts.
    ``zero``: the causal forward's ``(num, den)`` float32 sums, zeroed on the way. ``seg``: packed
    rows' ``(labels, per-row key shifts)``: each split's part of its last segment only."""
    BH, M, D = p.BH, p.M, p.D
    sp = torch.empty(BH, p.n_split, M, D, device=k.device, dtype=torch.float32)
    zp = torch.empty(BH, p.n_split, M, device=k.device, dtype=torch.float32)
    mp = torch.empty(BH, p.n_split, p.NS, device=k.device, dtype=torch.float32)
    num, den = zero if zero is not None else (sp, zp)  # dummy pointers
    args = (k, v, pad, whi, wlo, sp, zp, mp, num, den, p.H, p.L, p.split, p.n_split, p.hk2, p.lg_sqrt_m, *seg)
    grid = BH * p.n_split * p.NS
    flags = dict(ZERO_SUMS=zero is not None, HAS_SEG=seg[0] is not None)
    _launch("_key_state_kernel", _key_state_kernel, grid, *args, **common, **flags)
    return sp, zp, mp


def _seg_states(x, y, o, do, den, rowc, gk, pad, whi, wlo, tab, p: _Plan, common: dict, query: bool):
    """Bidirectional, packed rows: the long segments' states in the slots of their start tiles,
    ``(BH, n_tiles, M, D)`` in the input dtype and ``(BH, n_tiles, M)`` float32 (slots of tiles where no
    long segment starts are never written nor read). Keys (x=k, y=v) or, ``query``, the backward's
    ``sum phi_q^T dN`` (x=q with o, do, den, rowc)."""
    BH, M, D, dev = p.BH, p.M, p.D, x.device
    slot = torch.empty(BH, p.n_tiles, M, D, device=dev, dtype=x.dtype)
    zslot = torch.empty(BH, p.n_tiles, M, device=dev, dtype=torch.float32)
    parts = [torch.empty(BH, p.n_split, *w, device=dev, dtype=torch.float32) for w in ((M, D), (M,)) * 2]
    head, zhead, tail, ztail = parts
    args = (x, y, o, do, den, rowc, gk, pad, whi, wlo, tab, slot, zslot, head, zhead, tail, ztail)
    args += (p.H, p.L, p.split, p.n_split, p.hk2, p.eps)
    flags = dict(QUERY=query, ZERO_SLOTS=not query)
    _launch("_seg_state_kernel", _seg_state_kernel, BH * p.n_split * p.NS, *args, **common, **flags)
    block = 1024
    for t, h, dst in ((tail, head, slot), (ztail, zhead, zslot)):
        width = dst[0, 0].numel()
        grid = BH * p.n_split * triton.cdiv(width, block)
        args = (t, h, dst, tab, p.H, p.L, p.split, p.n_split, width)
        _launch("_seg_combine_kernel", _seg_combine_kernel, grid, *args, BLOCK=block, T=p.T)
    return slot, zslot


def _forward(q, k, v, pad, whi, wlo, split_w, p: _Plan, seg: tuple | None = None):
    dev = q.device
    BH, M, D, L = p.BH, p.M, p.D, p.L
    has_pad = pad is not None
    pad_t = pad if has_pad else q  # dummy pointer
    common = p.consts(has_pad, split_w)
    lab, tab = seg if seg is not None else (None, None)
    # per-query shifts (softmax); ReLU has none, but every output of the op must be defined
    rowc = (torch.empty if p.softmax else torch.zeros)(BH, L, device=dev, dtype=torch.float32)
    gk = None  # packed rows, softmax: per-row key shifts, computed before any state
    if seg is not None and p.softmax:
        gk = _segment_key_shifts(k, pad_t, whi, wlo, lab, p, has_pad, split_w)
    if seg is not None and not p.causal:
        if gk is None:
            gk = torch.zeros(BH, device=dev, dtype=torch.float32)
        s0, z0 = _seg_states(k, v, None, None, None, None, gk, pad_t, whi, wlo, tab, p, common, False)
        den = torch.empty(BH, L, device=dev, dtype=torch.float32)
        o = torch.empty_like(v)
        args = (q, pad_t, whi, wlo, s0, z0, o, den, rowc, p.H, L, p.walk_split, p.n_walk, p.lg_sqrt_m, p.eps)
        _launch("_bid_fwd_kernel", _bid_fwd_kernel, BH * p.n_walk, *args, tab, **common, HAS_SEG=True)
        args = (q, k, v, pad_t, whi, wlo, gk, lab, tab, o, den, rowc, p.H, L, p.hk2, p.lg_sqrt_m, p.eps)
        _launch("_bid_short_fwd_kernel", _bid_short_fwd_kernel, BH * p.n_tiles, *args, **common)
        return o, den, rowc, s0, z0, gk
    sums = None
    if p.atomic:  # float32 sums of the slices' atomics, zeroed by the key-state pass (same splits)
        sums = (
            torch.empty(BH, L, D, device=dev, dtype=torch.float32),
            torch.empty(BH, L, device=dev, dtype=torch.float32),
        )
    sp, zp, mp = _key_states(k, v, pad_t, whi, wlo, p, common, zero=sums, seg=(lab, gk))
    if gk is not None:  # the per-row shifts are final: nothing to rescale
        pass
    elif p.softmax:
        gmax = mp.amax(dim=(1, 2))  # (BH,)
        gmax = torch.where(gmax > _NEG / 2, gmax, torch.zeros_like(gmax))  # all-padding heads
        w = torch.exp2(mp - gmax[:, None, None])  # (BH, n_split, NS)
        sp = (sp.view(BH, p.n_split, p.NS, p.BM, D) * w[..., None, None]).view(BH, p.n_split, M, D)
        zp = (zp.view(BH, p.n_split, p.NS, p.BM) * w[..., None]).view(BH, p.n_split, M)
        gk = gmax + p.lg_sqrt_m  # the head's key shift, with the 1/sqrt(M) factor
    else:
        gk = torch.zeros(BH, device=dev, dtype=torch.float32)
    if p.causal:
        s0 = _exclusive_scan(sp, lab=lab, p=p)  # state entering each split
        z0 = _exclusive_scan(zp, lab=lab, p=p)
        del sp, zp
        if p.atomic:  # the zeroed float32 sums, finished by _finish_kernel; shift computed up front
            num, den = sums
            o = num.view(q.shape) if v.dtype == torch.float32 else torch.empty_like(v)
            if p.softmax:
                args = (q, pad_t, whi, wlo, rowc, p.H, L, p.walk_split, p.n_walk, p.lg_sqrt_m, None)
                shape = dict(D=D, M=M, BM=p.BM, T=p.T, SPLIT_W=split_w, HAS_PAD=has_pad, KEYS=False)
                _launch("_rowmax_kernel", _rowmax_kernel, BH * p.n_walk, *args, **shape, **p.cfg)
        else:
            den = torch.empty(BH, L, device=dev, dtype=torch.float32)
            o = torch.empty_like(v)
            num = _scratch(o, p)
        args = (q, k, v, pad_t, whi, wlo, s0, z0, gk, rowc, num, den, o, p.H, L, p.split, p.n_split)
        consts = (p.hk2, p.lg_sqrt_m, p.eps, lab)
        grid = BH * p.n_split * p.per_split
        flags = dict(ATOMIC=p.atomic, HAS_SEG=seg is not None)
        _launch("_causal_fwd_kernel", _causal_fwd_kernel, grid, *args, *consts, **common, **flags)
        if p.atomic:
            rows = 64
            fin = (num, den, o, BH * L, p.eps)
            _launch("_finish_kernel", _finish_kernel, math.ceil(BH * L / rows), *fin, D=D, R=rows)
        del num
    else:
        # the kernels multiply the state in the input dtype anyway: cast once here, halving its reads
        s0 = sp.sum(dim=1).to(q.dtype).contiguous()
        z0 = zp.sum(dim=1).contiguous()
        del sp, zp
        den = torch.empty(BH, L, device=dev, dtype=torch.float32)
        o = torch.empty_like(v)
        args = (q, pad_t, whi, wlo, s0, z0, o, den, rowc, p.H, L, p.walk_split, p.n_walk, p.lg_sqrt_m, p.eps)
        _launch("_bid_fwd_kernel", _bid_fwd_kernel, BH * p.n_walk, *args, None, **common, HAS_SEG=False)
    return o, den, rowc, s0, z0, gk


def _backward(q, k, v, o, do, den, rowc, pad, whi, wlo, wg, split_w, s0, z0, gk, p: _Plan, seg=None):
    dev = q.device
    BH, M, D, L = p.BH, p.M, p.D, p.L
    has_pad = pad is not None
    pad_t = pad if has_pad else q
    common = p.consts(has_pad, split_w)
    lab, tab = seg if seg is not None else (None, None)
    has_seg = seg is not None
    if not p.causal:  # no running state: dq per tile, the query state like the key state
        if has_seg:
            g0, gz0 = _seg_states(q, None, o, do, den, rowc, None, pad_t, whi, wlo, tab, p, common, True)
        else:
            gp = torch.empty(BH, p.n_split, M, D, device=dev, dtype=torch.float32)  # per-split query states
            gzp = torch.empty(BH, p.n_split, M, device=dev, dtype=torch.float32)
            args = (q, o, do, den, rowc, pad_t, whi, wlo, gp, gzp, p.H, L, p.split, p.n_split, p.eps)
            grid = BH * p.n_split * p.NS
            _launch("_bid_query_state_kernel", _bid_query_state_kernel, grid, *args, **common)
            g0 = gp.sum(dim=1).to(q.dtype).contiguous()  # read per tile in the input dtype, like S
            gz0 = gzp.sum(dim=1).contiguous()
            del gp, gzp
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (
            q,
            o,
            do,
            den,
            rowc,
            pad_t,
            whi,
            wlo,
            wg,
            s0,
            z0,
            dq,
            p.H,
            L,
            p.walk_split,
            p.n_walk,
            p.eps,
            tab,
        )
        _launch("_bid_dq_kernel", _bid_dq_kernel, BH * p.n_walk, *args, **common, HAS_SEG=has_seg)
        args = (k, v, pad_t, whi, wlo, wg, g0, gz0, gk, dk, dv, p.H, L, p.walk_split, p.n_walk, p.hk2)
        args += (p.kgrad, tab)
        _launch("_bid_dkv_kernel", _bid_dkv_kernel, BH * p.n_walk, *args, **common, HAS_SEG=has_seg)
        if has_seg:  # the rows of short segments
            args = (q, k, v, o, do, den, rowc, pad_t, whi, wlo, wg, gk, lab, tab, dq, dk, dv)
            args += (p.H, L, p.hk2, p.kgrad, p.eps)
            _launch("_bid_short_bwd_kernel", _bid_short_bwd_kernel, BH * p.n_tiles, *args, **common)
        return dq, dk, dv
    gp = torch.empty(BH, p.n_split, M, D, device=dev, dtype=torch.float32)  # per-split query states
    gzp = torch.empty(BH, p.n_split, M, device=dev, dtype=torch.float32)
    grid = BH * p.n_split * p.per_split
    slices = dict(common, ATOMIC=p.atomic, HAS_SEG=has_seg)
    if p.atomic:  # zeroed float32 sums, cast after the pass (the kernels' OUT is unused)
        dq32 = dq = torch.zeros(q.shape, device=dev, dtype=torch.float32)
    else:
        dq = torch.empty_like(q)
        dq32 = _scratch(dq, p)
    args = (q, k, v, o, do, den, rowc, pad_t, whi, wlo, wg, s0, z0, gk, dq32, dq, gp, gzp)
    consts = (p.H, L, p.split, p.n_split, p.hk2, p.eps, lab)
    _launch("_causal_dq_kernel", _causal_dq_kernel, grid, *args, *consts, **slices)
    g0 = _exclusive_scan(gp, reverse=True, lab=lab, p=p)  # suffix state after each split
    gz0 = _exclusive_scan(gzp, reverse=True, lab=lab, p=p)
    del gp, gzp
    if p.atomic:  # dk reuses dq's float32 buffer (peak: two of them plus the outputs), so copy dq
        dq = dq32.to(q.dtype, copy=True)
        dk32 = dk = dq32.zero_()
        dv32 = dv = torch.zeros(v.shape, device=dev, dtype=torch.float32)
    else:  # dq's scratch is free again: dk reuses it
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk32 = dq32 if dq32 is not dq else _scratch(dk, p)
        dv32 = _scratch(dv, p)
    del dq32
    args = (q, k, v, o, do, den, rowc, pad_t, whi, wlo, wg, g0, gz0, gk, dk32, dv32, dk, dv)
    consts = (p.H, L, p.split, p.n_split, p.hk2, p.kgrad, p.eps, lab)
    _launch("_causal_dkv_kernel", _causal_dkv_kernel, grid, *args, *consts, **slices)
    if p.atomic:
        dk, dv = dk32.to(k.dtype), dv32.to(v.dtype)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------- #
# entry points with autograd: an autograd.Function (eager), two registered ops (torch.compile)
# --------------------------------------------------------------------------------------------- #
_NS = "protein_lm"
_OP = "favor_triton"  # ops protein_lm::favor_triton_fwd / _bwd (names seen in compiled graphs and profiles)
_OPTS = "str kernel, bool causal, float eps, int tile, int? state_split, int? walk_split, int? slice_m, "
_OPTS += "str? logit_precision, bool deterministic"


def _plan(q: Tensor, projection: Tensor, opts: tuple) -> tuple[_Plan, str | None]:
    """The launch plan and the logit precision from the options tuple (order: ``_OPTS``)."""
    kernel, causal, eps, tile, state_split, walk_split, slice_m, precision, deterministic = opts
    plan = _Plan(q, projection, kernel, causal, eps, tile, state_split, walk_split, slice_m, deterministic)
    return plan, precision


def _bytes(pad: Tensor | None) -> Tensor | None:
    return None if pad is None else pad.view(torch.uint8)  # Triton loads the bool mask as bytes


def _output_grad(do: Tensor, o: Tensor, pad: Tensor | None, causal: bool, packed: bool = False) -> Tensor:
    """dO as the backward kernels take it (``packed``: the kernels zero dN of blind queries)."""
    if pad is not None and not packed:
        # Queries that see no real key (leading padding under a causal mask, or a row that is all
        # padding) have output 0 and, in exact arithmetic, zero gradient: their normaliser is 0,
        # floored at eps. Their dO / eps (up to 1e30 * dO) would otherwise amplify bf16 rounding
        # into garbage dk/dv (measured on an H100: 26-29% error with leading padding).
        do = do.masked_fill(_blind_queries(pad, causal)[:, None, :, None], 0)
    return do.to(o.dtype).contiguous()


class _FavorEager(torch.autograd.Function):
    """Eager path: the kernels without the op dispatcher, which costs more host time per call than
    the launches themselves (a Performer step is host-bound on a fast GPU)."""

    @staticmethod
    def forward(ctx, q, k, v, projection, pad, segment_ids, opts):  # type: ignore[override]
        p, precision = _plan(q, projection, opts)
        whi, wlo, wg, split_w = _weights(projection, q.dtype, p, precision)
        seg = None if segment_ids is None else _segment_layout(segment_ids, p.T)
        o, den, rowc, s0, z0, gk = _forward(q, k, v, _bytes(pad), whi, wlo, split_w, p, seg)
        ctx.save_for_backward(q, k, v, o, den, rowc, s0, z0, gk, whi, wlo, wg, pad, *(seg or (None, None)))
        ctx.plan, ctx.split_w = p, split_w
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, den, rowc, s0, z0, gk, whi, wlo, wg, pad, lab, tab = ctx.saved_tensors
        p = ctx.plan
        seg = None if lab is None else (lab, tab)
        do = _output_grad(do, o, pad, p.causal, packed=seg is not None)
        args = (q, k, v, o, do, den, rowc, _bytes(pad), whi, wlo, wg, ctx.split_w, s0, z0, gk, p, seg)
        dq, dk, dv = _backward(*args)
        return dq, dk, dv, None, None, None, None


# Under torch.compile the same kernels are two registered ops, opaque to Dynamo and Inductor, so a
# model compiles to one graph around them.
@torch.library.custom_op(
    f"{_NS}::{_OP}_fwd",
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor projection, Tensor? pad, Tensor? segment_ids, "
        f"{_OPTS}) -> Tensor[]"
    ),
)
def _forward_op(q, k, v, projection, pad, segment_ids, *opts):
    """``[o, den, rowc, s0, z0, gk, projection copy]`` and, for packed rows, ``lab, tab``: the output
    and what backward needs (``pad`` bool, True at padding; ``lab``, ``tab``: see
    ``_segment_layout``). The copy keeps backward right if the projection is redrawn in between
    (a copy made outside the op could be recomputed from the redrawn buffer by the partitioner)."""
    p, precision = _plan(q, projection, opts)
    whi, wlo, _, split_w = _weights(projection, q.dtype, p, precision)
    seg = None if segment_ids is None else _segment_layout(segment_ids, p.T)
    return [*_forward(q, k, v, _bytes(pad), whi, wlo, split_w, p, seg), projection.clone(), *(seg or ())]


@_forward_op.register_fake
def _forward_fake(
    q,
    k,
    v,
    projection,
    pad,
    segment_ids,
    kernel,
    causal,
    eps,
    tile,
    state_split,
    walk_split,
    slice_m,
    precision,
    deterministic,
):
    b, h, length, d = q.shape
    m = projection.shape[0]
    packed = segment_ids is not None
    f32 = dict(device=q.device, dtype=torch.float32)
    if causal:  # per-split states entering each split (float32); sizes may be symbolic in L
        slices = m // _slice_width(m, slice_m)
        n_split = _causal_splits(length, b * h, slices, tile, walk_split, deterministic, q.device)[1]
        s0, z0 = q.new_empty(b * h, n_split, m, d, **f32), q.new_empty(b * h, n_split, m, **f32)
    elif packed:  # one state slot per tile, S in the input dtype
        n_tiles = _cdiv(length, tile)
        s0, z0 = q.new_empty(b * h, n_tiles, m, d), q.new_empty(b * h, n_tiles, m, **f32)
    else:  # summed states, S in the input dtype
        s0, z0 = q.new_empty(b * h, m, d), q.new_empty(b * h, m, **f32)
    rows = q.new_empty(b * h, length, **f32)
    # key shifts: per row for packed softmax rows, else one per (batch, head)
    gk = q.new_empty(b * h, length, **f32) if packed and kernel == "softmax" else q.new_empty(b * h, **f32)
    out = [torch.empty_like(v), rows, torch.empty_like(rows), s0, z0, gk, torch.empty_like(projection)]
    if packed:  # labels and tile table
        i32 = dict(device=q.device, dtype=torch.int32)
        out += [q.new_empty(b, length, **i32), q.new_empty(b, _cdiv(length, tile), 4, **i32)]
    return out


@torch.library.custom_op(
    f"{_NS}::{_OP}_bwd",
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor o, Tensor do, Tensor den, Tensor rowc, Tensor s0, "
        "Tensor z0, Tensor gk, Tensor projection, Tensor? pad, Tensor? lab, Tensor? tab, "
        f"{_OPTS}) -> (Tensor, Tensor, Tensor)"
    ),
)
def _backward_op(q, k, v, o, do, den, rowc, s0, z0, gk, projection, pad, lab, tab, *opts):
    """``dq, dk, dv`` (recomputes the features; the weights are re-derived from the projection)."""
    p, precision = _plan(q, projection, opts)
    whi, wlo, wg, split_w = _weights(projection, q.dtype, p, precision)
    seg = None if lab is None else (lab, tab)
    return _backward(q, k, v, o, do, den, rowc, _bytes(pad), whi, wlo, wg, split_w, s0, z0, gk, p, seg)


@_backward_op.register_fake
def _backward_fake(q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _, pad = inputs[:5]
    o, den, rowc, s0, z0, gk, projection = output[:7]
    lab, tab = output[7:] if len(output) > 7 else (None, None)
    ctx.save_for_backward(q, k, v, o, den, rowc, s0, z0, gk, projection, pad, lab, tab)
    ctx.mark_non_differentiable(*output[1:])
    ctx.opts = inputs[6:]


def _op_backward(ctx, grads):
    q, k, v, o, den, rowc, s0, z0, gk, projection, pad, lab, tab = ctx.saved_tensors
    packed = lab is not None
    do = _output_grad(grads[0], o, pad, ctx.opts[1], packed)  # grads of the other outputs: unused
    args = (q, k, v, o, do, den, rowc, s0, z0, gk, projection, pad, lab, tab)
    dq, dk, dv = _backward_op(*args, *ctx.opts)
    return (dq, dk, dv) + (None,) * (len(ctx.opts) + 3)


# No double backward: the backward op has no autograd of its own.
_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def _blind_queries(pad: Tensor, causal: bool) -> Tensor:
    """``(B, L)`` bool: query positions with no real key to attend to (``pad`` bool, True at padding)."""
    real = ~pad
    visible = real.cumsum(dim=1) if causal else real.sum(dim=1, keepdim=True).expand_as(real)
    return visible == 0


def why_unsupported(
    q: Tensor, k: Tensor, v: Tensor, projection: Tensor, slice_m: int | None = None
) -> str | None:
    """Why the fused kernels cannot run these inputs (one line), or None when they can.

    The kernels cover self-attention (``q``, ``k``, ``v`` of one shape ``(B, H, L, D)``: no extra
    persistent-memory keys) with D a power of two >= 16 and M features in slices of 16, 32 or 64, on
    CUDA tensors (any device under ``TRITON_INTERPRET=1``, Triton's CPU interpreter).
    """
    d, m = q.shape[-1], projection.shape[0]
    if not q.shape == k.shape == v.shape:
        return f"q, k, v shapes differ ({tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})"
    if d < 16 or d & (d - 1):
        return f"head dim D={d} is not a power of two >= 16"
    if _slice_width(m, slice_m) is None:
        return f"num_features M={m}: no slice width in 16, 32, 64 divides it (slice_m={slice_m})"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"tensors on {q.device.type}, not CUDA"
    return None


def supported(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, slice_m: int | None = None) -> bool:
    """Whether :func:`favor_attention_triton` runs these inputs (see :func:`why_unsupported`)."""
    return why_unsupported(q, k, v, projection, slice_m) is None


def favor_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-30,
    segment_ids: Tensor | None = None,
    *,
    tile: int = DEFAULT_BLOCK,
    state_split: int | None = None,
    walk_split: int | None = None,
    slice_m: int | None = None,
    logit_precision: str | None = None,
    deterministic: bool | None = None,
) -> Tensor:
    """FAVOR+ attention through fused Triton kernels: ``(B, H, L, D) x3 -> (B, H, L, D)``.

    Matches :class:`protein_lm.attention.FavorAttention`'s PyTorch path (same features, shifts,
    ``max(normaliser, eps)``, padding rules) up to bf16 rounding, with autograd for ``q, k, v``
    (the projection is a buffer and gets no gradient).

    Args:
        q, k, v: ``(B, H, L, D)``, bf16, fp16 or fp32, on CUDA (or CPU under ``TRITON_INTERPRET=1``),
            one shape (self-attention), D a power of two >= 16.
        projection: ``(M, D)`` random projection; M a multiple of 16 (slices of 16, 32 or 64
            features, the widest that divides M).
        kernel: ``"softmax"`` or ``"relu"``.
        causal: prefix (unidirectional) attention.
        key_padding_mask: bool ``(B, L)``, True at padding.
        eps: floor of the normaliser.
        segment_ids: integer ``(B, L)`` for packed rows: query ``t`` sees only keys of its own
            segment (a maximal run of equal ids; ``s <= t`` when causal), softmax keys are shifted
            per segment. Every mode is supported (bidirectional / causal, softmax / ReLU,
            deterministic, eager and compiled); see docs/attention.md, "Packed sequences".
        tile: rows per tile, a power of two >= 16 (64; 16/32 for tiny tests).
        state_split: rows per program of the key-state and dq passes (bidirectional; tuning knob),
            a multiple of ``tile``.
        walk_split: rows per program of the output / dk, dv walks (causal: of every pass), a
            multiple of ``tile``.
        slice_m: features per slice, 16, 32 or 64 dividing M (default: the widest that does).
        logit_precision: the product ``x W^T`` that feeds ``exp``: ``"split"`` (two bf16 products,
            default for bf16), ``"bf16"`` (one, faster), ``"tf32"`` (default for float32 and fp16).
        deterministic: bitwise reproducible results (no atomics; slower, causal most). Default:
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``(B, H, L, D)`` in ``v``'s dtype.

    Raises:
        ValueError: inputs or options the kernels do not cover (:func:`why_unsupported`); there is
            no silent fallback, the caller (``FavorAttention``) picks the PyTorch path instead.
    """
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}")
    if logit_precision is not None and logit_precision not in LOGIT_PRECISIONS:
        raise ValueError(f"logit_precision must be one of {LOGIT_PRECISIONS}, got {logit_precision!r}")
    reason = why_unsupported(q, k, v, projection, slice_m)
    if reason is not None:
        raise ValueError(f"favor_attention_triton: {reason}")
    m = projection.shape[0]
    dtype = v.dtype
    cdt = torch.float32 if dtype == torch.float16 else dtype  # fp16 lacks exp range for features
    q, k, v = (t.to(cdt).contiguous() for t in (q, k, v))
    pad = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (q.shape[0], q.shape[2]):
            raise ValueError("key_padding_mask must be bool (B, L), True at padding")
        pad = key_padding_mask.contiguous()
    _check_options(m, tile, state_split, walk_split, slice_m)  # before tracing: one clear error
    if segment_ids is not None:
        shape = (q.shape[0], q.shape[2])
        if (
            segment_ids.shape != shape
            or segment_ids.dtype.is_floating_point
            or segment_ids.dtype == torch.bool
        ):
            raise ValueError(
                f"segment_ids must be an integer {shape} = (B, L) tensor, got {segment_ids.dtype} {tuple(segment_ids.shape)}"
            )
        segment_ids = segment_ids.to(q.device).contiguous()
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    opts = (
        kernel,
        causal,
        float(eps),
        tile,
        state_split,
        walk_split,
        slice_m,
        logit_precision,
        deterministic,
    )
    if torch.compiler.is_compiling():
        out = _forward_op(q, k, v, projection.detach(), pad, segment_ids, *opts)[0]
    else:
        out = _FavorEager.apply(q, k, v, projection.detach(), pad, segment_ids, opts)
    return out.to(dtype)
