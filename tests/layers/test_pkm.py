"""Product-key memory: exact search, EmbeddingBag read, sparse gradients, usage statistics."""

from __future__ import annotations

import math

import pytest
import torch

from protein_lm.layers.pkm import (
    PKMUsage,
    ProductKeyMemory,
    pkm_value_parameters,
    product_key_topk,
)


def test_topk_equals_brute_force():
    torch.manual_seed(0)
    heads, n, dq, k = 3, 11, 8, 5
    subkeys = torch.randn(heads, 2, n, dq // 2, dtype=torch.float64)
    query = torch.randn(40, heads, dq, dtype=torch.float64)
    scores, slots = product_key_topk(query, subkeys, k)
    # brute force: materialise all n^2 full keys [c1_a, c2_b] and score them
    full = torch.cat(
        [
            subkeys[:, 0][:, :, None, :].expand(-1, -1, n, -1),
            subkeys[:, 1][:, None, :, :].expand(-1, n, -1, -1),
        ],
        dim=-1,
    ).reshape(heads, n * n, dq)  # slot a*n + b
    all_scores = torch.einsum("thd,hsd->ths", query, full)
    ref_scores, ref_slots = all_scores.topk(k, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(slots, ref_slots)


def test_embedding_bag_equals_gather_and_sum():
    torch.manual_seed(1)
    pkm = ProductKeyMemory(dim=16, num_keys=6, topk=3, heads=2, key_dim=8).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    slots, weights = pkm.lookup(x)
    out = pkm(x)
    rows = pkm.values.weight[slots]  # (T, heads, k, dim)
    ref = (weights.double()[..., None] * rows).sum(dim=(1, 2)).view(2, 5, 16)
    torch.testing.assert_close(out, ref)


def test_only_retrieved_rows_get_gradient():
    torch.manual_seed(2)
    pkm = ProductKeyMemory(dim=8, num_keys=16, topk=2, heads=2, key_dim=8)
    x = torch.randn(1, 3, 8)
    slots, _ = pkm.lookup(x)
    pkm(x).pow(2).sum().backward()
    g = pkm.values.weight.grad
    touched = torch.zeros(256, dtype=torch.bool)
    touched[slots.reshape(-1)] = True
    assert (g[~touched] == 0).all()
    assert (g[touched].abs().sum(-1) > 0).all()
    assert pkm.keys.grad is not None and pkm.query_proj.weight.grad is not None


def test_padding_and_batchnorm_padding_aware():
    torch.manual_seed(3)
    pkm = ProductKeyMemory(dim=8, num_keys=8, topk=2, heads=1, key_dim=8, query_norm="batchnorm")
    pkm.train()
    x = torch.randn(2, 6, 8)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 3:] = True
    out1 = pkm(x, kpm)
    x2 = x.clone()
    x2[1, 3:] = 1e3  # garbage in padding must not change real outputs (statistics exclude it)
    out2 = pkm(x2, kpm)
    torch.testing.assert_close(out1[~kpm], out2[~kpm])
    assert (out1[kpm] == 0).all()


def test_usage_statistics():
    u = PKMUsage(size=100)
    slots = torch.tensor([[[0, 1]], [[0, 2]]])  # (T=2, heads=1, k=2)
    w = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    u.update(slots, w)
    s = u.compute()
    assert s["used"] == pytest.approx(0.03)
    # mass: slot0 = 0.5, slot1 = slot2 = 0.25
    p = torch.tensor([0.5, 0.25, 0.25])
    assert s["kl_uniform"] == pytest.approx(float((p * (p * 100).log()).sum()))
    assert s["top50"] == 1 and s["top90"] == 3 and s["top99"] == 3
    uniform = PKMUsage(size=4)
    uniform.update(torch.arange(4).view(4, 1, 1), torch.ones(4, 1, 1))
    assert uniform.compute()["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert uniform.compute()["top50"] == 2


def test_eval_forward_accumulates_usage_and_value_group():
    pkm = ProductKeyMemory(dim=8, num_keys=4, topk=2, heads=2, key_dim=4)
    pkm.usage = PKMUsage(pkm.size)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), pkm)
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 5, 8))
    assert pkm.usage.hits.sum() == 3 * 5 * 2 * 2
    assert pkm.usage.mass.sum().item() == pytest.approx(3 * 5 * 2)
    assert pkm_value_parameters(model)[0] is pkm.values.weight
    assert math.isfinite(pkm.usage.compute()["kl_uniform"])
