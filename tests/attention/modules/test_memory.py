"""Persistent memory (all-attention): N = 0 is the base layer, one softmax / normaliser over both."""

from __future__ import annotations

import math

import pytest
import torch

from protein_lm.attention import FavorAttention, exact_attention, softmax_features
from protein_lm.attention.modules.memory import PersistentMemory, persistent_favor_attention
from protein_lm.attention.ops.memory import persistent_attention_probs, persistent_exact_attention
from protein_lm.attention.ops.span import adaptive_span_exact_attention, adaptive_span_linear_attention


def _qkv(b=2, h=3, length=19, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3))


def _kpm(b=2, length=19):
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, -6:] = True
    return kpm


@pytest.mark.parametrize("causal", [False, True])
def test_zero_slots_equals_base_exact(causal):
    q, k, v = _qkv()
    mem = PersistentMemory(3, 8, 0).double()
    mk, mv = mem()
    kpm = _kpm()
    out = persistent_exact_attention(q, k, v, mk, mv, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, exact_attention(q, k, v, causal=causal, key_padding_mask=kpm))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_zero_slots_equals_base_favor(causal, kernel):
    q, k, v = _qkv(dtype=torch.float32)
    favor = FavorAttention(8, num_features=32, kernel=kernel, causal=causal, seed=0, backend="torch")
    mem = PersistentMemory(3, 8, 0)
    out = persistent_favor_attention(favor, q, k, v, *mem(), key_padding_mask=_kpm())
    torch.testing.assert_close(out, favor(q, k, v, key_padding_mask=_kpm()))


@pytest.mark.parametrize("causal", [False, True])
def test_exact_probabilities_over_context_and_memory(causal):
    torch.manual_seed(0)
    q, k, v = _qkv()
    mem = PersistentMemory(3, 8, 5).double()
    mk, mv = mem()
    kpm = _kpm()
    p = persistent_attention_probs(q, k, mk, causal=causal, key_padding_mask=kpm)  # (B,H,L,N+L)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 19, dtype=torch.float64))
    assert (p[..., 5:][kpm[:, None, None, :].expand(-1, 3, 19, -1)] == 0).all()  # padding gets nothing
    assert (p[..., :5] > 0).all()  # every query (also causal position 0) sees every slot
    vals = torch.cat([mv[None].expand(2, -1, -1, -1), v], dim=2)
    out = persistent_exact_attention(q, k, v, mk, mv, causal=causal, key_padding_mask=kpm)
    real = ~kpm[:, None, :, None].expand_as(out)  # padded queries are zeroed before use: don't-care rows
    torch.testing.assert_close(out[real], (p @ vals)[real])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True])
def test_favor_memory_shares_normaliser_and_stabiliser(causal):
    """Explicit reference: features of [memory; context] keys with one shared shift, masked, normalised."""
    torch.manual_seed(1)
    q, k, v = _qkv(dtype=torch.float32, seed=1)
    b, h, length, d = q.shape
    favor = FavorAttention(d, num_features=64, causal=causal, seed=3, backend="torch")
    mem = PersistentMemory(h, d, 4)
    mk, mv = mem()
    kpm = _kpm()
    out = persistent_favor_attention(favor, q, k, v, mk, mv, key_padding_mask=kpm)

    keys = torch.cat([mk[None].expand(b, -1, -1, -1), k], dim=2)
    vals = torch.cat([mv[None].expand(b, -1, -1, -1), v], dim=2)
    kpm2 = torch.cat([torch.zeros(b, 4, dtype=torch.bool), kpm], dim=1)
    pq = softmax_features(q, favor.projection, is_query=True).double()
    pk = softmax_features(keys, favor.projection, is_query=False, key_padding_mask=kpm2).double()
    a = pq @ pk.transpose(-1, -2)  # (B,H,L,N+L)
    if causal:
        allowed = torch.cat([torch.ones(length, 4), torch.ones(length, length).tril()], dim=1).bool()
        a = a * allowed
    probs = a / a.sum(-1, keepdim=True)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, length, dtype=torch.float64))
    ref = probs @ vals.double()
    real = ~kpm[:, None, :, None].expand_as(out)  # padded queries' outputs are unspecified
    torch.testing.assert_close(out.double()[real], ref[real], rtol=1e-4, atol=1e-5)


