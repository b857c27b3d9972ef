"""Packed sequences (``segment_ids``): FAVOR+ attention stays inside each segment.

Checked against an explicit float64 ``L x L`` reference (closed-form unshifted features, mask =
same segment, not padding, and ``s <= t`` when causal), and against the property users rely on:
a protein packed with others gets the same outputs and gradients as when it runs alone.
CPU (CI): the PyTorch path directly; the Triton kernels under Triton's interpreter in a subprocess
(``--interpret``, tiny shapes). GPU (marker ``gpu``): the compiled kernels in bf16.
"""

from __future__ import annotations

import math

import pytest
import torch

from protein_lm.attention import FavorAttention, favor_bidirectional, favor_causal, favor_features
from protein_lm.attention.features import draw_projection, softmax_features
from protein_lm.attention.segments import segment_labels, segmented_linear_attention

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
    """``(phi_q phi_k^T (.) allowed) v / rowsum``, float64, with the L x L mask written out by loops."""
    b, _, length, _ = q.shape
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
        return favor_causal(pq, pk, v, pad, EPS, chunk, ids)
    return favor_bidirectional(pq, pk, v, pad, EPS, ids, chunk)


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
