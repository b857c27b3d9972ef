"""Fused FAVOR+ Triton kernels vs the PyTorch reference.

CPU (CI): the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on tiny shapes in a
subprocess (the variable must be set before triton is imported, and must not leak into the GPU
tests of the same session), compared with a float64 run of the reference path.
GPU (marker ``gpu``): compiled kernels on bf16 inputs vs the reference on the same inputs.
"""

from __future__ import annotations

import json
import math
import sys
import zlib

import pytest
import torch

from tests.helpers.interpreter import run_interpreted
from tests.helpers.references import same_with_nan_filled_scratch

EPS = 1e-30  # FavorAttention's normaliser floor (docs/architecture.md); what the model actually uses
CASES = [
    (kernel, causal, pad)
    for kernel in ("softmax", "relu")
    for causal in (False, True)
    for pad in (False, True)
]


def _case_id(c):
    return f"{c[0]}-{'causal' if c[1] else 'bid'}-{'pad' if c[2] else 'nopad'}"


def _reference(q, k, v, proj, kernel, causal, pad, eps=EPS):
    from protein_lm.attention.ops.favor import favor_bidirectional, favor_causal, favor_features

    pq, pk = favor_features(q, k, proj, kernel, pad)
    fn = favor_causal if causal else favor_bidirectional
    return fn(pq, pk, v, pad, eps)