def test_parametrisation_and_gradients():
    mem = PersistentMemory(num_heads=2, dim_head=16, num_slots=64)
    # stored small, used at unit scale
    assert abs(mem.key.std().item() - 16**-0.5) < 0.05
    assert abs(mem.value.std().item() - 64**-0.5) < 0.03
    assert abs(mem.keys().std().item() - 1.0) < 0.2 and abs(mem.values().std().item() - 1.0) < 0.2
    q, k, v = _qkv(b=1, h=2, length=7, d=16, dtype=torch.float32)
    persistent_exact_attention(q, k, v, *mem(), causal=True).sum().backward()
    assert mem.key.grad.abs().sum() > 0 and mem.value.grad.abs().sum() > 0


def test_memory_with_adaptive_span_backends():
    """Memory slots take no span mask: span backends with memory equal the explicit reference."""
    torch.manual_seed(2)
    q, k, v = _qkv(b=1, h=2, length=40, d=8)
    mem = PersistentMemory(2, 8, 3).double()
    mk, mv = mem()
    z = torch.tensor([2.0, 6.5], dtype=torch.float64)
    i = torch.arange(40)
    dist = (i[:, None] - i[None, :]).abs().double()
    m = ((4.0 + z[:, None, None] - dist) / 4.0).clamp(0, 1)  # (H,L,L)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    sm = torch.einsum("bhld,hnd->bhln", q, mk) / math.sqrt(8)
    e_ctx, e_mem = torch.exp(s) * m, torch.exp(sm)
    den = e_ctx.sum(-1, keepdim=True) + e_mem.sum(-1, keepdim=True)
    ref = (e_ctx @ v + torch.einsum("bhln,hnd->bhld", e_mem, mv)) / den
    out = adaptive_span_exact_attention(q, k, v, z, ramp=4.0, memory_k=mk, memory_v=mv, block_size=8)
    torch.testing.assert_close(out, ref)

    pq, pk = torch.rand(1, 2, 40, 8, dtype=torch.float64), torch.rand(1, 2, 40, 8, dtype=torch.float64)
    pm = torch.rand(1, 2, 3, 8, dtype=torch.float64)
    a_ctx, a_mem = (pq @ pk.transpose(-1, -2)) * m, pq @ pm.transpose(-1, -2)
    ref = (a_ctx @ v + a_mem @ mv[None]) / (a_ctx.sum(-1, keepdim=True) + a_mem.sum(-1, keepdim=True))
    out = adaptive_span_linear_attention(pq, pk, v, z, ramp=4.0, memory_phi_k=pm, memory_v=mv, chunk=8)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("favor", [False, True])
def test_memory_invariant_to_long_inf_padding(favor, causal):
    """100 trailing pads holding inf: real outputs equal the unpadded ones; outputs and grads finite."""
    q, k, v = _qkv(b=2, h=2, length=12, d=8, dtype=torch.float32)
    mem = PersistentMemory(2, 8, 3)
    mk, mv = mem()
    base = FavorAttention(8, num_features=16, causal=causal, backend="torch", seed=0) if favor else None

    def run(q, k, v, kpm=None):
        if favor:
            return persistent_favor_attention(base, q, k, v, mk, mv, key_padding_mask=kpm)
        return persistent_exact_attention(q, k, v, mk, mv, causal=causal, key_padding_mask=kpm)

    ref = run(q, k, v)
    qp, kp, vp = (
        torch.cat([x, torch.full((2, 2, 100, 8), math.inf)], 2).requires_grad_(True) for x in (q, k, v)
    )
    kpm = torch.zeros(2, 112, dtype=torch.bool)
    kpm[:, 12:] = True
    out = run(qp, kp, vp, kpm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :12], ref, atol=1e-5, rtol=1e-4)
    out[:, :, :12].sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (qp, kp, vp))
