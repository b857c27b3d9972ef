"""Fused qkv split + rotary Triton kernel vs the model's PyTorch rotary code.

CPU (CI): the kernel runs under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be
set before triton is imported), compared with the PyTorch path in float64.
GPU (marker ``gpu``): the model's attention projection with and without the fused kernel, bf16.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.helpers.interpreter import run_interpreted


def _reference_split(qkv, cos, sin, heads):
    """The model's eager code: view/permute/unbind, then ``_rotate`` on q and k."""
    from protein_lm.model import _rotate

    b, length, width = qkv.shape
    q, k, v = qkv.view(b, length, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _compare(b, length, heads, d, device, dtype):
    """Fused vs reference (float64) outputs and gradients: max relative errors."""
    from protein_lm.attention.ops.rotary_triton import rotary_split
    from protein_lm.model import RotaryEmbedding

    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(b, length, 3 * heads * d, generator=g, dtype=torch.float64)
    grads = [torch.randn(b, heads, length, d, generator=g, dtype=torch.float64) for _ in range(3)]
    cos, sin = RotaryEmbedding(d).tables(length, torch.device("cpu"))
    x = qkv.to(device, dtype).requires_grad_()
    outs = rotary_split(x, cos.to(device), sin.to(device), heads)
    torch.autograd.backward(outs, [t.to(device, dtype) for t in grads])
    xr = qkv.to(dtype).double().requires_grad_()
    refs = _reference_split(xr, cos.double(), sin.double(), heads)
    torch.autograd.backward(refs, grads)
    res = {}
    for name, a, r in zip("qkv", outs, refs, strict=True):
        assert a.shape == r.shape and a.is_contiguous()
        res[name] = ((a.double().cpu() - r).norm() / r.norm()).item()
    res["dqkv"] = ((x.grad.double().cpu() - xr.grad).norm() / xr.grad.norm()).item()
    return res


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__, timeout=300)


def test_interpreted_rotary_split_matches_pytorch_rotary(interpreted):
    # L = 70: a partial block of positions; 3 heads of 16: the packed head offsets
    for key, err in interpreted.items():
        assert err < 1e-6, (key, interpreted)


def test_rotary_fast_path_only_where_it_is_exact():
    from protein_lm.attention.ops.rotary_triton import rotary_split_supported

    cpu = torch.zeros(1, 4, 3 * 64)
    assert not rotary_split_supported(cpu, 64)  # CPU: the PyTorch path
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert rotary_split_supported(gpu, 64) and rotary_split_supported(gpu.bfloat16(), 64)
        assert not rotary_split_supported(gpu.double(), 64)  # float64 v would be rounded to float32
        assert not rotary_split_supported(gpu, 48)


def test_rotary_split_rejects_bad_tables():
    from protein_lm.attention.ops.rotary_triton import rotary_split

    qkv = torch.zeros(1, 5, 3 * 2 * 8)
    with pytest.raises(ValueError, match="cos/sin"):
        rotary_split(qkv, torch.zeros(5, 3), torch.zeros(5, 3), 2)
    with pytest.raises(ValueError, match="not 3"):
        rotary_split(torch.zeros(1, 5, 50), torch.zeros(5, 4), torch.zeros(5, 4), 2)


@pytest.mark.gpu
def test_gpu_model_projection_fused_matches_pytorch_path(monkeypatch):
    """The model's q, k, v are bitwise those of the PyTorch path (bf16, no FMA contraction), the input
    gradient agrees, and the fused kernel is really what runs on CUDA."""
    from protein_lm import model as model_mod
    from protein_lm.model import ModelConfig, SelfAttention

    att = SelfAttention(ModelConfig(dim=256, heads=4, depth=1)).cuda()
    x = torch.randn(2, 1000, 256, device="cuda")
    calls = []
    real = model_mod._fused_rotary_split

    def spy(qkv, head_dim):
        fn = real(qkv, head_dim)
        calls.append(fn is not None)
        return fn

    results = []
    for fused in (True, False):
        monkeypatch.setattr(model_mod, "_fused_rotary_split", spy if fused else (lambda *a: None))
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = att.project(xi)
        (q.float().square().sum() + (k.float() * v.float()).sum()).backward()
        results.append((q, k, v, xi.grad))
    assert calls == [True]
    for a, r in zip(results[0][:3], results[1][:3], strict=True):
        assert torch.equal(a, r)
    grad, ref = results[0][3], results[1][3]
    assert ((grad - ref).norm() / ref.norm()).item() < 1e-3


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(_compare(2, 70, 3, 16, "cpu", torch.float32)))