def _padding(b, length, device="cpu"):
    pad = torch.zeros(b, length, dtype=torch.bool, device=device)
    pad[0, length - length // 4 :] = True  # trailing padding
    if b > 1:
        pad[1, :3] = True  # leading padding: early queries see no real key (normaliser at eps)
    return pad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run_case(kernel, causal, use_pad, dtype, b, h, length, d, m, device, reference_projection=None, **kw):
    from protein_lm.attention.ops.favor_triton import favor_attention_triton
    from protein_lm.attention.ops.features import draw_projection

    g = torch.Generator().manual_seed(zlib.crc32(f"{kernel}{causal}{use_pad}{length}".encode()))
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    proj = draw_projection(m, d, generator=g)
    pad = _padding(b, length) if use_pad else None
    grad = torch.randn(b, h, length, d, generator=g, dtype=torch.float64)
    # inputs rounded to the kernel's dtype, so both paths see the same numbers
    ins = [t.to(dtype).to(device).requires_grad_() for t in (q, k, v)]
    pad_d = pad.to(device) if pad is not None else None
    out = favor_attention_triton(*ins, proj.to(device), kernel, causal, pad_d, EPS, **kw)
    out.backward(grad.to(device=device, dtype=out.dtype))
    ref_ins = [t.detach().to(device, torch.float64).requires_grad_() for t in ins]
    ref_proj = reference_projection(proj, d) if reference_projection else proj.double()
    ref = _reference(*ref_ins, ref_proj.to(device), kernel, causal, pad_d)
    ref.backward(grad.to(device))
    res = {"out": _rel(out.detach(), ref.detach())}
    for name, a, r in zip(("dq", "dk", "dv"), ins, ref_ins, strict=False):
        res[name] = _rel(a.grad, r.grad)
    res["finite"] = bool(torch.isfinite(out).all().item())
    return res


# ------------------------------------------------------------------------- CPU: Triton interpreter
def _interpret_all() -> dict:
    torch.manual_seed(0)
    out = {}
    # both ways of summing the slices: atomics (default) and the deterministic slice-serial walks
    for det, tag in ((False, ""), (True, "det-")):
        for c in CASES:
            # L=40 with 16-row tiles: a partial last tile; walks of 32 rows: states carried across
            # programs; state splits of 16: the max-rescaled merge of several partial sums; M=64 in
            # four slices of 16: the online per-row max and the four running states.
            out[tag + _case_id(c)] = _run_case(
                *c,
                torch.float32,
                2,
                2,
                40,
                16,
                64,
                "cpu",
                tile=16,
                state_split=16,
                walk_split=32,
                slice_m=16,
                deterministic=det,
            )
        # L=150 > the reference's 128-token chunks: leading padding (dO/eps rows) across carried states
        for kernel in ("softmax", "relu"):
            out[f"{tag}long-lead-{kernel}"] = _run_case(
                kernel,
                True,
                True,
                torch.float32,
                2,
                1,
                150,
                16,
                64,
                "cpu",
                tile=16,
                walk_split=32,
                slice_m=16,
                deterministic=det,
            )
        # M = 3 slices (any whole number of slices is accepted, not only 1, 2 or 4) and a partial
        # last split: every slice's contribution must land exactly once
        for causal in (False, True):
            out[f"{tag}three-slices-{causal}"] = _run_case(
                "softmax",
                causal,
                True,
                torch.float32,
                2,
                2,
                70,
                16,
                48,
                "cpu",
                tile=16,
                state_split=32,
                walk_split=48,
                slice_m=16,
                deterministic=det,
            )
    # the hi/lo split projection used for bf16 inputs (the interpreter cannot multiply bf16); and one
    # bf16 product for the logits (W' = W d^-1/4 log2 e rounded to bf16): the reference gets the same
    # rounded projection, so out must match tightly; the gradients use the unrounded W
    for tag, precision, reference in (
        ("split", "split", None),
        ("bf16-logits", "bf16", _bf16_logit_projection),
    ):
        for causal in (False, True):
            out[f"{tag}-{causal}"] = _run_case(
                "softmax",
                causal,
                True,
                torch.float32,
                2,
                1,
                40,
                16,
                32,
                "cpu",
                reference_projection=reference,
                tile=16,
                walk_split=32,
                logit_precision=precision,
            )
    for causal in (False, True):
        out[f"op-{causal}"] = _check_registered_op(causal)
    out["scan"] = _check_scan()
    out["nan-buffers"] = _check_uninitialised_buffers()
    return out


def _check_scan() -> dict:
    """``_exclusive_scan`` (the causal split states) against a float64 exclusive scan: one split, many
    splits, widths that are not a multiple of the kernel's column block, both directions, and one
    huge split whose value must not reach the splits before it (no ``inclusive - x`` cancellation)."""
    from protein_lm.attention.ops.favor_triton import _exclusive_scan

    g = torch.Generator().manual_seed(3)
    res = {"err": 0.0, "before_huge": 0.0}
    for rows, n, width in ((1, 1, 5), (2, 3, 7), (2, 17, 256), (1, 40, 300)):
        x = torch.randn(rows, n, width, generator=g)
        huge = n // 2
        x[:, huge] *= 1e12
        for reverse in (False, True):
            got = _exclusive_scan(x, reverse=reverse).double()
            xs = x.double().flip(1) if reverse else x.double()
            ref = torch.cat([torch.zeros_like(xs[:, :1]), xs.cumsum(1)[:, :-1]], dim=1)
            ref = ref.flip(1) if reverse else ref
            res["err"] = max(res["err"], ((got - ref).abs() / (ref.abs() + 1.0)).max().item())
            untouched = got[:, huge + 1 :] if reverse else got[:, : huge + 1]  # before the huge split
            if untouched.numel():
                res["before_huge"] = max(res["before_huge"], untouched.abs().max().item())
    return res


def _check_uninitialised_buffers() -> dict:
    """The atomic causal path with every ``torch.empty`` / ``empty_like`` buffer filled with NaN (the
    allocator may hand back any bytes): the results must equal those of a normal run bitwise, so every
    float32 sum the kernels add to was zeroed first (here: by the key-state pass)."""
    from protein_lm.attention.ops.favor_triton import favor_attention_triton

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=g) for _ in range(3))
    proj, do = torch.randn(64, 16, generator=g), torch.randn(2, 2, 70, 16, generator=g)
    pad = torch.arange(70)[None].expand(2, -1) >= torch.tensor([[70], [61]])

    def run():
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = favor_attention_triton(
            *ins, proj, "softmax", True, pad, EPS, tile=16, walk_split=32, slice_m=16
        )
        out.backward(do)
        return [out.detach()] + [t.grad for t in ins]

    return {"equal": same_with_nan_filled_scratch(run)}


