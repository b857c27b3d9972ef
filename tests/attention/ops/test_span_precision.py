"""Static-span FAVOR+ (Performer) adaptive span at realistic sequence lengths and feature ranges.

Regression for the NaN of the H100 BID run (Performer-softmax + adaptive span, L = 1024): the old
linear-time path formed every window as a difference of prefix sums over the whole sequence
(``P(i) - P(i - s)``, with ``P1`` weighted by absolute positions). Softmax features carry one shared
key stabiliser per (batch, head), so a window's features can be 1e-30 of the sequence's largest; the
difference was then pure float32 rounding (errors of 1e3 in outputs bounded by max|v|, normalisers
of either sign) and training diverged. The reference here is the explicit float64 ``L x L`` masked
product of the same features.
"""

from __future__ import annotations

import pytest
import torch

from protein_lm.attention import FavorAttention
from protein_lm.attention.modules.span import AdaptiveSpan, AdaptiveSpanKernel
from protein_lm.attention.ops.features import draw_projection, softmax_features
from protein_lm.attention.ops.span import adaptive_span_linear_attention, span_mask


def _reference(pq, pk, v, z, ramp, causal, kpm=None):
    """``(A * mask) v / (A * mask) 1`` with all ``L x L`` feature products, float64."""
    length = pq.shape[2]
    i = torch.arange(length)
    dist = (i[:, None] - i[None, :]).abs().double()
    m = span_mask(dist, z.double()[:, None, None], ramp)[None]  # (1,H,L,L)
    if causal:
        m = m * torch.ones(length, length, dtype=torch.float64).tril()
    if kpm is not None:
        m = m * (~kpm)[:, None, None, :].double()
    a = (pq.double() @ pk.double().transpose(-1, -2)) * m
    return (a @ v.double()) / a.sum(-1, keepdim=True)


def _wide_features(length: int, scale: float, seed: int, b: int = 1, h: int = 4, d: int = 16, m: int = 64):
    """Softmax features of q, k with std ``scale`` (trained heads reach 2-3): key features span
    ~40 orders of magnitude under the shared key stabiliser."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, length, d, generator=g) * scale
    k = torch.randn(b, h, length, d, generator=g) * scale
    v = torch.randn(b, h, length, d, generator=g)
    proj = draw_projection(m, d, generator=torch.Generator().manual_seed(seed + 1))
    return q, k, v, proj


@pytest.mark.parametrize("causal", [False, True])
def test_static_span_wide_feature_range_matches_float64(causal):
    length = 640
    q, k, v, proj = _wide_features(length, 3.0, seed=11)
    kpm = torch.zeros(1, length, dtype=torch.bool)
    kpm[0, -37:] = True  # padding at the end, as in a batch of proteins
    pq = softmax_features(q, proj, is_query=True)
    pk = softmax_features(k, proj, is_query=False, key_padding_mask=kpm)
    assert pk[pk > 0].min() < 1e-30 * pk.max()  # the regime that broke the prefix-sum differences
    z = torch.tensor([0.0, 5.5, 100.25, length + 50.0])  # near 0, fractional, mid, beyond L
    out = adaptive_span_linear_attention(
        pq, pk, v, z, ramp=32.0, causal=causal, key_padding_mask=kpm, eps=1e-30
    )
    ref = _reference(pq, pk, v, z, 32.0, causal, kpm)
    real = ~kpm[:, None, :, None].expand_as(out)
    assert torch.isfinite(out).all()
    err = (out.double() - ref)[real].abs().max().item()
    assert err < 1e-4, err  # ~2e-6 here; differences of prefix sums give 2 to 6 (~1e3 at L = 1024)


def test_static_span_gradients_wide_feature_range():
    """Gradients w.r.t. q, k, v (through the softmax feature map) and the spans stay accurate."""
    length = 512
    q, k, v, proj = _wide_features(length, 2.5, seed=12)
    w = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(3))
    z0 = torch.tensor([3.5, 40.0, 200.75, 600.0])

    def run(dtype, fn):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in (q, k, v, z0)]
        qq, kk, vv, zz = leaves
        pq = softmax_features(qq, proj.to(dtype), is_query=True)
        pk = softmax_features(kk, proj.to(dtype), is_query=False)
        (fn(pq, pk, vv, zz) * w.to(dtype)).sum().backward()
        return [t.grad.double() for t in leaves]

    got = run(torch.float32, lambda a, b, c, s: adaptive_span_linear_attention(a, b, c, s, 32.0, eps=1e-30))
    want = run(torch.float64, lambda a, b, c, s: _reference(a, b, c, s, 32.0, False))
    for name, g, r in zip(("q", "k", "v", "z"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        rel = ((g - r).norm() / r.norm()).item()
        assert rel < 1e-4, (name, rel)  # new: ~1e-6; old: 1.3e-3 for q


def test_performer_span_kernel_bf16_autocast_long_sequence():
    """The model's kernel under bf16 autocast at L = 1024: finite, and equal to the float64 masked
    reference of its own features up to bf16 input rounding."""
    torch.manual_seed(13)
    b, h, length, d = 2, 2, 1024, 16
    favor = FavorAttention(d, num_features=64, kernel="softmax", causal=False, seed=0)
    kernel = AdaptiveSpanKernel(
        AdaptiveSpan(h, max_span=1024, ramp=32, init_span=8.0), causal=False, favor=favor
    )
    q, k, v = (torch.randn(b, h, length, d) * s for s in (3.0, 3.0, 1.0))
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, 700:] = True
    q.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernel(q, k, v, key_padding_mask=kpm)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(kernel.span.span_fraction.grad).all()
    with torch.no_grad():
        pq, pk, _ = kernel._features(q, k, kpm, None)
        ref = _reference(pq, pk, v, kernel.span.spans(), 32.0, False, kpm)
    real = ~kpm[:, None, :, None].expand_as(out)
    assert (out.double() - ref)[real].abs().max() < 0.05  # bf16 output rounding of |v| <= ~4
