"""Adaptive attention span: mask formula, trimmed exact attention, linear-time FAVOR+ span."""

from __future__ import annotations

import math

import pytest
import torch

from protein_lm.attention.modules.span import AdaptiveSpan
from protein_lm.attention.ops.span import (
    adaptive_span_exact_attention,
    adaptive_span_linear_attention,
    span_mask,
)
from protein_lm.model import collect_statistics


def _dist(length: int) -> torch.Tensor:
    i = torch.arange(length)
    return (i[:, None] - i[None, :]).abs().double()


def _ref_mask(length: int, z: torch.Tensor, ramp: float) -> torch.Tensor:
    """Independent mask: piecewise definition, ``(H, L, L)`` (or ``(B,H,L,L)`` for ``z (B,H,L)``)."""
    x = _dist(length)
    zz = z.double()[..., None] if z.dim() == 3 else z.double()[:, None, None]
    full = (x <= zz).double()
    ramp_part = ((x > zz) & (x < zz + ramp)).double() * (ramp + zz - x) / ramp
    return full + ramp_part


def _ref_exact(q, k, v, z, ramp, causal, kpm=None):
    """Untrimmed masked softmax attention, all L x L scores, float64."""
    b, h, length, d = q.shape
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    m = _ref_mask(length, z, ramp)
    if m.dim() == 3:
        m = m[None]
    if causal:
        m = m * torch.ones(length, length, dtype=torch.float64).tril()
    if kpm is not None:
        m = m * (~kpm)[:, None, None, :].double()
    e = torch.exp(s - s.amax(-1, keepdim=True)) * m
    return (e / e.sum(-1, keepdim=True)) @ v.double()


def _ref_linear(pq, pk, v, z, ramp, causal, kpm=None):
    a = pq.double() @ pk.double().transpose(-1, -2)  # (B,H,L,L)
    m = _ref_mask(pq.shape[2], z, ramp)[None]
    if causal:
        m = m * torch.ones(pq.shape[2], pq.shape[2], dtype=torch.float64).tril()
    if kpm is not None:
        m = m * (~kpm)[:, None, None, :].double()
    a = a * m
    return (a @ v.double()) / a.sum(-1, keepdim=True)


def test_span_mask_formula():
    x = torch.tensor([0.0, 5.0, 10.0, 10.5, 26.0, 41.9, 42.0, 50.0])
    m = span_mask(x, torch.tensor(10.0), 32.0)
    # 1 up to z = 10, then (R + z - x) / R, 0 from z + R = 42 on
    want = torch.tensor([1.0, 1.0, 1.0, 1 - 0.5 / 32, 1 - 16 / 32, 0.1 / 32, 0.0, 0.0])
    torch.testing.assert_close(m, want)
    # span 0: only the diagonal is fully visible
    assert span_mask(torch.tensor(0.0), torch.tensor(0.0), 4.0) == 1.0
    assert span_mask(torch.tensor(1.0), torch.tensor(0.0), 4.0) == 0.75


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [None, 7, 16])
def test_trimmed_equals_untrimmed(causal, block):
    torch.manual_seed(0)
    b, h, length, d = 2, 3, 53, 8
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64) for _ in range(3))
    z = torch.tensor([0.0, 3.3, 11.7], dtype=torch.float64)
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, -9:] = True
    out = adaptive_span_exact_attention(
        q, k, v, z, ramp=4.0, causal=causal, key_padding_mask=kpm, block_size=block
    )
    ref = _ref_exact(q, k, v, z, 4.0, causal, kpm)
    real = ~kpm
    torch.testing.assert_close(
        out[real[:, None, :, None].expand_as(out)], ref[real[:, None, :, None].expand_as(ref)]
    )


def test_trimmed_gradient_matches_reference():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 4, dtype=torch.float64) for _ in range(3))
    z1 = torch.tensor([2.5, 9.2], dtype=torch.float64, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    w = torch.randn(1, 2, 40, 4, dtype=torch.float64)
    (adaptive_span_exact_attention(q, k, v, z1, ramp=5.0, block_size=8) * w).sum().backward()
    (_ref_exact(q, k, v, z2, 5.0, False) * w).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    assert z1.grad.abs().min() > 0  # both heads' spans are learnable


def test_dynamic_spans_exact():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 30, 4, dtype=torch.float64) for _ in range(3))
    z = torch.rand(2, 2, 30, dtype=torch.float64) * 12
    for causal in (False, True):
        out = adaptive_span_exact_attention(q, k, v, z, ramp=3.0, causal=causal, block_size=8)
        torch.testing.assert_close(out, _ref_exact(q, k, v, z, 3.0, causal))


