"""Packed sequences (``segment_ids``): FAVOR+ attention stays inside each segment.

Checked against an explicit float64 ``L x L`` reference (closed-form unshifted features, mask =
same segment, not padding, and ``s <= t`` when causal), and against the property users rely on:
a protein packed with others gets the same outputs and gradients as when it runs alone.
CPU (CI): the PyTorch path directly; the Triton kernels under Triton's interpreter in a subprocess
(``--interpret``, tiny shapes). GPU (marker ``gpu``): the compiled kernels in bf16.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from protein_lm.attention import FavorAttention, favor_bidirectional, favor_causal, favor_features
from protein_lm.attention.ops.features import draw_projection, softmax_features
from protein_lm.attention.ops.segments import segment_labels, segmented_linear_attention
from tests.helpers.interpreter import run_interpreted
from tests.helpers.references import same_with_nan_filled_scratch

EPS = 1e-30
KERNELS = ("softmax", "relu")


def _closed_form_features(x, w, kernel):
    """Unshifted features, float64, written out independently of protein_lm."""
    x, w = x.double(), w.double()
    if kernel == "relu":
        return torch.relu(x @ w.T) + 1e-3
    xs = x / x.shape[-1] ** 0.25
    return torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


def explicit_reference(q, k, v, w, kernel, causal, pad, ids):
    """``(phi_q phi_k^T (.) allowed) v / rowsum``, float64, with the L x L mask written out by loops.
    Padded queries are zeroed first (as FavorAttention does); one that sees no key outputs 0."""
    b, _, length, _ = q.shape
    if pad is not None:
        q = q.masked_fill(pad[:, None, :, None], 0.0)
    allowed = torch.zeros(b, 1, length, length, dtype=torch.float64)
    for i in range(b):
        for t in range(length):
            for s in range(length):
                same = all(int(ids[i, j]) == int(ids[i, t]) for j in range(min(s, t), max(s, t) + 1))
                real = pad is None or not bool(pad[i, s])
                allowed[i, 0, t, s] = float(same and real and (s <= t or not causal))
    a = _closed_form_features(q, w, kernel) @ _closed_form_features(k, w, kernel).transpose(-1, -2)
    a = a * allowed
    den = a.sum(-1, keepdim=True)
    return (a @ v.double()) / torch.where(den > 0, den, torch.ones_like(den))


def _packed_row(lengths, total, last_pad_id=None):
    """ids ``(total,)`` for segments of ``lengths`` then trailing padding, and the padding mask.
    ``last_pad_id=None``: padding carries the last segment's id; else its own id."""
    ids, pad = [], []
    for i, n in enumerate(lengths):
        ids += [i] * n
        pad += [False] * n
    rest = total - len(ids)
    ids += [len(lengths) - 1 if last_pad_id is None else last_pad_id] * rest
    pad += [True] * rest
    return torch.tensor(ids), torch.tensor(pad)


def _batch(rows, total):
    """``rows``: list of (lengths, last_pad_id) -> ids (B, L) int64, pad (B, L) bool."""
    made = [_packed_row(lengths, total, lp) for lengths, lp in rows]
    return torch.stack([r[0] for r in made]), torch.stack([r[1] for r in made])


def _qkv(b, h, length, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(4)]


def _torch_path(q, k, v, w, kernel, causal, pad, ids, chunk):
    pq, pk = favor_features(q, k, w, kernel, pad, ids)
    if causal:
        return favor_causal(pq, pk, v, pad, EPS, segment_ids=ids, chunk_size=chunk)
    return favor_bidirectional(pq, pk, v, pad, EPS, segment_ids=ids, chunk_size=chunk)


def _grads(fn, q, k, v, do, real):
    """Output and input gradients of ``sum(out * do)`` over real positions."""
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*ins)
    (out * do * real).sum().backward()
    return [out.detach() * real] + [t.grad for t in ins]


