"""Chunked causal linear attention: exactness, causality, gradients and O(L*(M+D)) saved memory."""

from __future__ import annotations

import pytest
import torch

from protein_lm.attention import FavorAttention
from protein_lm.attention.ops.causal import causal_linear_attention, causal_linear_reference


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("length", [1, 7, 16, 37])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("block_bytes", [1, None])
def test_chunked_equals_masked_quadratic(length, chunk, block_bytes):
    q, k = _rand(2, 3, length, 6, seed=1), _rand(2, 3, length, 6, seed=2)
    v = _rand(2, 3, length, 5, seed=3)
    out = causal_linear_attention(q, k, v, chunk=chunk, block_bytes=block_bytes)
    torch.testing.assert_close(out, causal_linear_reference(q, k, v), rtol=1e-10, atol=1e-10)


def test_reference_is_an_independent_loop():
    q, k, v = _rand(1, 1, 6, 3, seed=4), _rand(1, 1, 6, 3, seed=5), _rand(1, 1, 6, 2, seed=6)
    loop = torch.stack([sum((q[0, 0, t] @ k[0, 0, s]) * v[0, 0, s] for s in range(t + 1)) for t in range(6)])
    torch.testing.assert_close(causal_linear_reference(q, k, v)[0, 0], loop)


@pytest.mark.parametrize("block_bytes", [1, None])
def test_gradcheck_custom_function(block_bytes):
    q, k = _rand(1, 2, 9, 3, seed=7).requires_grad_(), _rand(1, 2, 9, 3, seed=8).requires_grad_()
    v = _rand(1, 2, 9, 2, seed=9).requires_grad_()
    fn = lambda a, b, c: causal_linear_attention(a, b, c, chunk=4, block_bytes=block_bytes)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradcheck_causal_favor(kernel):
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(1, 1, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    attn = FavorAttention(4, 8, kernel=kernel, causal=True, seed=0, chunk_size=3)
    mask = torch.tensor([[False] * 6 + [True]])
    args = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attn(a, b, c, key_padding_mask=mask), args)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causality(kernel, dtype):
    """Changing token t (query, key and value) never changes outputs before t."""
    length, t = 40, 23
    q, k, v = (_rand(2, 2, length, 8, seed=s, dtype=dtype) for s in (10, 11, 12))
    attn = FavorAttention(8, 16, kernel=kernel, causal=True, seed=0, chunk_size=8)
    base = attn(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    # a key 3x longer than the rest also becomes the shared key-shift maximum
    q2[:, :, t] *= -3
    k2[:, :, t] *= 3
    v2[:, :, t] += 10
    out = attn(q2, k2, v2)
    # The shared key shift is a common factor of numerator and normaliser, so earlier outputs can
    # move only by rounding: exact in float64 up to 1e-12, in float32 up to a few ulps.
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=tol, atol=tol)
    assert (out[:, :, t:] - base[:, :, t:]).abs().amax() > 1e-3


def test_saved_memory_is_linear_in_length():
    """Autograd keeps O(L*(M+D)) for causal FAVOR+: neither the L x M x D prefix sums nor chunk states."""
    b, h, length, d, m = 1, 2, 4096, 16, 64

    def saved_bytes(chunk: int) -> int:
        q, k, v = (_rand(b, h, length, d, seed=s, dtype=torch.float32).requires_grad_() for s in range(3))
        attn = FavorAttention(d, m, causal=True, seed=0, chunk_size=chunk)
        saved: dict[int, int] = {}

        def pack(t):
            saved[id(t)] = t.numel() * t.element_size()  # dedupe tensors saved by several ops
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = attn(q, k, v)
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        return sum(saved.values())

    small, large = saved_bytes(4), saved_bytes(256)
    assert small == large  # per-chunk states (L/C * M * D) would grow as the chunk shrinks
    per_token = b * h * (m + d + 1) * 4  # one token's features + value, float32
    assert small < 6 * length * per_token
    prefix_sums = b * h * length * m * (d + 1) * 4  # what naive implementations keep
    assert small < prefix_sums / 4


def test_chunk_size_does_not_change_result():
    q, k, v = (_rand(1, 2, 100, 8, seed=s, dtype=torch.float32) for s in (20, 21, 22))
    outs = [FavorAttention(8, 32, causal=True, seed=0, chunk_size=c)(q, k, v) for c in (1, 7, 64, 256)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [16, 64])
def test_early_positions_exact_despite_global_key_shift(d):
    """Unit-variance q, k: after the shared key shift, early causal normalisers are ~1e-12.

    A normaliser floor of 1e-6 (or an additive eps) shrank the first outputs towards 0 (87% error at
    t=0); the floor must only guard against 0/0. Reference: float64, unshifted features.
    """
    length = 512
    q, k, v = (_rand(1, 2, length, d, seed=s, dtype=torch.float32) for s in (30, 31, 32))
    attn = FavorAttention(d, 256, causal=True, seed=0)
    out = attn(q.requires_grad_(), k, v)
    w = attn.projection.double()
    qs, ks = q.detach().double() * d**-0.25, k.double() * d**-0.25
    pq = torch.exp(qs @ w.T - 0.5 * qs.square().sum(-1, keepdim=True))
    pk = torch.exp(ks @ w.T - 0.5 * ks.square().sum(-1, keepdim=True))
    a = (pq @ pk.transpose(-1, -2)).tril()
    ref = (a @ v.double()) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # position 0 attends only to itself
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("kernel", ["relu", "softmax"])
def test_leading_padding_gradients_match_explicit_quadratic(kernel):
    """Queries that see no real key (leading padding) have normaliser 0, floored at eps, so their
    dN = dO / eps is huge. Those rows must not leak into other rows' gradients: the chunk states
    once came from ``inclusive - own chunk``, which cancelled catastrophically (20-50% error in
    dK, dV of the first chunk). Checked against the explicit masked quadratic formula in float64
    with several chunks, so the carried states are exercised."""
    from protein_lm.attention.ops.favor import favor_causal, favor_features
    from protein_lm.attention.ops.features import draw_projection

    g = torch.Generator().manual_seed(3)
    b, h, length, d, m = 2, 2, 70, 8, 16
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    proj = draw_projection(m, d, generator=g).double()
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, :5] = True  # queries 0..4 of sequence 1 see only padding
    grad = torch.randn(b, h, length, d, generator=g, dtype=torch.float64)

    def grads(fn):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        out.backward(grad)
        return out.detach(), [t.grad for t in ins]

    def chunked(q_, k_, v_):
        pq, pk = favor_features(q_, k_, proj, kernel, pad)
        return favor_causal(pq, pk, v_, pad, 1e-30, chunk_size=16)

    def explicit(q_, k_, v_):
        pq, pk = favor_features(q_, k_, proj, kernel, pad)
        pk = pk.masked_fill(pad[:, None, :, None], 0.0)
        a = (pq @ pk.transpose(-1, -2)).tril()  # (B, H, L, L)
        vz = v_.masked_fill(pad[:, None, :, None], 0.0)
        return (a @ vz) / a.sum(-1, keepdim=True).clamp_min(1e-30)

    out, got = grads(chunked)
    ref_out, want = grads(explicit)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-12)
    for name, a, r in zip("qkv", got, want, strict=True):
        err = ((a - r).norm() / r.norm()).item()
        assert err < 1e-9, (name, err)
