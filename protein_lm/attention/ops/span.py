"""Adaptive attention span (Sukhbaatar et al., ACL 2019, arXiv 1905.07799): the masked attention ops,
exact and FAVOR+.

Each head ``h`` learns a span ``z_h`` in ``[0, S]``; the weight of a key at distance ``x = |i - j|``
from its query is multiplied by the soft mask::

    m_z(x) = clamp((R + z - x) / R, 0, 1)          # 1 up to z, linear ramp of width R, then 0

and the masked weights are renormalised, ``a_ij = m(x_ij) k(q_i, k_j) / sum_j' m(x_ij') k(q_i, k_j')``.
An L1 penalty ``lambda * sum_h z_h`` (the auxiliary loss) pushes spans down, so each head keeps only
the context it pays for. Bidirectional models use ``x = |i - j|`` (a symmetric window).

Two backends, both exact for the same mask:

* :func:`adaptive_span_exact_attention` -- softmax attention computed block by block over a band:
  keys farther than the largest current reach ``w = ceil(R + max z) - 1`` are never touched, so
  compute and memory scale with ``L * w`` instead of ``L^2`` ("trimming").
* :func:`adaptive_span_linear_attention` -- FAVOR+ (any positive feature map) in linear time. With
  one span per head, the mask is exactly 1 for distances below ``z`` and non-trivial only on a
  ramp of ``R`` tokens. In chunks of ``C`` tokens, every key chunk lying wholly inside the flat part
  of a query chunk's window enters through its ``M x (D+1)`` state ``phi_k^T [v, 1]`` (a banded
  sum of chunk states), and the few chunk pairs that straddle the window's edge or ramp are exact
  masked ``C x C`` blocks (see :func:`_span_numerator`). Every term is non-negative in the
  normaliser: no window is ever formed as a difference of prefix sums over the whole sequence,
  which cancelled catastrophically (and diverged training to NaN) once a window held features far
  below the sequence's largest.
  Dynamic (per-query) spans have per-query windows, so the shared chunk states no longer serve
  every query; :func:`adaptive_span_linear_attention` then takes the banded route of the exact
  backend with feature products ``phi_q . phi_k`` as scores: ``O(L * (Bq + 2w) * (M + D))``, linear
  in ``L`` for a fixed largest span (see :func:`_span_linear_dynamic`).

The learned spans and the kernel module that applies them are in
:mod:`protein_lm.attention.modules.span`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .masks import zero_padded

__all__ = ["span_mask", "adaptive_span_exact_attention", "adaptive_span_linear_attention", "DEFAULT_RAMP"]

DEFAULT_RAMP = 32


def span_mask(distance: Tensor, span: Tensor, ramp: float) -> Tensor:
    """The soft mask ``m_z(x) = clamp((R + z - x) / R, 0, 1)``.

    Args:
        distance: non-negative distances ``x`` (any shape, broadcast against ``span``).
        span: spans ``z`` in tokens (differentiable).
        ramp: ramp width ``R`` (> 0).

    Returns:
        mask values in ``[0, 1]``, the broadcast shape of ``distance`` and ``span``.
    """
    return ((ramp + span - distance) / ramp).clamp(0.0, 1.0)


def _reach(spans: Tensor, ramp: float, length: int) -> int:
    """Largest distance with a non-zero mask: ``m(x) > 0  <=>  x < R + z``."""
    zmax = float(spans.detach().max()) if spans.numel() else 0.0
    return max(0, min(length - 1, math.ceil(ramp + zmax) - 1))


class _Band(NamedTuple):
    """Geometry of the banded (windowed) computation shared by the exact and dynamic-linear paths.

    Queries are cut into ``nb`` blocks of ``bq`` tokens (the last one padded by ``tail``); block
    ``b`` meets the ``win = left + bq + right`` keys ``[b*bq - left, (b+1)*bq + right)``.
    """

    bq: int
    left: int
    right: int
    nb: int
    win: int
    tail: int

    @staticmethod
    def make(length: int, reach: int, causal: bool, block_size: int | None) -> _Band:
        """Band for keys up to ``reach`` tokens away (causal: on the left only)."""
        bq = max(1, block_size or max(64, reach))
        left, right = reach, (0 if causal else reach)
        if bq + left + right >= length:  # a band as wide as the sequence: one block, no padding
            bq, left, right = length, 0, 0
        nb = math.ceil(length / bq)
        return _Band(bq, left, right, nb, bq + left + right, nb * bq - length)

    def windows(self, x: Tensor) -> Tensor:
        """Keys / values per query block: ``(B,H,L,F) -> (B,H,nb,F,win)`` (zeros outside ``[0, L)``)."""
        return F.pad(x, (0, 0, self.left, self.tail + self.right)).unfold(2, self.win, self.bq)

    def queries(self, x: Tensor) -> Tensor:
        """Query blocks: ``(B,H,L,F) -> (B,H,nb,Bq,F)``."""
        b, h, _, f = x.shape
        return F.pad(x, (0, 0, 0, self.tail)).reshape(b, h, self.nb, self.bq, f)

    def offsets(self, device: torch.device) -> Tensor:
        """``i - j`` for every (query row, window column) of a block: ``(Bq, win)`` long."""
        rows = torch.arange(self.bq, device=device)[:, None] + self.left
        return rows - torch.arange(self.win, device=device)[None, :]


def adaptive_span_exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spans: Tensor,
    ramp: float = DEFAULT_RAMP,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    memory_k: Tensor | None = None,
    memory_v: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Softmax attention with the adaptive-span mask, skipping keys beyond the largest reach.

    Queries are processed in blocks of ``Bq`` tokens; block ``b`` sees only the keys
    ``[b*Bq - w, (b+1)*Bq + w)`` (causal: ``[b*Bq - w, (b+1)*Bq)``) where ``w`` is the largest
    distance any head can currently attend to, so the score tensor is ``(B, H, L/Bq, Bq, Bq + 2w)``
    rather than ``(B, H, L, L)``.

    Args:
        q, k, v: ``(B, H, L, D)``; scores use scale ``1/sqrt(D)``.
        spans: ``(H,)`` per-head spans in tokens, or ``(B, H, L)`` per-query (dynamic) spans.
        ramp: ramp width ``R``.
        causal: keys ``j <= i`` only.
        key_padding_mask: bool ``(B, L)``, True at padding.
        memory_k, memory_v: optional persistent memory ``(H, N, D)``; every query sees all ``N``
            slots with mask 1 (no position, no span, no padding), in the same softmax.
        block_size: query block size (default ``max(64, w)``; one block of ``L`` when the band
            ``Bq + 2w`` would cover the whole sequence anyway).

    Returns:
        ``(B, H, L, D)`` in ``v.dtype``.
    """
    b, h, length, d = q.shape
    if key_padding_mask is not None:
        # Zero padded q/k/v first: masking scores alone leaves 0 * inf = NaN in the value product
        # and in the backward of ``q @ k^T`` (grad_q = grad_s @ k), which would reach real rows.
        q, k, v = (zero_padded(x, key_padding_mask) for x in (q, k, v))
    band = _Band.make(length, _reach(spans, ramp, length), causal, block_size)
    bq, nb, tail = band.bq, band.nb, band.tail
    windows = band.windows

    ct = torch.promote_types(q.dtype, torch.float32)  # softmax in >= float32, also under autocast
    qb = band.queries(q)  # (B,H,nb,Bq,D)
    scores = (qb @ windows(k)).to(ct) * d**-0.5  # (B,H,nb,Bq,win)

    dev = q.device
    rel = band.offsets(dev)  # (Bq,win): i - j
    dist = rel.abs().to(ct)
    if spans.dim() == 1:  # static: (H,) -> (1,H,1,Bq,win)
        mask = span_mask(dist, spans.to(ct)[:, None, None], ramp)[None, :, None]
    else:  # dynamic: (B,H,L) -> (B,H,nb,Bq,1) -> (B,H,nb,Bq,win)
        zq = F.pad(spans.to(ct), (0, tail)).reshape(b, h, nb, bq, 1)
        mask = span_mask(dist, zq, ramp)
    valid = torch.ones(b, length, dtype=torch.bool, device=dev)
    if key_padding_mask is not None:
        valid = ~key_padding_mask.to(torch.bool)
    valid = F.pad(valid, (band.left, tail + band.right), value=False).unfold(1, band.win, bq)  # (B,nb,win)
    keep = valid[:, None, :, None, :] & (mask > 0)
    if causal:
        keep = keep & (rel >= 0)
    scores = scores.masked_fill(~keep, -math.inf)

    if memory_k is not None and memory_k.shape[1] > 0:
        mem_scores = torch.einsum("bhnqd,hmd->bhnqm", qb, memory_k.to(q.dtype)).to(ct) * d**-0.5
        shift = torch.maximum(scores.amax(-1, keepdim=True), mem_scores.amax(-1, keepdim=True)).detach()
        e_ctx = torch.exp(scores - shift) * mask
        e_mem = torch.exp(mem_scores - shift)
        denom = e_ctx.sum(-1, keepdim=True) + e_mem.sum(-1, keepdim=True)
        out = (e_ctx / denom).to(v.dtype) @ windows(v).transpose(-1, -2)
        out = out + torch.einsum("bhnqm,hmd->bhnqd", (e_mem / denom).to(v.dtype), memory_v.to(v.dtype))
    else:
        shift = scores.amax(-1, keepdim=True).detach()
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        e_ctx = torch.exp(scores - shift) * mask  # masked keys: exp(-inf) = 0
        denom = e_ctx.sum(-1, keepdim=True).clamp_min(1e-30)  # rows with no key (padded query) -> 0
        out = (e_ctx / denom).to(v.dtype) @ windows(v).transpose(-1, -2)
    return out.reshape(b, h, nb * bq, d)[:, :, :length]


