"""Attention -> amino-acid similarity: synthetic attention patterns with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_lm.analysis.blosum import blosum62
from protein_lm.analysis.similarity import (
    SimilarityAccumulator,
    SimilarityResult,
    aggregate_similarity,
    similarity_from_mass,
    type_mass,
    uniform_mass,
)
from protein_lm.data.tokenizer import STANDARD_AA, encode

IDX = STANDARD_AA.index


def _rows_normalised(a: torch.Tensor) -> torch.Tensor:
    return a / a.sum(-1, keepdim=True)


def _framed_ids(residues: str) -> torch.Tensor:
    return torch.tensor([encode(residues)], dtype=torch.long)  # <cls> residues <eos>


def test_uniform_attention_gives_zero_similarity_and_ignores_specials():
    """Uniform attention over residues = independence = log odds 0, whatever the composition.

    The <cls>/<eos> rows attend only to D, the residue rows leak mass to <cls>/<eos> and to X; none of
    that may enter the matrix.
    """
    residues = "ACDEFGHIKLMNPQRSTVWY" + "DDDEEKKKKLLLLLAW" + "X"
    ids = _framed_ids(residues)
    L = ids.shape[1]
    real = torch.zeros(L, dtype=torch.bool)
    real[1:-2] = True  # standard residues (not <cls>, not the X, not <eos>)
    attn = torch.zeros(1, 2, L, L, dtype=torch.float64)
    attn[0, :, :, real] = 0.7 / real.sum()
    attn[0, :, :, 0] = 0.1  # <cls>
    attn[0, :, :, -1] = 0.1  # <eos>
    attn[0, :, :, -2] = 0.1  # X
    attn[0, :, 0, :] = 0.0
    attn[0, :, 0, 1 + residues.index("D")] = 1.0  # <cls> row: all on one D
    attn[0, :, -1, :] = attn[0, :, 0, :]
    assert torch.allclose(attn.sum(-1), torch.ones(1, 2, L, dtype=torch.float64))
    mass = type_mass(attn, ids)
    assert mass.shape == (2, 20, 20)
    counts = np.array([residues.count(a) for a in STANDARD_AA], dtype=np.float64)
    np.testing.assert_allclose(mass[0], 0.7 * np.outer(counts, counts) / real.sum().item())
    sim = similarity_from_mass(mass)
    np.testing.assert_allclose(sim, 0.0, atol=1e-12)


def test_known_pattern_is_recovered_exactly():
    """Attention built from a joint distribution Q with equal marginals gives S = log2(1 + eps*C)."""
    eps = 0.5
    c = np.zeros((20, 20))
    for a, b in (("D", "E"), ("F", "Y"), ("I", "V")):
        i, j = IDX(a), IDX(b)
        c[i, j] = c[j, i] = 1.0
        c[i, i] = c[j, j] = -1.0  # keeps every row sum of Q equal
    q = (1.0 + eps * c) / 400.0
    residues = STANDARD_AA[::-1]  # a permutation: each type once, not in ARND order
    ids = _framed_ids(residues)
    L = ids.shape[1]
    attn = torch.zeros(1, 1, L, L, dtype=torch.float64)
    for i, a in enumerate(residues):
        for j, b in enumerate(residues):
            attn[0, 0, i + 1, j + 1] = q[IDX(a), IDX(b)]
    attn[0, 0, 0, 0] = attn[0, 0, -1, -1] = 1.0  # specials attend to themselves
    attn = _rows_normalised(attn)
    sim = similarity_from_mass(type_mass(attn, ids))[0]
    expected = np.log2(1.0 + eps * c)
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    assert sim[IDX("D"), IDX("E")] == pytest.approx(np.log2(1.5))
    assert sim[IDX("D"), IDX("D")] == pytest.approx(np.log2(0.5))
    assert sim[IDX("A"), IDX("R")] == pytest.approx(0.0)


def test_symmetrisation_and_hand_computed_case():
    """Directed attention D->E only: symmetrised P = [[0, .5], [.5, 0]] on (D, E) -> S(D,E) = log2 2 = 1."""
    ids = _framed_ids("DE")
    attn = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    attn[0, 0, 1, 2] = 1.0  # D attends E
    attn[0, 0, 2, 2] = 1.0  # E attends E (self)
    attn[0, 0, 0, 0] = attn[0, 0, 3, 3] = 1.0
    mass = type_mass(attn, ids)[0]
    assert mass[IDX("D"), IDX("E")] == 1.0 and mass[IDX("E"), IDX("E")] == 1.0 and mass.sum() == 2.0
    sim = similarity_from_mass(mass)
    # P: (D,E)=(E,D)=0.25, (E,E)=0.5 -> p_D=0.25, p_E=0.75
    assert sim[IDX("D"), IDX("E")] == pytest.approx(np.log2(0.25 / (0.25 * 0.75)))
    assert sim[IDX("E"), IDX("D")] == sim[IDX("D"), IDX("E")]
    assert sim[IDX("E"), IDX("E")] == pytest.approx(np.log2(0.5 / 0.75**2))
    assert sim[IDX("D"), IDX("D")] == -np.inf  # never observed
    assert np.isnan(sim[IDX("A"), IDX("A")])  # type absent
    finite = similarity_from_mass(mass, pseudocount=1e-3)
    assert np.all(np.isfinite(finite))


def test_row_blocks_add_up_to_the_full_map():
    torch.manual_seed(0)
    ids = _framed_ids("MKTAYIAKQRQISFVKSHFSRQDEEW")
    L = ids.shape[1]
    attn = torch.softmax(torch.randn(1, 3, L, L, dtype=torch.float64), -1)
    full = type_mass(attn, ids)
    blocks = sum(type_mass(attn[:, :, s : s + 7], ids[:, s : s + 7], ids) for s in range(0, L, 7))
    np.testing.assert_allclose(blocks, full, rtol=1e-12)


def test_accumulator_best_head_and_summary():
    """A head whose attention follows BLOSUM62 is found as the best head and ranks (D,E), (F,Y) high."""
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list(STANDARD_AA), size=300))
    ids = _framed_ids(seq)
    L = ids.shape[1]
    types = np.array([IDX(a) for a in seq])
    blosum_attn = np.full((L, L), 1e-6)
    blosum_attn[1:-1, 1:-1] = 2.0 ** (blosum62()[types][:, types] / 2.0)
    noise = rng.random((L, L))
    attn = torch.tensor(np.stack([noise, blosum_attn, noise.T]))[None]
    attn = _rows_normalised(attn)
    acc = SimilarityAccumulator(num_layers=2, num_heads=3)
    acc.add(1, attn, ids)
    acc.add(0, torch.flip(attn, dims=[1]), ids)
    acc.add_baseline(ids, exclude_self=False)
    acc.finish_sequence(1, residues=300)
    res = acc.result(pseudocount=1e-6)
    assert isinstance(res, SimilarityResult)
    assert res.per_head.shape == (2, 3, 20, 20) and res.pearson.shape == (2, 3)
    assert (res.best_layer, res.best_head) in {(1, 1), (0, 1)}
    assert res.pearson[res.best_layer, res.best_head] > 0.9
    assert res.pearson[1, 0] < 0.5
    np.testing.assert_allclose(res.per_head, np.swapaxes(res.per_head, -1, -2))
    summary = res.summary()
    for key in ("blosum62_pearson", "blosum62_spearman", "best_layer", "best_head", "rank_DE", "rank_FY"):
        assert key in summary
    assert summary["num_sequences"] == 1
    assert summary["rank_FY"] <= 10  # BLOSUM62(F,Y) = 3 is among its highest off-diagonal scores
    assert aggregate_similarity(res.mass).shape == (20, 20)
    assert summary["null"] == "uniform"
    assert acc.result(null="marginal").summary()["null"] == "marginal"
    with pytest.raises(ValueError, match="add_baseline"):
        SimilarityAccumulator(1, 1).result()


def test_self_attention_is_left_out_with_query_offset():
    """Half of every row on the position itself, half on the others: excluding self leaves the others."""
    ids = _framed_ids("DDEEK")
    L = ids.shape[1]
    others = (1.0 - torch.eye(L, dtype=torch.float64)) / (L - 1)
    attn = (0.5 * torch.eye(L, dtype=torch.float64) + 0.5 * others)[None, None]
    kept = type_mass(attn, ids)[0]
    dropped = type_mass(attn, ids, query_offset=0)[0]
    np.testing.assert_allclose(dropped, type_mass(0.5 * others[None, None], ids)[0], atol=1e-12)
    assert kept[IDX("D"), IDX("D")] == pytest.approx(dropped[IDX("D"), IDX("D")] + 2 * 0.5)
    # Row blocks: the offset tells type_mass which key is each row's own position.
    blocks = type_mass(attn[:, :, :3], ids[:, :3], ids, query_offset=0) + type_mass(
        attn[:, :, 3:], ids[:, 3:], ids, query_offset=3
    )
    np.testing.assert_allclose(blocks[0], dropped, atol=1e-12)


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_uniform_mass_is_the_mass_of_uniform_attention(causal, exclude_self):
    """The closed form of the null equals type_mass of an explicit uniform attention (with padding)."""
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMDEFYX"]
    ids = torch.full((2, 24), 1, dtype=torch.long)  # <pad> = 1
    for i, s in enumerate(seqs):
        ids[i, : len(s) + 2] = torch.tensor(encode(s))
    pad = ids.eq(1)
    L = ids.shape[1]
    allowed = (~pad)[:, None, None, :].expand(2, 1, L, L).clone()
    if causal:
        allowed &= torch.ones(L, L, dtype=torch.bool).tril()
    attn = allowed.double() / allowed.double().sum(-1, keepdim=True)
    expected = sum(
        type_mass(attn[b : b + 1], ids[b : b + 1], query_offset=0 if exclude_self else None)[0]
        for b in range(2)
    )
    got = uniform_mass(ids, causal=causal, exclude_self=exclude_self)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_uniform_null_removes_composition():
    """Uniform attention over proteins of different composition: S = 0 under the uniform null, while
    the marginal null scores types that share proteins as similar (the compositional confound)."""
    seqs = ["DEDEEDKDEEDDE" * 3, "ILVFLIVVLFIL" * 3, "ACDEFGHIKLMNPQRSTVWY"]
    acc = SimilarityAccumulator(num_layers=1, num_heads=1)
    for s in seqs:
        ids = _framed_ids(s)
        L = ids.shape[1]
        attn = torch.full((1, 1, L, L), 1.0 / L, dtype=torch.float64)
        acc.add(0, attn, ids, query_offset=0)
        acc.add_baseline(ids, exclude_self=True)
        acc.finish_sequence()
    uniform = acc.result(null="uniform")
    finite = np.isfinite(uniform.per_head)
    np.testing.assert_allclose(uniform.per_head[finite], 0.0, atol=1e-12)
    marginal = acc.result(null="marginal").per_head[0, 0]
    assert marginal[IDX("D"), IDX("E")] > 0.5 and marginal[IDX("I"), IDX("V")] > 0.5
    assert marginal[IDX("D"), IDX("I")] < -0.5
