"""exact_attention (SDPA) against an explicit softmax written out in float64."""

from __future__ import annotations

import pytest
import torch

from protein_lm.attention import exact_attention
from tests.helpers.references import allowed_pairs


def explicit_softmax(q, k, v, causal=False, key_padding_mask=None):
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    lq, lk = s.shape[-2:]
    allowed = allowed_pairs(q.shape[0], lq, lk, causal, key_padding_mask)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return p @ v.double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_explicit_softmax(causal, padded):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    mask = None
    if padded:
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[1, 5:] = True
    out = exact_attention(q, k, v, causal=causal, key_padding_mask=mask)
    ref = explicit_softmax(q, k, v, causal, mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_padding_invariance_and_empty_rows():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, False, False, False, True]])  # left padding: query 0 sees no key
    out = exact_attention(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.isfinite(out).all() and (out[:, :, 0] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # real outputs equal those of the unpadded sequence
    ref = exact_attention(q[:, :, 1:5], k[:, :, 1:5], v[:, :, 1:5], causal=True)
    torch.testing.assert_close(out[:, :, 1:5], ref)