def _span_numerator(
    phi_q: Tensor, phi_k: Tensor, u: Tensor, spans: Tensor, ramp: float, causal: bool, chunk: int
) -> Tensor:
    """``N_i = sum_j m_z(|i - j|) (phi_q_i . phi_k_j) u_j`` (static spans) in linear time; ``-> (B, H, L, E)``.

    Every term is a product of non-negative features with the mask, so the normaliser column is a
    sum of non-negative numbers: nothing is ever obtained by differencing sums that contain keys
    outside the window (the earlier ``P(i) - P(i - s)`` form cancelled catastrophically whenever the
    window held features many orders of magnitude below the sequence's largest -- normal for the
    softmax features' shared key stabiliser -- and produced garbage or sign-flipped normalisers).

    Chunks of ``C`` tokens; query chunk ``c`` meets key chunk ``c - d``. Per head, with
    ``F = ceil(z) // C - 1``, every pair in a chunk offset ``|d| <= F`` lies at distance
    ``<= F*C + C - 1 < z`` (mask exactly 1, no gradient): those offsets are served by per-chunk
    states ``S_k = phi_k[k]^T u[k]`` (``M x E``) summed over the band ``|c - k| <= F`` -- a banded
    0/1 ``(n x n)`` matrix times the states, sums of non-negative terms, ``n^2 M E`` flops
    (``<= L M E`` while ``n^2 <= L``). The remaining offsets ``F < |d| <= ceil(reach / C)`` (about
    ``(R + 2C) / C`` per side) hold the ramp and the window's edge: each is an exact ``C x C`` block
    ``(phi_q phi_k^T * mask) u`` with the mask from :func:`span_mask` (so gradients reach ``z``).
    Causal: ``d >= 0`` and the diagonal block ``d = 0`` is always a masked block. Cost
    ``O(L (M E + P C (M + E)) + n^2 M E)`` time, ``O(L (M + E + P C) + n M E)`` memory, with
    ``P`` the number of masked offsets; all views, no per-head copies of the features.
    """
    b, h, length, m = phi_q.shape
    e = u.shape[-1]
    dt = phi_q.dtype
    c = max(1, min(chunk, length))
    n = math.ceil(length / c)
    pad = n * c - length
    if pad:  # zero keys add nothing; padded queries are sliced off
        phi_q, phi_k, u = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, u))
    qc = phi_q.reshape(b, h, n, c, m)
    kc = phi_k.reshape(b, h, n, c, m)
    uc = u.reshape(b, h, n, c, e)
    zd = spans.detach()
    full = (torch.ceil(zd).long() // c - 1).clamp(-1, n - 1)  # (H,) F: offsets with mask 1 throughout
    reach = (torch.ceil(zd + ramp) - 1).clamp_min(0).long()  # largest distance with a non-zero mask
    far = ((reach + c - 1) // c).clamp(max=n - 1)  # (H,) last offset with a non-zero mask
    full_l, far_l = full.tolist(), far.tolist()  # one host sync per layer
    lo = 1 if causal else 0  # causal: the diagonal block is never "full" (it holds future keys)

    if max(full_l) >= lo:
        states = (kc.transpose(-1, -2) @ uc).reshape(b, h, n, m * e)  # (B,H,n,M*E)
        idx = torch.arange(n, device=phi_q.device)
        rel = idx[:, None] - idx[None, :]  # (n,n): c - k
        dist = rel if causal else rel.abs()
        band = (dist >= lo) & (dist <= full[:, None, None])  # (H,n,n)
        if causal:
            band = band & (rel >= 0)
        win = band.to(dt) @ states  # (B,H,n,M*E): windowed sums of non-negative states
        out = qc @ win.reshape(b, h, n, m, e)  # (B,H,n,C,E)
    else:
        out = qc.new_zeros(b, h, n, c, e)

    # Masked blocks per head: (offset d, left?) with d in (F, far] (and the diagonal, causal).
    r = torch.arange(c, device=phi_q.device, dtype=dt)
    within = r[:, None] - r[None, :]  # (C,C): query offset - key offset inside a chunk
    blocks: list[list[tuple[int, bool]]] = []
    for hh in range(h):
        offsets = ([0] if causal and full_l[hh] >= 0 else []) + list(range(full_l[hh] + 1, far_l[hh] + 1))
        # (d, left): the diagonal block d = 0 is one block (both sides) in bidirectional attention
        sides = [(True,) if causal or d == 0 else (True, False) for d in offsets]
        blocks.append([(d, left) for d, ss in zip(offsets, sides, strict=True) for left in ss])
    k_max = max(len(bl) for bl in blocks)
    if k_max:
        # left: distance i - j = d*C + (r - t); right: j - i = d*C - (r - t); bidirectional
        # diagonal block: |r - t|. Negative distances (future keys of a causal diagonal block, and
        # the unused slots of heads with fewer blocks, set to -1) get mask 0.
        x = torch.full((h, k_max, c, c), -1.0, dtype=dt, device=phi_q.device)
        for hh, bl in enumerate(blocks):
            for j, (d, left) in enumerate(bl):
                if d == 0 and not causal:
                    x[hh, j] = within.abs()
                else:
                    x[hh, j] = d * c + within if left else d * c - within
        masks = span_mask(x, spans.to(dt)[:, None, None, None], ramp) * (x >= 0).to(dt)  # (H,K,C,C)
        out = out + _SpanBlocks.apply(qc, kc, uc, masks, blocks)
    num = out.reshape(b, h, n * c, e)
    return num[:, :, :length] if pad else num


class _SpanBlocks(torch.autograd.Function):
    """The masked ``C x C`` blocks of :func:`_span_numerator`, with a hand-written backward.

    Per head ``h`` and block ``(d, side)`` in ``blocks[h]``: query chunk ``c`` meets key chunk ``c - d``
    (left) or ``c + d`` (right) with the ``(C, C)`` mask ``masks[h, j]``. Autograd through per-head,
    per-offset slices would allocate a zero gradient of the full ``(B, H, n, C, M)`` input for every
    slice (measured: half the run time); here the gradients are accumulated in place, and only the
    inputs are saved (the ``C x C`` scores are recomputed in backward).
    """

    @staticmethod
    def forward(ctx, qc: Tensor, kc: Tensor, uc: Tensor, masks: Tensor, blocks: list) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(qc, kc, uc, masks)
        ctx.blocks = blocks
        n = qc.shape[2]
        out = uc.new_zeros(uc.shape)  # (B,H,n,C,E)
        for hh, head_blocks in enumerate(blocks):
            for j, (d, left) in enumerate(head_blocks):
                qs, ks = (slice(d, n), slice(0, n - d)) if left else (slice(0, n - d), slice(d, n))
                a = (qc[:, hh, qs] @ kc[:, hh, ks].transpose(-1, -2)).mul_(masks[hh, j])  # (B,n-d,C,C)
                out[:, hh, qs] += a @ uc[:, hh, ks]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        qc, kc, uc, masks = ctx.saved_tensors
        n = qc.shape[2]
        dq, dk, du, dm = (torch.zeros_like(t) for t in (qc, kc, uc, masks))
        for hh, head_blocks in enumerate(ctx.blocks):
            for j, (d, left) in enumerate(head_blocks):
                qs, ks = (slice(d, n), slice(0, n - d)) if left else (slice(0, n - d), slice(d, n))
                q, k, u, gs = qc[:, hh, qs], kc[:, hh, ks], uc[:, hh, ks], g[:, hh, qs]
                mask = masks[hh, j]
                s = q @ k.transpose(-1, -2)  # (B,n-d,C,C)
                du[:, hh, ks] += (s * mask).transpose(-1, -2) @ gs
                ga = gs @ u.transpose(-1, -2)  # d loss / d (s * mask)
                dm[hh, j] = (ga * s).sum(dim=(0, 1))
                ga.mul_(mask)
                dq[:, hh, qs] += ga @ k
                dk[:, hh, ks] += ga.transpose(-1, -2) @ q
        return dq, dk, du, dm, None


def adaptive_span_linear_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    spans: Tensor,
    ramp: float = DEFAULT_RAMP,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    memory_phi_k: Tensor | None = None,
    memory_v: Tensor | None = None,
    eps: float = 1e-6,
    chunk: int = 64,
    block_size: int | None = None,
) -> Tensor:
    """FAVOR+ attention with the adaptive-span mask (exact for the given features), linear in ``L``.

    Computes ``out_i = sum_j m(|i-j|) A_ij v_j / sum_j m(|i-j|) A_ij`` with ``A_ij = phi_q_i . phi_k_j``
    (plus unmasked persistent-memory slots, if given) without forming the ``L x L`` matrix ``A``.

    * Static spans ``(H,)``: banded chunk states plus masked ``C x C`` edge blocks (see
      :func:`_span_numerator`): ``O(L (M + D + P C) + (L/C) M D)`` memory, ``O(L M D + L P C (M + D)
      + (L/C)^2 M D)`` time with ``P ~ 2 + R / C`` edge blocks per side -- linear in ``L`` for
      ``L <= C^2``, and independent of the span.
    * Dynamic spans ``(B, H, L)`` (one span per query): banded, see :func:`_span_linear_dynamic`;
      ``O(L (Bq + 2w) (M + D))`` time and ``O(L (Bq + 2w))`` memory with ``w = ceil(R + max z) - 1``.

    Args:
        phi_q, phi_k: ``(B, H, L, M)`` positive features (e.g. from ``softmax_features``).
        v: ``(B, H, L, D)``.
        spans: ``(H,)`` per-head spans or ``(B, H, L)`` per-query spans, in tokens (fractional allowed).
        ramp: ramp width ``R``.
        causal: keys ``j <= i`` only; otherwise the window is symmetric in ``|i - j|``.
        key_padding_mask: bool ``(B, L)``, True at padding (those keys' features and values are
            zeroed before use; padded queries get output 0).
        memory_phi_k: optional ``(B or 1, H, N, M)`` features of persistent-memory keys (computed
            with the same stabiliser as ``phi_k``); ``memory_v``: ``(H, N, D)``. Visible to every
            query with mask 1.
        eps: queries whose normaliser is ``<= eps`` see no real key and get output 0.
        chunk: chunk size ``C`` of the static-span path.
        block_size: query block size of the banded path (dynamic spans; default ``max(64, w)``).

    Returns:
        ``(B, H, L, D)`` in ``v.dtype``. Both paths sum only non-negative terms into the normaliser
        (no cancellation; float32 accuracy whatever the features' dynamic range).
    """
    if spans.dim() not in (1, 3):
        raise ValueError(f"spans must be (H,) or (B, H, L), got shape {tuple(spans.shape)}")
    # Features span many orders of magnitude: keep the sums in >= float32 (no bf16 under autocast).
    with torch.autocast(device_type=phi_q.device.type, enabled=False):
        if spans.dim() == 3:
            return _span_linear_dynamic(
                phi_q,
                phi_k,
                v,
                spans,
                ramp,
                causal,
                key_padding_mask,
                memory_phi_k,
                memory_v,
                eps,
                block_size,
            )
        return _span_linear(
            phi_q, phi_k, v, spans, ramp, causal, key_padding_mask, memory_phi_k, memory_v, eps, chunk
        )


def _with_ones(v: Tensor, dt: torch.dtype) -> Tensor:
    """``u = [v, 1]``: the extra column carries the normaliser through the same sums. ``(..., D+1)``."""
    return torch.cat([v.to(dt), torch.ones_like(v[..., :1], dtype=dt)], dim=-1)


def _finish(
    num: Tensor, phi_q: Tensor, memory_phi_k: Tensor | None, memory_v: Tensor | None, eps: float
) -> Tensor:
    """Add the persistent-memory slots (mask 1) to ``num = [numerator, normaliser]`` and divide."""
    if memory_phi_k is not None and memory_phi_k.shape[2] > 0:
        mu = _with_ones(memory_v, num.dtype)  # (H,N,D+1)
        state = torch.einsum("bhnm,hne->bhme", memory_phi_k.to(num.dtype), mu)  # (B|1,H,M,D+1)
        num = num + phi_q @ state
    den = num[..., -1:]  # (B,H,L,1)
    # Above eps: the exact ratio (as FAVOR+). At or below eps the query sees no real key (padded
    # query, or all visible keys padded, or features that underflowed); its numerator is then 0 or
    # as tiny, and dividing it by eps would blow it up: output 0. The clamp keeps the unused branch
    # finite, so torch.where's backward stays NaN-free.
    return torch.where(den > eps, num[..., :-1] / den.clamp_min(eps), torch.zeros_like(num[..., :-1]))


def _span_linear(phi_q, phi_k, v, spans, ramp, causal, key_padding_mask, memory_phi_k, memory_v, eps, chunk):
    """Static-span body of :func:`adaptive_span_linear_attention` (autocast disabled)."""
    dt = torch.promote_types(phi_q.dtype, torch.float32)
    spans = spans.to(dt)
    u = _with_ones(v, dt)  # (B,H,L,D+1)
    # Padded keys must contribute exactly 0 to every chunk state and block: zero their features AND
    # their values / normaliser column. Otherwise one inf/NaN value at a padded key turns into
    # 0 * inf = NaN in a shared chunk state and poisons the real queries that see it. Padded queries
    # are zeroed too: they then see nothing and get output 0 below (not 0 / eps).
    phi_q = zero_padded(phi_q.to(dt), key_padding_mask)
    phi_k = zero_padded(phi_k.to(dt), key_padding_mask)
    u = zero_padded(u, key_padding_mask)
    num = _span_numerator(phi_q, phi_k, u, spans, ramp, causal, chunk)
    return _finish(num, phi_q, memory_phi_k, memory_v, eps).to(v.dtype)


def _span_linear_dynamic(
    phi_q, phi_k, v, spans, ramp, causal, key_padding_mask, memory_phi_k, memory_v, eps, block_size
):
    """Per-query (dynamic) spans ``z_i`` on positive features, banded (autocast disabled).

    Why not the static path's chunk states: with one span per query, the chunks wholly inside a
    query chunk's window differ from query to query, so each query would need its own
    ``M x (D+1)`` window state -- ``O(L M D)`` memory.
    Instead, as in :func:`adaptive_span_exact_attention`, every query block of ``Bq`` tokens meets
    only the keys within the largest reach ``w = ceil(R + max z) - 1 <= ceil(R + S) - 1``; inside the
    band the scores are the feature products ``A_ij = phi_q_i . phi_k_j >= 0`` times the query's own
    mask ``m_{z_i}(|i - j|)``, summed against ``u = [v, 1]`` (numerator and normaliser together).
    Cost ``O(L (Bq + 2w) (M + D + 1))`` time and ``O(L (Bq + 2w))`` memory for the scores (causal:
    ``Bq + w``): linear in ``L`` for a fixed max span ``S``, like the trimmed exact backend (with
    ``M`` in place of ``D`` for the scores). Same contract as the static path: padded keys and
    queries zeroed first, memory slots with mask 1 in the normaliser, ``eps`` floor with output 0.
    Gradients reach ``z`` (and so the span predictor) through the mask's ramp.
    """
    dt = torch.promote_types(phi_q.dtype, torch.float32)
    b, h, length, _ = phi_q.shape
    phi_q = zero_padded(phi_q.to(dt), key_padding_mask)
    phi_k = zero_padded(phi_k.to(dt), key_padding_mask)
    u = zero_padded(_with_ones(v, dt), key_padding_mask)  # (B,H,L,D+1)
    spans = spans.to(dt)
    if key_padding_mask is not None:  # padded queries output 0 anyway: keep them from widening the band
        spans = spans.masked_fill(key_padding_mask.to(torch.bool)[:, None, :], 0.0)
    band = _Band.make(length, _reach(spans, ramp, length), causal, block_size)
    a = band.queries(phi_q) @ band.windows(phi_k)  # (B,H,nb,Bq,win); keys outside [0, L) are 0
    rel = band.offsets(phi_q.device)  # (Bq,win): i - j
    zq = F.pad(spans, (0, band.tail)).reshape(b, h, band.nb, band.bq, 1)
    mask = span_mask(rel.abs().to(dt), zq, ramp)  # (B,H,nb,Bq,win)
    if causal:
        mask = mask * (rel >= 0).to(dt)
    num = (a * mask) @ band.windows(u).transpose(-1, -2)  # (B,H,nb,Bq,D+1)
    num = num.reshape(b, h, band.nb * band.bq, -1)[:, :, :length]
    return _finish(num, phi_q, memory_phi_k, memory_v, eps).to(v.dtype)
