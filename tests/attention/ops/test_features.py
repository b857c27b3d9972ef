"""Projection draws and feature maps against closed forms (float64 references)."""

from __future__ import annotations

import math

import pytest
import torch

from protein_lm.attention import draw_projection, relu_features, softmax_features


def test_orthogonal_blocks_have_orthogonal_rows_and_chi_norms():
    d, m = 16, 40  # 3 blocks, the last one truncated to 8 rows
    w = draw_projection(
        m, d, orthogonal=True, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert w.shape == (m, d)
    for start in range(0, m, d):
        block = w[start : start + d]
        unit = block / block.norm(dim=1, keepdim=True)
        gram = unit @ unit.T
        torch.testing.assert_close(gram, torch.eye(len(block), dtype=torch.float64), atol=1e-12, rtol=0)
    # rows of different blocks are independent, hence not orthogonal
    u = w / w.norm(dim=1, keepdim=True)
    assert (u[:d] @ u[d : 2 * d].T).abs().max() > 0.1


def test_row_norms_are_chi_distributed():
    d = 8
    w = draw_projection(
        8192, d, orthogonal=True, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    sq = w.square().sum(1)  # chi^2(d): mean d, variance 2d
    assert abs(sq.mean().item() - d) < 4 * math.sqrt(2 * d / len(sq))
    assert abs(sq.var().item() - 2 * d) < 0.15 * 2 * d
    iid = draw_projection(
        8192, d, orthogonal=False, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    assert abs(iid.square().sum(1).mean().item() - d) < 4 * math.sqrt(2 * d / 8192)


def test_draw_is_reproducible_from_generator():
    a = draw_projection(64, 16, generator=torch.Generator().manual_seed(7))
    b = draw_projection(64, 16, generator=torch.Generator().manual_seed(7))
    c = draw_projection(64, 16, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32


def test_softmax_features_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    xs = x * 8**-0.25
    ref = torch.exp(xs @ w.T - 0.5 * xs.square().sum(-1, keepdim=True)) / math.sqrt(12)
    torch.testing.assert_close(softmax_features(x, w, is_query=True, stabilize=False), ref)
    # stabilised versions differ from ref by a per-query (resp. per-(b,h)) positive factor only
    pq = softmax_features(x, w, is_query=True)
    ratio_q = pq / ref
    torch.testing.assert_close(ratio_q, ratio_q[..., :1].expand_as(ratio_q))
    assert torch.allclose(pq.amax(-1), torch.full_like(pq.amax(-1), 12**-0.5))
    pk = softmax_features(x, w, is_query=False)
    ratio_k = pk / ref
    torch.testing.assert_close(ratio_k, ratio_k[..., :1, :1].expand_as(ratio_k))
    assert torch.allclose(pk.amax((-2, -1)), torch.full_like(pk.amax((-2, -1)), 12**-0.5))


def test_key_shift_ignores_padding_and_padded_keys_are_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, 4, generator=g)
    w = torch.randn(8, 4, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    huge = x.clone()
    huge[0, :, 4:] = 1e30  # would dominate (and overflow) the shared max if it entered it
    a = softmax_features(x, w, is_query=False, key_padding_mask=mask)
    b = softmax_features(huge, w, is_query=False, key_padding_mask=mask)
    torch.testing.assert_close(a, b)
    assert (b[0, :, 4:] == 0).all() and torch.isfinite(b).all()
    # the real keys of batch 0 are the same as without the padded positions at all
    c = softmax_features(x[:1, :, :4], w, is_query=False)
    torch.testing.assert_close(a[:1, :, :4], c)


def test_relu_features_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(relu_features(x, w), torch.relu(x @ w.T) + 1e-3)
    mask = torch.tensor([[False, False, True, False, True]])
    phi = relu_features(x, w, key_padding_mask=mask)
    assert (phi[:, :, [2, 4]] == 0).all()


@pytest.mark.parametrize("orthogonal", [True, False])
def test_softmax_kernel_estimate_is_unbiased(orthogonal):
    """Average of phi(q).phi(k) over many independent projections -> exp(q.k / sqrt(d))."""
    d, m, draws = 4, 16, 20000
    g = torch.Generator().manual_seed(3)
    q = 0.6 * torch.randn(1, 1, 3, d, generator=g, dtype=torch.float64)
    k = 0.6 * torch.randn(1, 1, 3, d, generator=g, dtype=torch.float64)
    exact = torch.exp(q[0, 0] @ k[0, 0].T / math.sqrt(d))
    # One matrix of draws*m rows = `draws` independent m-row projections (m is a multiple of d, so
    # each group of m rows is made of whole orthogonal blocks), evaluated in one vectorised pass.
    w = draw_projection(draws * m, d, orthogonal, generator=g, dtype=torch.float64)
    pq = softmax_features(q, w, is_query=True, stabilize=False)[0, 0] * math.sqrt(draws * m / m)
    pk = softmax_features(k, w, is_query=False, stabilize=False)[0, 0] * math.sqrt(draws * m / m)
    est = torch.einsum("idm,jdm->dij", pq.view(3, draws, m), pk.view(3, draws, m))  # (draws, 3, 3)
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    z = (mean - exact) / se
    assert z.abs().max() < 4.5, (mean, exact, se)
    assert ((mean - exact).abs() / exact).max() < 0.05


def test_features_are_float32_under_bf16_autocast_and_finite_for_huge_norms():
    g = torch.Generator().manual_seed(0)
    w = draw_projection(32, 16, generator=g)
    x = (300 * torch.randn(1, 2, 64, 16, generator=g)).bfloat16()  # |x'|^2/2 ~ 2e5: exp would overflow
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pq = softmax_features(x, w, is_query=True)
        pk = softmax_features(x, w, is_query=False)
        pr = relu_features(x, w)
    for phi in (pq, pk, pr):
        assert phi.dtype == torch.float32 and torch.isfinite(phi).all()
    assert (pq > 0).any(-1).all()  # every query keeps its max feature (= 1/sqrt(M))


def test_iid_rows_are_not_orthogonal_within_a_block():
    """orthogonal=False must really draw i.i.d. rows (cosines spread like 1/sqrt(d), not zeros)."""
    d = 16
    w = draw_projection(d, d, orthogonal=False, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = w / w.norm(dim=1, keepdim=True)
    off_diagonal = (u @ u.T)[~torch.eye(d, dtype=torch.bool)]
    assert off_diagonal.abs().max() > 0.3
    assert 0.5 / math.sqrt(d) < off_diagonal.square().mean().sqrt() < 2.0 / math.sqrt(d)