# Two rows, different segmentations: segments crossing 8-token chunks, length-1 segments, 4 segments
# in one chunk, trailing padding with the last id (row 0) and with its own id (row 1).
ROWS = [([3, 1, 1, 9, 12, 1, 4], None), ([17, 6, 1, 2], 9)]
LENGTH = 37


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [8, 128])
def test_reference_path_matches_explicit_masked_quadratic(kernel, causal, chunk):
    ids, pad = _batch(ROWS, LENGTH)
    q, k, v, do = _qkv(2, 2, LENGTH, 8, seed=1)
    w = draw_projection(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    real = (~pad)[:, None, :, None].double()
    got = _grads(lambda a, b, c: _torch_path(a, b, c, w, kernel, causal, pad, ids, chunk), q, k, v, do, real)
    ref = _grads(lambda a, b, c: explicit_reference(a, b, c, w, kernel, causal, pad, ids), q, k, v, do, real)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_explicit_reference_mask_is_a_segment_mask():
    """The reference itself: with equal features, each query averages the values of its segment."""
    ids, pad = _batch(ROWS, LENGTH)
    q, k, v, _ = _qkv(2, 1, LENGTH, 8, seed=3)
    w = torch.zeros(16, 8, dtype=torch.float64)  # every feature equal: uniform weights inside the mask
    out = explicit_reference(q, k, v, w, "relu", False, pad, ids)
    torch.testing.assert_close(out[0, 0, 4], v[0, 0, 4])
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, :3].mean(0))
    torch.testing.assert_close(out[1, 0, 24], v[1, 0, 24:26].mean(0))
    assert torch.all(out[1, 0, 30] == 0)  # padding with its own id: no key to see


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_separate(kernel, causal):
    """Each protein alone (its own row, no segments, no padding) == the same protein packed with
    others, for outputs and all input gradients (FavorAttention, PyTorch backend, float64)."""
    lengths = [7, 1, 13, 5, 2]
    total = 32
    ids, pad = _packed_row(lengths, total)
    ids, pad = ids[None], pad[None]
    q, k, v, do = _qkv(1, 2, total, 8, seed=4)
    attn = FavorAttention(8, 16, kernel=kernel, causal=causal, seed=5, chunk_size=4, backend="torch")
    real = (~pad)[:, None, :, None].double()
    packed = _grads(lambda a, b, c: attn(a, b, c, pad, ids), q, k, v, do, real)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = _grads(
            lambda a, b, c: attn(a, b, c), q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl], 1.0
        )
        for name, a, b in zip(("out", "dq", "dk", "dv"), packed, alone, strict=True):
            torch.testing.assert_close(a[:, :, sl], b, rtol=1e-10, atol=1e-12, msg=f"{name} at {sl}")
        start += n
    for t in packed[1:]:  # padding gets no gradient
        assert torch.all(t[:, :, total - 4 :] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_quiet_segment_keeps_a_nonzero_normaliser(causal):
    """A segment whose key logits sit ~200 nats below another segment's: a row-wide key shift
    underflows all its float32 features to 0 (checked), the per-segment shift keeps them exact."""
    length, d, m = 24, 8, 16
    ids = torch.tensor([[0] * 12 + [1] * 12])
    q, k, v, _ = _qkv(1, 1, length, d, seed=6, dtype=torch.float32)
    direction = torch.nn.functional.normalize(
        torch.randn(d, generator=torch.Generator().manual_seed(7)), dim=0
    )
    k[..., 12:, :] = 40.0 * direction + 0.1 * k[..., 12:, :]  # large |k|: u - |k'|^2/2 ~ -200
    w = draw_projection(m, d, generator=torch.Generator().manual_seed(8))
    row_wide = softmax_features(k, w, is_query=False)
    assert torch.all(row_wide[..., 12:, :] == 0)  # the failure a single shift per row would cause
    out = _torch_path(q, k, v, w, "softmax", causal, None, ids, 128)
    ref = explicit_reference(q.double(), k.double(), v.double(), w.double(), "softmax", causal, None, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-4)
    assert out[..., 12:, :].abs().sum() > 1.0  # not the 0 of an underflowed normaliser


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_one_segment_per_row_equals_unsegmented(kernel, causal):
    q, k, v, _ = _qkv(2, 2, 300, 8, seed=9)
    pad = torch.zeros(2, 300, dtype=torch.bool)
    pad[0, 280:] = True
    ids = torch.full((2, 300), 5, dtype=torch.int32)
    w = draw_projection(16, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    seg = _torch_path(q, k, v, w, kernel, causal, pad, ids, 64)
    plain = _torch_path(q, k, v, w, kernel, causal, pad, None, 64)
    torch.testing.assert_close(seg, plain, rtol=1e-10, atol=1e-12)


def test_no_segments_is_bitwise_the_plain_formula():
    """``segment_ids=None`` runs the unsegmented code: bitwise the plain formulas (float32)."""
    q, k, v, _ = _qkv(2, 2, 200, 8, seed=11, dtype=torch.float32)
    w = draw_projection(16, 8, generator=torch.Generator().manual_seed(12))
    pq, pk = favor_features(q, k, w, "softmax")
    assert torch.equal(pq, softmax_features(q, w, is_query=True))
    assert torch.equal(pk, softmax_features(k, w, is_query=False))
    num = pq @ (pk.transpose(-1, -2) @ v)
    den = (pq @ pk.sum(dim=-2).unsqueeze(-1)).clamp_min(EPS)
    assert torch.equal(favor_bidirectional(pq, pk, v), num / den)


def test_segmented_primitive_gradcheck_and_block_boundaries():
    """The chunked primitive (all three windows) against the masked quadratic form, with blocks of one
    chunk (state carried between blocks) and of many; gradcheck of its recomputing backward."""
    g = torch.Generator().manual_seed(13)
    q, k = (torch.randn(2, 2, 23, 3, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, 23, 2, generator=g, dtype=torch.float64)
    ids = torch.tensor([[0] * 9 + [1] + [2] * 13, [0] * 2 + [1] * 3 + [2] * 18])
    lab = segment_labels(ids)[:, None]
    same = lab[..., :, None] == lab[..., None, :]
    for window, tri in (("causal", torch.tril), ("anticausal", torch.triu), ("both", lambda x: x)):
        ref = ((q @ k.transpose(-1, -2)) * tri(same)) @ v
        for block_bytes in (1, None):
            out = segmented_linear_attention(q, k, v, lab, window, chunk=4, block_bytes=block_bytes)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        ins = [t[:1, :1, :11].clone().requires_grad_() for t in (q, k, v)]
        fn = lambda a, b, c, w=window: segmented_linear_attention(a, b, c, lab[:1, :, :11], w, 3, 1)  # noqa: E731
        assert torch.autograd.gradcheck(fn, ins)


def test_labels_are_runs_and_bad_ids_are_refused():
    ids = torch.tensor([[7, 7, 9, 9, 9, 2, 2], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.int32)
    assert segment_labels(ids).tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1]]
    assert torch.equal(segment_labels(segment_labels(ids)), segment_labels(ids))
    with pytest.raises(ValueError, match="integer"):
        segment_labels(ids.float())
    with pytest.raises(ValueError, match="length"):
        segment_labels(ids, 9)


# ------------------------------------------------------------------------- Triton kernels (interpreter)
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _triton_grads(q, k, v, do, w, kernel, causal, pad, ids, **kw):
    """Output and input gradients of ``sum(out * do)`` through ``favor_attention_triton``."""
    from protein_lm.attention.ops.favor_triton import favor_attention_triton

    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = favor_attention_triton(*ins, w, kernel, causal, pad, EPS, ids, **kw)
    out.backward(do)
    return [out.detach()] + [t.grad for t in ins]


# tiles of 16 rows, walks and state splits of 32 (segments cross both), M = 32 in two slices
GEOMETRY = dict(tile=16, state_split=32, walk_split=32, slice_m=16)
# Row 0: segments crossing tiles and splits, 5 segments in the first tile, length-1 ones, trailing
# padding with the last id. Row 1: one segment over two splits, short ones, padding with its own id.
TRITON_ROWS = [([3, 1, 1, 9, 12, 1, 20, 5], None), ([40, 6, 1, 2], 9)]
TRITON_LENGTH = 70


def _triton_vs_explicit(kernel, causal, deterministic, precision=None) -> dict:
    ids, pad = _batch(TRITON_ROWS, TRITON_LENGTH)
    q, k, v, do = _qkv(
        2, 2, TRITON_LENGTH, 16, seed=20 + 2 * causal + (kernel == "relu"), dtype=torch.float32
    )
    w = draw_projection(32, 16, generator=torch.Generator().manual_seed(21))
    kw = dict(deterministic=deterministic, logit_precision=precision, **GEOMETRY)
    got = _triton_grads(q, k, v, do, w, kernel, causal, pad, ids, **kw)
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = explicit_reference(*ref_ins, w.double(), kernel, causal, pad, ids)
    ref.backward(do.double())
    refs = [ref.detach()] + [t.grad for t in ref_ins]
    res = {name: _rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, refs, strict=True)}
    res["finite"] = all(bool(torch.isfinite(t).all()) for t in got)
    return res


def _triton_packed_vs_separate(kernel, causal) -> dict:
    """Max relative difference between each protein packed (with others, padding at the end) and
    alone (its own row, no segments), outputs and gradients, both through the kernels."""
    lengths, total = [7, 1, 13, 5, 2, 20], 56
    ids, pad = _packed_row(lengths, total)
    ids, pad = ids[None], pad[None]
    q, k, v, do = _qkv(1, 1, total, 16, seed=22 + causal, dtype=torch.float32)
    do = do * (~pad)[:, None, :, None]  # padded queries' outputs are nobody's loss
    w = draw_projection(32, 16, generator=torch.Generator().manual_seed(23))
    packed = _triton_grads(q, k, v, do, w, kernel, causal, pad, ids, **GEOMETRY)
    worst, start = 0.0, 0
    for n in lengths:
        sl = slice(start, start + n)
        parts = [t[:, :, sl] for t in (q, k, v, do)]
        alone = _triton_grads(*parts, w, kernel, causal, None, None, **GEOMETRY)
        for a, b, whole in zip(packed, alone, packed, strict=True):
            # a length-1 protein's dq, dk are 0 up to rounding: errors relative to the row's scale there
            scale = max(b.double().norm().item(), 1e-2 * whole.double().norm().item())
            worst = max(worst, (a[:, :, sl].double() - b.double()).norm().item() / scale)
        start += n
    return {"worst": worst, "pad_grads_zero": all(bool((t[:, :, start:] == 0).all()) for t in packed[1:])}


def _triton_one_segment(causal) -> dict:
    """One segment per row (ids all equal, int32) against the unsegmented kernels."""
    q, k, v, do = _qkv(2, 1, 50, 16, seed=24, dtype=torch.float32)
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[1, 41:] = True
    w = draw_projection(32, 16, generator=torch.Generator().manual_seed(25))
    ids = torch.full((2, 50), 3, dtype=torch.int32)
    seg = _triton_grads(q, k, v, do, w, "softmax", causal, pad, ids, **GEOMETRY)
    plain = _triton_grads(q, k, v, do, w, "softmax", causal, pad, None, **GEOMETRY)
    return {"worst": max(_rel(a, b) for a, b in zip(seg, plain, strict=True))}


def _triton_quiet_segment(causal) -> dict:
    """The per-segment key shift inside the kernels: a segment ~200 nats below the other."""
    length = 32
    ids = torch.tensor([[0] * 16 + [1] * 16])
    q, k, v, do = _qkv(1, 1, length, 16, seed=26, dtype=torch.float32)
    direction = torch.nn.functional.normalize(
        torch.randn(16, generator=torch.Generator().manual_seed(27)), dim=0
    )
    k[..., 16:, :] = 40.0 * direction + 0.1 * k[..., 16:, :]
    w = draw_projection(32, 16, generator=torch.Generator().manual_seed(28))
    out = _triton_grads(q, k, v, do, w, "softmax", causal, None, ids, **GEOMETRY)[0]
    ref = explicit_reference(q.double(), k.double(), v.double(), w.double(), "softmax", causal, None, ids)
    return {"rel": _rel(out[..., 16:, :], ref[..., 16:, :]), "finite": bool(torch.isfinite(out).all())}


def _triton_uninitialised_buffers(causal) -> dict:
    """Every ``torch.empty`` buffer (state slots, split parts, sums) filled with NaN: results equal a
    normal run bitwise, so no slot or part is read that was not written first."""
    ids, pad = _batch(TRITON_ROWS, TRITON_LENGTH)
    q, k, v, do = _qkv(2, 1, TRITON_LENGTH, 16, seed=29, dtype=torch.float32)
    w = draw_projection(32, 16, generator=torch.Generator().manual_seed(30))

    def run():
        return _triton_grads(q, k, v, do, w, "softmax", causal, pad, ids, **GEOMETRY)

    return {"equal": same_with_nan_filled_scratch(run)}


def _triton_compiled(causal) -> dict:
    """The registered ops with segments: ``torch.library.opcheck``, then ``torch.compile`` against
    the eager path."""
    import torch._dynamo

    from protein_lm.attention.ops import favor_triton as ft

    ids, pad = _batch([([3, 1, 20, 6], None)], 40)  # short and long segments, trailing padding
    q, k, v, do = _qkv(1, 1, 40, 16, seed=31, dtype=torch.float32)
    w = draw_projection(32, 16, generator=torch.Generator().manual_seed(32))
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(
        ft._forward_op, (*ins, w, pad, ids, "relu", causal, EPS, 16, 32, 32, 16, None, False)
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ft.favor_attention_triton, backend="aot_eager")
    results = []
    for f in (compiled, ft.favor_attention_triton):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*ins, w, "softmax", causal, pad, EPS, ids, **GEOMETRY)
        out.backward(do)
        results.append([out.detach()] + [t.grad for t in ins])
    return {
        "diff": max(_rel(a, b) for a, b in zip(*results, strict=True)),
        "breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
    }