def test_trimming_shrinks_work():
    """The score tensor is banded: with short spans the exact backend never builds L x L."""
    q = k = v = torch.randn(1, 1, 4096, 8)
    seen = {}
    orig = torch.Tensor.unfold

    def spy(self, dim, size, step):
        seen["win"] = size
        return orig(self, dim, size, step)

    torch.Tensor.unfold = spy
    try:
        adaptive_span_exact_attention(q, k, v, torch.tensor([10.0]), ramp=8.0)
    finally:
        torch.Tensor.unfold = orig
    # reach w = ceil(8 + 10) - 1 = 17; block 64 -> window 64 + 2*17 = 98 keys per query block
    assert seen["win"] == 98


@pytest.mark.parametrize("causal", [False, True])
def test_linear_span_equals_masked_quadratic(causal):
    torch.manual_seed(3)
    b, h, length, m, d = 2, 4, 77, 16, 8
    pq = torch.rand(b, h, length, m, dtype=torch.float64) + 0.01
    pk = torch.rand(b, h, length, m, dtype=torch.float64) + 0.01
    v = torch.randn(b, h, length, d, dtype=torch.float64)
    z = torch.tensor([0.0, 2.6, 13.25, 90.0], dtype=torch.float64)  # fractional, and one > L
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[0, -5:] = True
    out = adaptive_span_linear_attention(
        pq, pk, v, z, ramp=6.0, causal=causal, key_padding_mask=kpm, chunk=16
    )
    ref = _ref_linear(pq, pk, v, z, 6.0, causal, kpm)
    real = ~kpm[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real])
    assert (out[~real] == 0).all()  # padded queries are zeroed (architecture.md: padding zeroed before use)


def test_linear_span_gradient_wrt_span():
    torch.manual_seed(4)
    pq = torch.rand(1, 2, 33, 8, dtype=torch.float64) + 0.01
    pk = torch.rand(1, 2, 33, 8, dtype=torch.float64) + 0.01
    v = torch.randn(1, 2, 33, 4, dtype=torch.float64)
    w = torch.randn(1, 2, 33, 4, dtype=torch.float64)
    for causal in (False, True):
        z1 = torch.tensor([1.4, 7.7], dtype=torch.float64, requires_grad=True)
        z2 = z1.detach().clone().requires_grad_(True)
        (adaptive_span_linear_attention(pq, pk, v, z1, ramp=4.0, causal=causal, chunk=8) * w).sum().backward()
        (_ref_linear(pq, pk, v, z2, 4.0, causal) * w).sum().backward()
        torch.testing.assert_close(z1.grad, z2.grad)


def test_linear_span_float32_long_sequence():
    """float32 at L = 2048: the position-weighted prefix sums stay accurate enough."""
    torch.manual_seed(5)
    pq = torch.rand(1, 2, 2048, 16) + 0.01
    pk = torch.rand(1, 2, 2048, 16) + 0.01
    v = torch.randn(1, 2, 2048, 8)
    z = torch.tensor([5.5, 200.0])
    out = adaptive_span_linear_attention(pq, pk, v, z, ramp=32.0, causal=True)
    ref = _ref_linear(pq, pk, v, z, 32.0, True)
    assert (out.double() - ref).abs().max() < 2e-3


def test_module_clamp_loss_and_no_decay():
    span = AdaptiveSpan(num_heads=4, max_span=100, ramp=8, init_span=20, loss_coef=0.01)
    torch.testing.assert_close(span.spans(), torch.full((4,), 20.0))
    with torch.no_grad():
        span.span_fraction.copy_(torch.tensor([-0.5, 0.1, 0.5, 1.7]))
    z = span.spans()  # clamps in place
    torch.testing.assert_close(z, torch.tensor([0.0, 10.0, 50.0, 100.0]))
    torch.testing.assert_close(span.aux_loss(), torch.tensor(0.01 * 160.0))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), span)
    no_decay = {n for n, p in model.named_parameters() if getattr(p, "optim_overrides", {}).get("weight_decay") == 0}
    assert no_decay == {"1.span_fraction"}
    stats = collect_statistics(model)
    assert stats == {"span/0/mean": 40.0, "span/0/max": 100.0, "span/mean": 40.0, "span/max": 100.0}


