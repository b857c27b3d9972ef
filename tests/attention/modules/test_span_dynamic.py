"""Dynamic (per-token) adaptive spans on the Performer backend, and in the model.

The banded kernel is checked against an independent quadratic reference built here: the full
``L x L`` matrix ``phi_q phi_k^T`` times an explicit per-query piecewise mask, normalised row by row,
in float64.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from protein_lm.attention.modules.span import AdaptiveSpan, AdaptiveSpanKernel
from protein_lm.attention.ops.span import adaptive_span_linear_attention


def _ref_mask(length: int, z: torch.Tensor, ramp: float) -> torch.Tensor:
    """``(B, H, L, L)`` mask from the piecewise definition: 1 for ``x <= z_i``, linear to 0 at ``z_i + R``."""
    i = torch.arange(length)
    x = (i[:, None] - i[None, :]).abs().double()  # (L, L)
    zz = z.double()[..., None]  # (B, H, L, 1): one span per query row
    full = (x <= zz).double()
    part = ((x > zz) & (x < zz + ramp)).double() * (ramp + zz - x) / ramp
    return full + part


def _ref(pq, pk, v, z, ramp, causal, kpm=None, mem_pk=None, mem_v=None):
    """Quadratic reference: explicit masked feature products, float64, real keys only."""
    length = pq.shape[2]
    a = pq.double() @ pk.double().transpose(-1, -2)  # (B,H,L,L)
    m = _ref_mask(length, z, ramp)
    if causal:
        m = m * torch.ones(length, length, dtype=torch.float64).tril()
    if kpm is not None:
        m = m * (~kpm)[:, None, None, :].double()
    a = a * m
    num, den = a @ v.double(), a.sum(-1, keepdim=True)
    if mem_pk is not None:
        am = pq.double() @ mem_pk.double().transpose(-1, -2)  # (B,H,L,N): mask 1 on every slot
        num, den = num + am @ mem_v.double(), den + am.sum(-1, keepdim=True)
    return num / den


def _inputs(b, h, length, m, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pq = torch.rand(b, h, length, m, generator=g, dtype=dtype) + 0.01
    pk = torch.rand(b, h, length, m, generator=g, dtype=dtype) + 0.01
    v = torch.randn(b, h, length, d, generator=g, dtype=dtype)
    return pq, pk, v


@pytest.mark.parametrize("block", [None, 7, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_dynamic_linear_equals_masked_quadratic(causal, block):
    b, h, length, m, d = 2, 3, 53, 8, 5  # 53: no block size divides L
    pq, pk, v = _inputs(b, h, length, m, d, seed=0)
    z = torch.rand(b, h, length, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20
    z[0, 1, ::5] = 70.0  # some queries see past the whole sequence
    z[1, 2, :4] = 0.0  # and some only themselves (+ ramp)
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[0, -6:] = True
    out = adaptive_span_linear_attention(
        pq, pk, v, z, ramp=4.0, causal=causal, key_padding_mask=kpm, block_size=block
    )
    ref = _ref(pq, pk, v, z, 4.0, causal, kpm)
    real = (~kpm)[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real])
    assert (out[~real] == 0).all()  # padded queries get output 0, as on the static path


@pytest.mark.parametrize("causal", [False, True])
def test_dynamic_linear_with_memory_slots(causal):
    b, h, length, m, d, n = 2, 2, 29, 6, 4, 3
    pq, pk, v = _inputs(b, h, length, m, d, seed=2)
    g = torch.Generator().manual_seed(3)
    mem_pk = torch.rand(1, h, n, m, generator=g, dtype=torch.float64)
    mem_v = torch.randn(h, n, d, generator=g, dtype=torch.float64)
    z = torch.rand(b, h, length, generator=g, dtype=torch.float64) * 9
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, -4:] = True
    out = adaptive_span_linear_attention(
        pq, pk, v, z, 3.0, causal, kpm, memory_phi_k=mem_pk, memory_v=mem_v, block_size=8
    )
    ref = _ref(pq, pk, v, z, 3.0, causal, kpm, mem_pk, mem_v)
    real = (~kpm)[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real])


@pytest.mark.parametrize("causal", [False, True])
def test_dynamic_linear_gradcheck(causal):
    """Exact gradients w.r.t. features, values and the per-query spans (fractional, off the kinks)."""
    pq, pk, v = _inputs(1, 2, 13, 3, 2, seed=4)
    z = torch.tensor([0.3, 1.7, 2.2, 4.6, 0.9, 3.4, 5.5, 1.1, 2.8, 0.6, 6.3, 3.9, 1.4], dtype=torch.float64)
    z = torch.stack([z, z.flip(0)])[None]  # (1, 2, 13)
    args = [t.clone().requires_grad_(True) for t in (pq, pk, v, z)]

    def f(a, b, c, s):
        return adaptive_span_linear_attention(a, b, c, s, ramp=2.0, causal=causal, block_size=4)

    assert torch.autograd.gradcheck(f, args)


def test_dynamic_linear_band_is_trimmed():
    """The banded path never builds L x L: with spans <= 10 and R = 8 the window is 64 + 2*17 keys."""
    pq, pk, v = _inputs(1, 1, 4096, 4, 2, seed=5, dtype=torch.float32)
    z = torch.full((1, 1, 4096), 3.0)
    z[0, 0, 100] = 10.0  # the largest span of the batch sets the band
    seen = []
    orig = torch.Tensor.unfold

    def spy(self, dim, size, step):
        seen.append(size)
        return orig(self, dim, size, step)

    torch.Tensor.unfold = spy
    try:
        adaptive_span_linear_attention(pq, pk, v, z, ramp=8.0)
    finally:
        torch.Tensor.unfold = orig
    assert seen and set(seen) == {98}


def test_dynamic_linear_float32_and_autocast():
    """float32 (no cancelling prefix sums on this path) matches float64; bf16 autocast is ignored."""
    pq, pk, v = _inputs(1, 2, 300, 16, 8, seed=6, dtype=torch.float32)
    z = torch.rand(1, 2, 300, generator=torch.Generator().manual_seed(7)) * 40
    ref = _ref(pq, pk, v, z, 8.0, False)
    out = adaptive_span_linear_attention(pq, pk, v, z, ramp=8.0)
    assert (out.double() - ref).abs().max() < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = adaptive_span_linear_attention(pq, pk, v, z, ramp=8.0)
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, out)


def _predictor_spans(x, weight, bias, max_span):
    """Independent ``z_t = S * sigmoid(v^T x_t + b)``: ``(B, L, dim) -> (B, H, L)``."""
    return max_span * torch.sigmoid(torch.einsum("bld,hd->bhl", x, weight) + bias[None, :, None])


@pytest.mark.parametrize("causal", [False, True])
def test_span_predictor_gradient(causal):
    """Gradients reach v and b of the span predictor: equal to autograd through the quadratic
    reference, and to central finite differences of the loss (float64)."""
    torch.manual_seed(8)
    b, h, length, m, d, dim = 2, 2, 21, 4, 3, 6
    span = AdaptiveSpan(h, max_span=12, ramp=3.0, init_span=5.0, dynamic=True, dim=dim).double()
    with torch.no_grad():
        span.span_predictor.weight.normal_(0, 0.5)
    pq, pk, v = _inputs(b, h, length, m, d, seed=9)
    x = torch.randn(b, length, dim, dtype=torch.float64)
    w = torch.randn(b, h, length, d, dtype=torch.float64)
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, -3:] = True
    real = (~kpm)[:, None, :, None].double()

    def loss_module() -> torch.Tensor:
        out = span.attend_linear(pq, pk, v, x=x, causal=causal, key_padding_mask=kpm, block_size=8)
        return (out * w * real).sum()

    loss_module().backward()
    gw, gb = span.span_predictor.weight.grad.clone(), span.span_predictor.bias.grad.clone()
    assert gw.abs().sum() > 0 and gb.abs().min() > 0

    wt = span.span_predictor.weight.detach().clone().requires_grad_(True)
    bt = span.span_predictor.bias.detach().clone().requires_grad_(True)
    ref = _ref(pq, pk, v, _predictor_spans(x, wt, bt, 12.0), 3.0, causal, kpm)
    (ref.nan_to_num() * w * real).sum().backward()
    torch.testing.assert_close(gw, wt.grad)
    torch.testing.assert_close(gb, bt.grad)

    step = 1e-6
    with torch.no_grad():
        for hh in range(h):
            span.span_predictor.bias[hh] += step
            up = loss_module()
            span.span_predictor.bias[hh] -= 2 * step
            down = loss_module()
            span.span_predictor.bias[hh] += step
            assert math.isclose((up - down) / (2 * step), float(gb[hh]), rel_tol=1e-5, abs_tol=1e-8)


def _dynamic_kernel(backend: str, causal: bool, memory_slots: int = 0, dim: int = 16):
    from protein_lm.attention import FavorAttention
    from protein_lm.attention.modules.memory import PersistentMemory

    span = AdaptiveSpan(num_heads=2, max_span=24, ramp=8, init_span=6, dynamic=True, dim=dim)
    with torch.no_grad():
        span.span_predictor.weight.normal_(0, 0.3)
    favor = (
        FavorAttention(8, num_features=32, causal=causal, backend="torch", seed=0)
        if backend == "performer"
        else None
    )
    memory = PersistentMemory(2, 8, memory_slots) if memory_slots else None
    return AdaptiveSpanKernel(span, causal, favor=favor, memory=memory)


@pytest.mark.parametrize("memory_slots", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["performer", "exact"])
def test_dynamic_kernel_padding_and_probs(backend, causal, memory_slots):
    """Kernel level: 60 trailing pads filled with inf leave the real outputs equal to the unpadded
    ones (finite, finite gradients); and output == attention_probs @ v + memory part when no memory."""
    torch.manual_seed(10)
    kernel = _dynamic_kernel(backend, causal, memory_slots)
    b, h, real, pad, d = 2, 2, 20, 60, 8
    q, k, v = (torch.randn(b, h, real, d) for _ in range(3))
    x = torch.randn(b, real, 16)
    ref = kernel(q, k, v, x=x)
    if memory_slots == 0:  # the quadratic analysis path describes the same attention
        probs = kernel.attention_probs(q, k, x=x)
        torch.testing.assert_close(probs @ v, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, real), atol=1e-5, rtol=0)
    qp, kp, vp = (
        torch.cat([t, torch.full((b, h, pad, d), math.inf)], 2).requires_grad_(True) for t in (q, k, v)
    )
    xp = torch.cat([x, torch.randn(b, pad, 16) * 100], 1)
    kpm = torch.zeros(b, real + pad, dtype=torch.bool)
    kpm[:, real:] = True
    out = kernel(qp, kp, vp, key_padding_mask=kpm, x=xp)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :real], ref, atol=1e-5, rtol=1e-4)
    (out[:, :, :real] ** 2).sum().backward()
    for t in (qp, kp, vp, kernel.span.span_predictor.weight):
        assert torch.isfinite(t.grad).all()
    with pytest.raises(ValueError, match="layer input"):
        kernel(q, k, v)


def test_dynamic_module_records_real_token_mean():
    """aux loss and logged spans average over real tokens only (padding pays no penalty)."""
    span = AdaptiveSpan(num_heads=3, max_span=50, ramp=4, init_span=10, loss_coef=0.1, dynamic=True, dim=4)
    with torch.no_grad():
        span.span_predictor.weight.normal_()
    x = torch.randn(2, 7, 4)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    z = span.spans(x, kpm)
    want = torch.cat([z[0, :, :5], z[1]], dim=-1).mean(-1)  # (H,): the 5 + 7 real tokens
    torch.testing.assert_close(span.current_spans(), want.detach())
    torch.testing.assert_close(span.aux_loss(), 0.1 * want.sum())
    assert span.last_num_tokens == 12
    span.spans(torch.randn(2, 7, 4), record=False)  # analysis calls leave the record alone
    torch.testing.assert_close(span.current_spans(), want.detach())


# --------------------------------------------------------------------------- model level

_TINY = dict(dim=16, depth=2, heads=2, ff_dim=32, num_features=16, favor_backend="torch", feature_seed=0)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_dynamic_span_model_trains(causal, tmp_path):
    """A tiny performer + dynamic-span model: finite loss over a few Adam steps, the aux loss equals
    lambda * sum of per-head mean spans (recomputed from the blocks' inputs) and is part of the loss
    the LightningModule optimises, and the span predictors learn."""
    from protein_lm.lit_module import ProteinLMModule
    from protein_lm.model import ModelConfig, ProteinLM

    torch.manual_seed(11)
    cfg = ModelConfig(
        attention="performer-softmax",
        causal=causal,
        span={"enabled": True, "dynamic": True, "max": 16, "ramp": 4, "init": 5, "loss_coef": 1e-2},
        **_TINY,
    )
    model = ProteinLM(cfg)
    spans = [blk.attn.kernel.span for blk in model.blocks]
    assert all(s.dynamic for s in spans)
    # the predictor is not re-initialised by the model: every token starts at span.init
    x = torch.randint(4, 24, (4, 37))
    pad = torch.zeros(4, 37, dtype=torch.bool)
    pad[2, -8:] = True
    model(x, pad)
    for s in spans:
        torch.testing.assert_close(s.current_spans(), torch.full((2,), 5.0), atol=1e-3, rtol=0)

    inputs = {}
    hooks = [
        blk.attn.register_forward_hook(lambda mod, a, o, i=i: inputs.__setitem__(i, a[0]))
        for i, blk in enumerate(model.blocks)
    ]
    with torch.no_grad():
        for s in spans:
            s.span_predictor.weight.normal_(0, 0.5)
    out = model(x, pad)
    for hk in hooks:
        hk.remove()
    real = (~pad)[:, None, :].double()
    want = 0.0
    for i, s in enumerate(spans):
        p = s.span_predictor
        z = _predictor_spans(inputs[i].double(), p.weight.double(), p.bias.double(), 16.0)
        want = want + 1e-2 * ((z * real).sum((0, 2)) / real.sum()).sum()
    torch.testing.assert_close(out.aux_loss.double(), want.detach(), atol=1e-7, rtol=1e-5)

    module = ProteinLMModule(
        config=cfg, objective="causal" if causal else "mlm", lr=1e-2, warmup_steps=0, redraw_interval=None
    )
    module.model.load_state_dict(model.state_dict())
    labels = torch.where(torch.rand(4, 37) < 0.3, x, torch.full_like(x, -100)).masked_fill(pad, -100)
    batch = {"input_ids": x, "labels": labels, "padding_mask": pad}
    bias0 = [blk.attn.kernel.span.span_predictor.bias.detach().clone() for blk in module.model.blocks]
    seen = []

    class Check(pl.Callback):  # before backward the weights are those the step's loss came from
        def on_before_backward(self, trainer, pl_module, loss):
            with torch.no_grad():
                ce, aux, *_ = pl_module._shared_step(batch)
            seen.append((float(loss.detach()), float(ce), float(aux)))

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Check()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 4, batch_size=None))
    assert len(seen) == 4
    for total, ce, aux in seen:
        assert math.isfinite(total) and aux > 0
        assert math.isclose(total, ce + aux, rel_tol=1e-6)  # the aux loss is part of the training loss
    for blk, b0 in zip(module.model.blocks, bias0, strict=True):  # the span predictors were trained
        assert not torch.equal(blk.attn.kernel.span.span_predictor.bias.detach(), b0)


def test_dynamic_span_model_padding_invariance_and_maps():
    from protein_lm.model import ModelConfig, ProteinLM

    torch.manual_seed(12)
    cfg = ModelConfig(
        attention="performer-relu", span={"enabled": True, "dynamic": True, "max": 12, "ramp": 4}, **_TINY
    )
    model = ProteinLM(cfg).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.kernel.span.span_predictor.weight.normal_(0, 0.5)
    x = torch.randint(4, 24, (2, 30))
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, -7:] = True
    a = model(x, pad)
    x2 = x.clone()
    x2[1, -7:] = 9
    b = model(x2, pad)
    torch.testing.assert_close(a.logits[~pad], b.logits[~pad], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    (_, maps), *_ = list(model.attention_maps(x, pad, layers=[1]))
    rows = maps[0].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="span.dynamic needs span.enabled"):
        ModelConfig(span={"dynamic": True})