def _layout_and_segment_max() -> dict:
    """The kernels' segment layout (labels, per-tile first / last segment bounds) and per-segment max
    against loops over the rows, with blocks of 1024 rows crossed by segments (L = 2100)."""
    from protein_lm.attention.ops.favor_triton import _segment_layout, _segment_max_kernel

    g = torch.Generator().manual_seed(33)
    length, tile = 2100, 16
    ids = torch.stack(
        [
            torch.randint(0, 3, (length,), generator=g).bool().cumsum(0) * 7,  # many short runs
            torch.arange(length) // 1100,  # runs across the 1024-row blocks
            torch.randint(0, 40, (length,), generator=g) // 39,  # non-monotone ids: runs of 0 and 1
        ]
    )
    lab, tab = _segment_layout(ids, tile)
    ok_lab = ok_tab = True
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        want = [0]
        for t in range(1, length):
            want.append(want[-1] + (row[t] != row[t - 1]))
        ok_lab &= lab[b].tolist() == want

        def bounds(t, want=want):
            s = t
            while s > 0 and want[s - 1] == want[t]:
                s -= 1
            e = t
            while e < length - 1 and want[e + 1] == want[t]:
                e += 1
            return s, e

        for i, r0 in enumerate(range(0, length, tile)):
            r1 = min(r0 + tile, length) - 1
            ok_tab &= tab[b, i].tolist() == [*bounds(r0), *bounds(r1)]
    x = torch.randn(2 * ids.shape[0], length, generator=g)
    x[0, 100:300] = -1e30  # padding: a segment made of it keeps the fill value
    out = torch.empty_like(x)
    _segment_max_kernel[(x.shape[0],)](x, lab, out, 2, length, 0.5, 1024)
    ok_max = True
    for r in range(x.shape[0]):
        labs = lab[r // 2]
        for v in labs.unique():
            sel = labs == v
            m = x[r][sel].max().item()
            ok_max &= bool(torch.all(out[r][sel] == (m if m > -5e29 else 0.5)))
    return {"labels": ok_lab, "table": ok_tab, "max": ok_max}


def _interpret_all() -> dict:
    res = {"layout": _layout_and_segment_max()}
    for kernel in KERNELS:
        for causal in (False, True):
            for det in (False, True) if causal else (False,):
                res[f"explicit-{kernel}-{causal}-{det}"] = _triton_vs_explicit(kernel, causal, det)
    for causal in (False, True):
        # the hi/lo split projection of bf16 inputs (float32 here: the interpreter cannot multiply bf16)
        res[f"explicit-split-{causal}"] = _triton_vs_explicit("softmax", causal, False, "split")
        res[f"separate-{causal}"] = _triton_packed_vs_separate("softmax", causal)
        res[f"one-{causal}"] = _triton_one_segment(causal)
        res[f"quiet-{causal}"] = _triton_quiet_segment(causal)
        res[f"nan-{causal}"] = _triton_uninitialised_buffers(causal)
        res[f"op-{causal}"] = _triton_compiled(causal)
    res["separate-relu-False"] = _triton_packed_vs_separate("relu", False)
    return res


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(_interpret_all()))


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