def test_dynamic_module():
    span = AdaptiveSpan(num_heads=2, max_span=64, ramp=4, init_span=16, dynamic=True, dim=8)
    x = torch.randn(3, 10, 8)
    z = span.spans(x)
    assert z.shape == (3, 2, 10)
    torch.testing.assert_close(z, torch.full_like(z, 16.0), atol=1e-3, rtol=0)
    q = k = v = torch.randn(3, 2, 10, 4)
    out = span.attend_exact(q, k, v, x=x, causal=True)
    assert out.shape == (3, 2, 10, 4)
    loss = span.aux_loss()
    loss.backward()
    assert span.span_predictor.bias.grad is not None


def test_linear_span_ignores_bf16_autocast():
    """Prefix sums with positions must stay float32 under autocast (they cancel in pairs)."""
    torch.manual_seed(6)
    pq = torch.rand(1, 2, 512, 16) + 0.01
    pk = torch.rand(1, 2, 512, 16) + 0.01
    v = torch.randn(1, 2, 512, 8)
    z = torch.tensor([3.5, 40.0])
    ref = adaptive_span_linear_attention(pq, pk, v, z, ramp=8.0, causal=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adaptive_span_linear_attention(pq, pk, v, z, ramp=8.0, causal=False)
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)


def _kernel(backend: str, causal: bool, memory_slots: int = 0):
    """An :class:`AdaptiveSpanKernel` as the model builds it (span 16 + ramp 16 = reach 32 < 100 pads)."""
    from protein_lm.attention import FavorAttention
    from protein_lm.attention.modules.memory import PersistentMemory
    from protein_lm.attention.modules.span import AdaptiveSpanKernel

    span = AdaptiveSpan(num_heads=2, max_span=128, ramp=16, init_span=16)
    favor = None
    if backend == "performer":
        favor = FavorAttention(8, num_features=32, causal=causal, backend="torch", seed=0)
    memory = PersistentMemory(2, 8, memory_slots) if memory_slots else None
    return AdaptiveSpanKernel(span, causal, favor=favor, memory=memory)


@pytest.mark.parametrize("memory_slots", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["performer", "exact"])
def test_span_kernel_invariant_to_long_padding(backend, causal, memory_slots):
    """100 trailing pads (>> span + ramp), filled with huge or inf values: real outputs are the unpadded
    ones, every output is finite, and gradients are finite (regression: Performer-span NaN)."""
    torch.manual_seed(7)
    kernel = _kernel(backend, causal, memory_slots)
    b, h, real, pad, d = 2, 2, 24, 100, 8
    q, k, v = (torch.randn(b, h, real, d) for _ in range(3))
    ref = kernel(q, k, v)  # no padding at all
    for fill in (0.0, 1e30, math.inf):
        qp, kp, vp = (
            torch.cat([x, torch.full((b, h, pad, d), fill)], dim=2).requires_grad_(True) for x in (q, k, v)
        )
        kpm = torch.zeros(b, real + pad, dtype=torch.bool)
        kpm[:, real:] = True
        out = kernel(qp, kp, vp, key_padding_mask=kpm)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, :, :real], ref, atol=1e-5, rtol=1e-4)
        (out[:, :, :real] ** 2).sum().backward()
        for x in (qp, kp, vp, kernel.span.span_fraction):
            assert torch.isfinite(x.grad).all()
        assert (qp.grad[:, :, real:] == 0).all() and (vp.grad[:, :, real:] == 0).all()
        kernel.zero_grad()


@pytest.mark.parametrize("causal", [False, True])
def test_linear_span_long_padding_float64(causal):
    """Kernel level: huge/inf features and values at 100 padded positions leave the real rows
    equal to the float64 reference on the real tokens only, and padded rows are exactly 0."""
    torch.manual_seed(8)
    b, h, real, pad, m, d = 2, 2, 20, 100, 8, 4
    pq = torch.rand(b, h, real + pad, m, dtype=torch.float64) + 0.01
    pk = torch.rand(b, h, real + pad, m, dtype=torch.float64) + 0.01
    v = torch.randn(b, h, real + pad, d, dtype=torch.float64)
    pk[:, :, real:] = 1e300
    v[:, :, real:] = math.inf
    pq[:, :, real:] = math.inf
    kpm = torch.zeros(b, real + pad, dtype=torch.bool)
    kpm[:, real:] = True
    z = torch.tensor([3.0, 7.5], dtype=torch.float64)
    out = adaptive_span_linear_attention(
        pq, pk, v, z, ramp=4.0, causal=causal, key_padding_mask=kpm, chunk=16
    )
    assert torch.isfinite(out).all() and (out[:, :, real:] == 0).all()
    ref = _ref_linear(pq[:, :, :real], pk[:, :, :real], v[:, :, :real], z, 4.0, causal)
    torch.testing.assert_close(out[:, :, :real], ref)