def _check_registered_op(causal: bool) -> dict:
    """The kernels as torch ops, as ``ProteinLM.compiled`` uses them: ``torch.library.opcheck``
    (schema, fake tensors incl. symbolic sizes, autograd registration) for softmax and ReLU, with and
    without padding, atomic and deterministic; then ``torch.compile`` (no ``fullgraph``) over three
    lengths, against the eager path (an ``autograd.Function`` over the same kernels), with the
    projection changed in place between forward and backward (a redraw must not leak into it)."""
    import torch._dynamo

    from protein_lm.attention.ops import favor_triton as ft

    g = torch.Generator().manual_seed(11 + causal)
    proj = torch.randn(32, 16, generator=g)
    res = {"diff": 0.0}
    for kernel, use_pad, det in (("softmax", True, False), ("relu", False, True)):
        q, k, v = (torch.randn(1, 2, 40, 16, generator=g, requires_grad=True) for _ in range(3))
        pad = torch.arange(40)[None] >= 35 if use_pad else None
        # walk_split None: the causal split count comes from the SM count and L (symbolic in the fake)
        torch.library.opcheck(
            ft._forward_op, (q, k, v, proj, pad, None, kernel, causal, EPS, 16, None, None, 16, None, det)
        )
    # eager calls bypass the op dispatcher (it doubled their host time): the op must not be called
    real_op, op_calls = ft._forward_op, []
    ft._forward_op = lambda *args: op_calls.append(args) or real_op(*args)
    try:
        ft.favor_attention_triton(q, k, v, proj, "softmax", causal, None, EPS, tile=16, slice_m=16)
    finally:
        ft._forward_op = real_op
    res["eager_op_calls"] = len(op_calls)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ft.favor_attention_triton, backend="aot_eager")
    for length in (40, 56, 72):
        q, k, v = (torch.randn(1, 2, length, 16, generator=g, requires_grad=True) for _ in range(3))
        pad = torch.arange(length)[None] >= length - 5
        grads = []
        for f in (compiled, ft.favor_attention_triton):
            out = f(q, k, v, proj, "softmax", causal, pad, EPS, tile=16, slice_m=16)
            proj.add_(0.5)  # a redraw between forward and backward
            grads.append((out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))))
            proj.sub_(0.5)
        res["diff"] = max(res["diff"], *map(_rel, *grads))
    counters = torch._dynamo.utils.counters
    res["graphs"] = counters["stats"]["unique_graphs"]
    res["breaks"] = sum(counters["graph_break"].values())
    return res


def _bf16_logit_projection(proj, d):
    """The projection the kernels' single bf16 logit product effectively uses (float64)."""

    s = d**-0.25 / math.log(2)
    return (proj.double() * s).to(torch.bfloat16).double() / s


def test_interpreted_split_state_scan_matches_float64(interpreted):
    r = interpreted["scan"]
    assert r["err"] < 1e-6, r
    assert r["before_huge"] < 1e3, r  # an O(1) sum of earlier splits, not a cancelled 1e12


def test_interpreted_causal_sums_are_zeroed_inside_the_kernels(interpreted):
    assert interpreted["nan-buffers"]["equal"]


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


DET = pytest.mark.parametrize("tag", ["", "det-"], ids=["atomic", "deterministic"])


@DET
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_interpreted_kernels_match_float64_reference(interpreted, case, tag):
    r = interpreted[tag + _case_id(case)]
    assert r["finite"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r)


@DET
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_interpreted_causal_leading_padding_across_states(interpreted, kernel, tag):
    r = interpreted[f"{tag}long-lead-{kernel}"]
    assert r["finite"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r)