TRITON_CASES = [
    (kernel, causal, det)
    for kernel in KERNELS
    for causal in (False, True)
    for det in ((False, True) if causal else (False,))
]


@pytest.mark.parametrize(
    "case", TRITON_CASES, ids=lambda c: f"{c[0]}-{'causal' if c[1] else 'bid'}{'-det' if c[2] else ''}"
)
def test_interpreted_kernels_match_explicit_reference(interpreted, case):
    r = interpreted["explicit-{}-{}-{}".format(*case)]
    assert r["finite"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r)


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_split_projection_with_segments(interpreted, causal):
    r = interpreted[f"explicit-split-{causal}"]
    assert r["finite"]
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (key, r)


@pytest.mark.parametrize("key", ["separate-False", "separate-True", "separate-relu-False"])
def test_interpreted_packed_equals_separate(interpreted, key):
    r = interpreted[key]
    assert r["worst"] < 1e-5, r
    assert r["pad_grads_zero"], r


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_one_segment_equals_unsegmented(interpreted, causal):
    assert interpreted[f"one-{causal}"]["worst"] < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_quiet_segment_per_segment_shift(interpreted, causal):
    r = interpreted[f"quiet-{causal}"]
    assert r["finite"] and r["rel"] < 1e-4, r


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_unwritten_slots_are_never_read(interpreted, causal):
    assert interpreted[f"nan-{causal}"]["equal"]


