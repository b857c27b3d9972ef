"""FavorAttention (bidirectional and shared behaviour) against independent float64 references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from protein_lm.attention import FavorAttention, exact_attention, implied_attention
from protein_lm.attention.modules import favor as favor_mod
from tests.helpers.references import allowed_pairs


def _ref_features(x: torch.Tensor, w: torch.Tensor, kernel: str) -> torch.Tensor:
    """Unshifted closed-form features, written out independently of protein_lm."""
    x, w = x.double(), w.double()
    if kernel == "relu":
        return torch.relu(x @ w.T) + 1e-3
    d = x.shape[-1]
    xs = x / d**0.25
    return torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


def explicit_reference(q, k, v, w, kernel, causal=False, key_padding_mask=None):
    """``D^-1 (phi(Q) phi(K)^T (.) mask) V`` with the L x L matrix formed explicitly, float64."""
    a = _ref_features(q, w, kernel) @ _ref_features(k, w, kernel).transpose(-1, -2)  # (B,H,L,L)
    lq, lk = a.shape[-2:]
    allowed = allowed_pairs(q.shape[0], lq, lk, causal, key_padding_mask)
    a = a * allowed
    return (a @ v.double()) / a.sum(-1, keepdim=True)


def _qkv(b=2, h=3, length=11, d=8, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_explicit_reference(kernel, causal):
    q, k, v = _qkv()
    attn = FavorAttention(8, 24, kernel=kernel, causal=causal, seed=0, chunk_size=4)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 8:] = True
    out = attn(q, k, v, key_padding_mask=mask)
    ref = explicit_reference(q, k, v, attn.projection, kernel, causal, mask)
    assert out.dtype == torch.float64
    real = ~mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_matches_float64(kernel, causal):
    q, k, v = _qkv(length=50)
    attn = FavorAttention(8, 32, kernel=kernel, causal=causal, seed=1, chunk_size=16)
    out32 = attn(q.float(), k.float(), v.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), attn(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(kernel, causal):
    """Adding padded keys/queries (even huge or non-finite ones) never changes real outputs."""
    q, k, v = _qkv(b=1, length=9, seed=2)
    attn = FavorAttention(8, 16, kernel=kernel, causal=causal, seed=0, chunk_size=4)
    base = attn(q, k, v)
    for fill in (0.0, 1e4, 1e30, math.inf, math.nan):
        pad = torch.full((1, 3, 5, 8), fill, dtype=torch.float64)
        qp, kp, vp = (torch.cat([t, pad], dim=2) for t in (q, k, v))
        mask = torch.zeros(1, 14, dtype=torch.bool)
        mask[:, 9:] = True
        out = attn(qp, kp, vp, key_padding_mask=mask)
        torch.testing.assert_close(out[:, :, :9], base, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(out).all(), fill
    # padding in the middle of a batch row, next to an unpadded row of another length
    q2, k2, v2 = _qkv(b=2, length=12, seed=3)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 7:] = True
    out = attn(q2, k2, v2, key_padding_mask=mask)
    torch.testing.assert_close(out[:1, :, :7], attn(q2[:1, :, :7], k2[:1, :, :7], v2[:1, :, :7]))
    torch.testing.assert_close(out[1:], attn(q2[1:], k2[1:], v2[1:]))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradcheck_bidirectional(kernel):
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, length=5, d=4, scale=0.5))
    attn = FavorAttention(4, 8, kernel=kernel, seed=0)
    mask = torch.tensor([[False, False, False, False, True]])
    assert torch.autograd.gradcheck(lambda a, b, c: attn(a, b, c, key_padding_mask=mask), (q, k, v))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast_close_to_float32(kernel, causal):
    q, k, v = _qkv(b=2, h=2, length=300, d=16, seed=4, dtype=torch.float32)
    attn = FavorAttention(16, 64, kernel=kernel, causal=causal, seed=0)
    ref = attn(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err  # bf16 rounding of the inputs (~4e-3 relative) and of the output


@pytest.mark.parametrize("causal", [False, True])
def test_implied_attention_rows_sum_to_one_and_reproduce_output(causal):
    q, k, v = _qkv(b=2, h=2, length=10, seed=5)
    for kernel in ("softmax", "relu"):
        attn = FavorAttention(8, 16, kernel=kernel, causal=causal, seed=0, chunk_size=4)
        mask = torch.zeros(2, 10, dtype=torch.bool)
        mask[0, 6:] = True
        a = implied_attention(q, k, attn.projection, kernel, causal=causal, key_padding_mask=mask)
        assert a.shape == (2, 2, 10, 10)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 10, dtype=torch.float64))
        assert (a[0, :, :, 6:] == 0).all() and (a >= 0).all()
        if causal:
            assert (a.triu(1) == 0).all()
        torch.testing.assert_close(a @ v, attn(q, k, v, key_padding_mask=mask))


def test_approaches_exact_softmax_with_many_features():
    q, k, v = _qkv(b=1, h=2, length=32, d=16, scale=0.5, seed=6, dtype=torch.float32)
    exact = exact_attention(q, k, v)
    errs = [(FavorAttention(16, m, seed=0)(q, k, v) - exact).norm() / exact.norm() for m in (16, 4096)]
    assert errs[1] < 0.1 and errs[1] < errs[0] / 3, errs


def test_projection_buffer_state_dict_and_reproducible_redraw():
    a = FavorAttention(16, 40, seed=11)
    b = FavorAttention(16, 40, seed=11)
    assert torch.equal(a.projection, b.projection) and a.projection.shape == (40, 16)
    sd = {name: t.clone() for name, t in a.state_dict().items()}  # state_dict() aliases the buffers
    assert "projection" in sd and "redraw_count" in sd
    first = a.projection.clone()
    a.redraw_projection()
    assert not torch.equal(first, a.projection)
    # a module restored from the checkpoint continues the same sequence of draws
    c = FavorAttention(16, 40, seed=11)
    c.load_state_dict(sd)
    c.redraw_projection()
    torch.testing.assert_close(c.projection, a.projection)
    # an explicit generator reproduces too
    a.redraw_projection(torch.Generator().manual_seed(5))
    b.redraw_projection(torch.Generator().manual_seed(5))
    assert torch.equal(a.projection, b.projection)
    iid = FavorAttention(16, 40, orthogonal=False, seed=11)
    assert not torch.equal(iid.projection, first)


def test_backend_selection_on_cpu(monkeypatch):
    q, k, v = _qkv(b=1, h=1, length=4, d=16, dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^FavorAttention\(backend='triton'\): tensors on cpu, not CUDA; use") as err:
        FavorAttention(16, 16, backend="triton")(q, k, v)
    assert "\n" not in str(err.value)
    called = []
    monkeypatch.setattr(favor_mod, "fused_kernels", lambda: called.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors take the PyTorch path without a warning
        out = FavorAttention(16, 16, backend="auto", seed=0)(q, k, v)
    assert not called and out.shape == q.shape
    with pytest.raises(ValueError):
        FavorAttention(8, 8, kernel="cosine")


class _NoKernels:
    """Stands in for the fused kernels module: declines everything, and must never be launched."""

    @staticmethod
    def why_unsupported(q, k, v, projection):
        return "head dim D=12 is not a power of two >= 16"

    @staticmethod
    def favor_attention_triton(*args, **kwargs):
        raise AssertionError("the fused kernels ran on inputs they declined")


def test_auto_backend_on_cuda_falls_back_with_one_warning(monkeypatch):
    """``auto`` with CUDA inputs the kernels decline: the PyTorch path (same numbers as backend
    'torch'), one warning per module naming the reason; ``triton`` raises it as a one-line error."""
    q, k, v = _qkv(b=1, h=2, length=6, d=12, dtype=torch.float64)
    monkeypatch.setattr(favor_mod, "fused_kernels", lambda: _NoKernels)
    auto = FavorAttention(12, 16, backend="auto", seed=3)
    ref = FavorAttention(12, 16, backend="torch", seed=3)(q, k, v)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # no GPU here
    with pytest.warns(UserWarning, match="using the PyTorch path: head dim D=12") as record:
        first = auto(q, k, v)
        second = auto(q, k, v)
    assert len(record) == 1
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    torch.testing.assert_close(second, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"backend='triton'\): head dim D=12 is not a power of two"):
        FavorAttention(12, 16, backend="triton", seed=3)(q, k, v)


def test_missing_triton_module_is_a_reason_not_a_crash(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "protein_lm.attention.ops" and "favor_triton" in (args[2] or ()):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(favor_mod, "_FUSED", None)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    reason = favor_mod.fused_kernels()
    assert reason == "the Triton kernels are not importable (ImportError: No module named 'triton')"


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_and_large_norms_stay_finite(kernel, causal):
    """L = 65,536 under bf16 autocast with large-norm q/k: no NaN/inf in outputs or gradients."""
    g = torch.Generator().manual_seed(0)
    length = 65_536
    q = (8 * torch.randn(1, 1, length, 8, generator=g)).requires_grad_()
    k = (8 * torch.randn(1, 1, length, 8, generator=g)).requires_grad_()
    v = torch.randn(1, 1, length, 8, generator=g).requires_grad_()
    attn = FavorAttention(8, 16, kernel=kernel, causal=causal, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q, k, v)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # outputs are convex combinations of values
    assert out.float().abs().max() <= v.abs().max() * 1.01


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_torch_path_on_cuda_matches_cpu(causal):
    q, k, v = _qkv(b=2, h=2, length=300, d=16, dtype=torch.float32)
    attn = FavorAttention(16, 64, causal=causal, seed=0, backend="torch")
    cpu = attn(q, k, v)
    gpu = attn.cuda()(q.cuda(), k.cuda(), v.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