@DET
@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_three_feature_slices(interpreted, causal, tag):
    r = interpreted[f"{tag}three-slices-{causal}"]
    assert r["finite"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r)


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_split_projection(interpreted, causal):
    r = interpreted[f"split-{causal}"]
    assert r["finite"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r)


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_single_bf16_logit_product(interpreted, causal):
    r = interpreted[f"bf16-logits-{causal}"]
    assert r["finite"]
    assert r["out"] < 1e-5, r  # the logits are exactly those of the bf16-rounded projection
    for key in ("dq", "dk", "dv"):  # gradients multiply the unrounded W: bf16-level differences
        assert r[key] < 1e-2, (key, r)


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_registered_op_compiles_without_breaks(interpreted, causal):
    r = interpreted[f"op-{causal}"]
    assert r["diff"] < 1e-5, r  # compiled (ops) and eager (autograd.Function): float32 rounding apart
    assert r["breaks"] == 0, r
    assert r["eager_op_calls"] == 0, r
    assert r["graphs"] <= 2, r  # static, then symbolic in L: no recompile for the third length


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("length", [1000])
def test_gpu_bf16_matches_reference(case, length):
    # L=1000: partial tiles; default geometry (64-row tiles, splits from the SM count)
    r = _run_case(*case, torch.bfloat16, 2, 4, length, 64, 256, "cuda")
    print(_case_id(case), length, json.dumps(r))
    assert r["finite"]
    for key in ("out", "dq", "dk", "dv"):
        # one tolerance for all: the query's |q|^2/2 term (whose exactly-zero gradient cancelled
        # badly and cost softmax-causal dq 2-4% in earlier kernels) is no longer differentiated
        assert r[key] < 2e-2, (key, r)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_deterministic_mode_is_bitwise_reproducible(causal):
    """Deterministic mode (torch's switch or deterministic=True; no atomics): two runs give identical
    bits for out and every gradient, and agree with the default atomic path (4 slices, many splits)."""
    from protein_lm.attention.ops.favor_triton import favor_attention_triton
    from protein_lm.attention.ops.features import draw_projection

    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, do = (
        torch.randn(2, 4, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    proj = draw_projection(256, 64).cuda()

    def run(det):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = favor_attention_triton(*ins, proj, "softmax", causal, None, EPS, deterministic=det)
        out.backward(do)
        return [out.detach()] + [t.grad for t in ins]

    # the first run through torch's global switch: nothing on the path may refuse to run under it
    # (torch.cumsum on CUDA floats does: the causal state scans use a Triton scan there)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run(None)
    finally:
        torch.use_deterministic_algorithms(before)
    second, atomic = run(True), run(False)
    for a, b, c in zip(first, second, atomic, strict=True):
        assert torch.equal(a, b)
        assert _rel(a, c) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_float32_inputs(causal):
    r = _run_case("softmax", causal, True, torch.float32, 1, 2, 777, 64, 256, "cuda")
    print("fp32", causal, json.dumps(r))
    for key in ("out", "dq", "dk", "dv"):  # tf32 products; causal dq measured 0.9% (see above)
        assert r[key] < 2e-2, (key, r)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_large_norm_and_long(causal):
    """No NaN/inf for large-norm q/k at L=65,536 (the key shift is one max over 65k keys)."""
    from protein_lm.attention.ops.favor_triton import favor_attention_triton
    from protein_lm.attention.ops.features import draw_projection

    q, k, v = (torch.randn(1, 2, 65536, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q, k = q * 6, k * 6
    for t in (q, k, v):
        t.requires_grad_()
    proj = draw_projection(256, 64).cuda()
    out = favor_attention_triton(q, k, v, proj, "softmax", causal, None, EPS)
    out.float().square().mean().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


def test_unsupported_inputs_are_refused_not_rerouted(monkeypatch):
    """Extra keys (persistent memory), odd D or M, CPU tensors: a one-line ``ValueError`` naming the
    reason, before any kernel launch (the fused op never falls back by itself)."""
    from protein_lm.attention.ops import favor_triton

    def no_kernels(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched for unsupported inputs")

    monkeypatch.setattr(favor_triton, "_forward", no_kernels)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the device is not the first reason
    x16, x12 = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 12)
    cases = [
        ((x16, torch.zeros(1, 2, 12, 16), torch.zeros(1, 2, 12, 16), torch.zeros(32, 16)), "q, k, v shapes differ"),
        ((x12, x12, x12, torch.zeros(32, 12)), "head dim D=12 is not a power of two >= 16"),
        ((x16, x16, x16, torch.zeros(24, 16)), "num_features M=24: no slice width"),
    ]
    for (q, k, v, proj), reason in cases:
        assert favor_triton.why_unsupported(q, k, v, proj).startswith(reason)
        assert not favor_triton.supported(q, k, v, proj)
        with pytest.raises(ValueError, match=r"^favor_attention_triton: " + reason) as err:
            favor_triton.favor_attention_triton(q, k, v, proj, "softmax", False, None, EPS)
        assert "\n" not in str(err.value)
    assert favor_triton.supported(x16, x16, x16, torch.zeros(32, 16))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert favor_triton.why_unsupported(x16, x16, x16, torch.zeros(32, 16)) == "tensors on cpu, not CUDA"


@pytest.mark.gpu
def test_gpu_favor_module_dispatches_to_triton():
    from protein_lm.attention.modules.favor import FavorAttention
    from protein_lm.attention.ops import favor_triton

    launched = []
    real_forward = favor_triton._forward

    def spy(*args, **kwargs):
        plan = next(a for a in (*args, *kwargs.values()) if isinstance(a, favor_triton._Plan))
        launched.append(("softmax" if plan.softmax else "relu", plan.causal))
        return real_forward(*args, **kwargs)

    att = FavorAttention(64, 256, causal=True, backend="triton", seed=0).cuda()
    ref = FavorAttention(64, 256, causal=True, backend="torch", seed=0).cuda()
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    favor_triton._forward = spy
    try:
        out = att(q, k, v)
    finally:
        favor_triton._forward = real_forward
    assert launched == [("softmax", True)]  # the fused kernels ran, not a silent fallback
    assert _rel(out.float(), ref(q, k, v).float()) < 2e-2


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(_interpret_all()))


def test_blind_queries_match_brute_force():
    """Rows whose dO is zeroed in the Triton backward are exactly those that see no real key."""
    from protein_lm.attention.ops.favor_triton import _blind_queries

    g = torch.Generator().manual_seed(5)
    pad = torch.rand(4, 23, generator=g) < 0.6
    pad[0] = True  # a row that is all padding
    pad[1, :5] = True  # leading padding
    for causal in (False, True):
        got = _blind_queries(pad, causal)
        for b in range(pad.shape[0]):
            for t in range(pad.shape[1]):
                keys = range(t + 1) if causal else range(pad.shape[1])
                assert bool(got[b, t]) == all(bool(pad[b, s]) for s in keys), (causal, b, t)


def test_torch_deterministic_switch_selects_the_atomic_free_kernels():
    from protein_lm.attention.ops.favor_triton import _Plan

    q, proj = torch.zeros(1, 2, 256, 16), torch.zeros(64, 16)
    args = (q, proj, "softmax", True, 1e-30, 16, None, None, 16)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        det = _Plan(*args)
        torch.use_deterministic_algorithms(False)
        fast = _Plan(*args)
    finally:
        torch.use_deterministic_algorithms(before)
    assert not det.atomic and fast.atomic and not _Plan(*args, deterministic=True).atomic
    # deterministic programs walk all 4 slices; atomic ones one each: 4x the programs per split
    assert (det.per_split, fast.per_split) == (1, 4)


def test_bad_logit_precision_is_refused_by_name():
    from protein_lm.attention.ops.favor_triton import favor_attention_triton

    x = torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="logit_precision must be one of"):
        favor_attention_triton(x, x, x, torch.zeros(16, 16), logit_precision="fp32")


def test_slice_width_choice_and_bad_geometry():
    """Slices: the widest of 64/32/16 dividing M; a split that is not whole tiles is refused (a partial
    last tile would run into the next split and add its rows twice)."""
    from protein_lm.attention.ops.favor_triton import _Plan, _slice_width

    assert [_slice_width(m) for m in (256, 192, 96, 48, 16, 24, 8)] == [64, 64, 32, 16, 16, None, None]
    assert _slice_width(256, 32) == 32 and _slice_width(256, 128) is None and _slice_width(96, 64) is None
    q = torch.zeros(1, 1, 100, 16)
    proj = torch.zeros(64, 16)
    for kw, match in (
        ({"walk_split": 40}, "walk_split"),
        ({"state_split": 24}, "state_split"),
        ({"tile": 24}, "tile"),
        ({"slice_m": 128}, "slice width"),
    ):
        args = {"tile": 16, "state_split": None, "walk_split": None, "slice_m": None, **kw}
        with pytest.raises(ValueError, match=match):
            _Plan(
                q,
                proj,
                "softmax",
                True,
                1e-30,
                args["tile"],
                args["state_split"],
                args["walk_split"],
                args["slice_m"],
            )
    plan = _Plan(q, proj, "softmax", True, 1e-30, 16, None, 32, None)
    assert (plan.BM, plan.NS, plan.split, plan.n_split) == (64, 1, 32, 4)