def test_interpreted_segment_layout_and_segment_max(interpreted):
    assert interpreted["layout"] == {"labels": True, "table": True, "max": True}


@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_registered_op_with_segments(interpreted, causal):
    r = interpreted[f"op-{causal}"]
    assert r["diff"] < 1e-5 and r["breaks"] == 0, r


# --------------------------------------------------------------------------------------------- GPU
def _random_packing(total, n_segments, seed):
    """Random segment lengths (a few of them shorter than a tile, one of length 1) filling most of
    ``total``; the rest is trailing padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(n_segments, generator=g) * 2 + 0.2).tolist()
    scale = 0.92 * total / sum(lengths)
    lengths = [max(1, int(x * scale)) for x in lengths]
    lengths[2], lengths[5], lengths[9] = 1, 17, 40  # short segments (inside one 64-row tile or two)
    return lengths


GPU_SHAPE = (2, 8, 4096, 64, 256)  # B, H, L, D, M


def _gpu_case(
    kernel, causal, deterministic=None, seed=0, device="cuda", shape=GPU_SHAPE, dtype=torch.bfloat16
):
    """``(out, dq, dk, dv)`` of the kernels on a random packing, and the inputs. ``device``, ``shape``
    and ``dtype`` let the same code run small on the CPU under the interpreter."""
    from protein_lm.attention.ops.favor_triton import favor_attention_triton

    b, h, length, d, m = shape
    rows = [(_random_packing(length, 15, seed), None), (_random_packing(length, 14, seed + 1), 99)]
    ids, pad = (t.to(device) for t in _batch(rows, length))
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, length, d, device=device, generator=g).to(dtype) for _ in range(4))
    do = do * (~pad)[:, None, :, None]
    w = draw_projection(m, d, generator=torch.Generator().manual_seed(seed)).to(device)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = favor_attention_triton(*ins, w, kernel, causal, pad, EPS, ids, deterministic=deterministic)
    out.backward(do)
    got = [out.detach()] + [t.grad for t in ins]
    return got, (q, k, v, do, w, pad, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_packed_rows_match_reference(kernel, causal):
    """B=2, L=4096, H=8, D=64, M=256, ~15 random segments per row (short ones included), bf16 kernels
    against the PyTorch path in float32 on the same inputs."""
    for name, (finite, err) in _reference_errors(kernel, causal).items():
        assert finite, name
        assert err < 2e-2, (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_packed_equals_separate(causal):
    """Each protein alone through the kernels (no segments) against the same protein packed."""
    errors = _separate_errors(causal)
    assert len(errors) > 1
    for n, start, err in errors:
        assert err < 2e-2, (n, start)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_deterministic_packed_rows_are_bitwise_reproducible(causal):
    for bitwise, err_to_fast in _deterministic_runs(causal):
        assert bitwise
        assert err_to_fast < 1e-2


def _reference_errors(kernel, causal, **case) -> dict[str, tuple[bool, float]]:
    """``{out, dq, dk, dv: (all finite, relative error against the float32 PyTorch path)}``."""
    got, (q, k, v, do, w, pad, ids) = _gpu_case(kernel, causal, **case)
    real = (~pad)[:, None, :, None]
    ref_ins = [t.float().requires_grad_() for t in (q, k, v)]
    ref = _torch_path(*ref_ins, w, kernel, causal, pad, ids, 128)
    ref.backward(do.float())
    refs = [ref.detach() * real] + [t.grad for t in ref_ins]
    got[0] = got[0] * real
    return {name: (bool(torch.isfinite(a).all()), _rel(a, r))
            for name, a, r in zip(("out", "dq", "dk", "dv"), got, refs, strict=True)}


def _separate_errors(causal, **case) -> list[tuple[int, int, float]]:
    """``(length, start, relative error)`` of every output and gradient of every protein run alone
    against the same protein inside its packed row."""
    from protein_lm.attention.ops.favor_triton import favor_attention_triton

    got, (q, k, v, do, w, pad, ids) = _gpu_case("softmax", causal, seed=3, **case)
    lengths = _random_packing(q.shape[2], 15, 3)
    errors, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        ins = [t[:1, :, sl].clone().requires_grad_() for t in (q, k, v)]
        out = favor_attention_triton(*ins, w, "softmax", causal, None, EPS)
        out.backward(do[:1, :, sl])
        for a, b in zip(got, [out.detach()] + [t.grad for t in ins], strict=True):
            scale = max(b.float().norm().item(), 1e-2 * a[:1].float().norm().item())
            errors.append((n, start, (a[:1, :, sl].float() - b.float()).norm().item() / scale))
        start += n
    return errors


def _deterministic_runs(causal, **case) -> list[tuple[bool, float]]:
    """Per output and gradient: two deterministic runs bitwise equal, and their error to the fast mode."""
    first = _gpu_case("softmax", causal, deterministic=True, seed=5, **case)[0]
    second = _gpu_case("softmax", causal, deterministic=True, seed=5, **case)[0]
    fast = _gpu_case("softmax", causal, deterministic=False, seed=5, **case)[0]
    return [(torch.equal(a, b), _rel(a, c)) for a, b, c in zip(first, second, fast, strict=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_favor_module_passes_segments_to_triton(causal):
    """FavorAttention(backend="triton") with segments: the fused kernels run (no fallback warning)
    and agree with backend="torch"."""
    import warnings

    att = FavorAttention(64, 256, causal=causal, backend="triton", seed=0).cuda()
    ref = FavorAttention(64, 256, causal=causal, backend="torch", seed=0).cuda()
    ids, pad = (t.cuda() for t in _batch([([300, 5, 700, 20], None), ([1000, 24], 7)], 1100))
    q, k, v = (torch.randn(2, 4, 1100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = att(q, k, v, pad, ids)
    real = (~pad)[:, None, :, None]
    assert _rel(out.float() * real, ref(q, k, v, pad, ids).float() * real) < 2e-2
