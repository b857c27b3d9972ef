"""Vig et al.'s statistic, the permutation p-value and the random-weight chance level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_lm.analysis.blosum import blosum62, off_diagonal
from protein_lm.analysis.chance import random_weights_like
from protein_lm.analysis.permutation import blosum_permutation_test, max_pearson_with_blosum
from protein_lm.analysis.vig import (
    VigAccumulator,
    VigResult,
    feature_correlation,
    head_features,
    key_type_sums,
)
from protein_lm.data.tokenizer import CLS_ID, EOS_ID, PAD_ID, STANDARD_AA, STANDARD_AA_IDS, TOKENS
from protein_lm.model import ModelConfig, ProteinLM


def _protein_with_every_type(repeats: int = 2) -> torch.Tensor:
    """(1, L) framed ids: <cls>, each standard residue `repeats` times, one X, <eos>, <pad>."""
    body = [t for _ in range(repeats) for t in STANDARD_AA_IDS] + [TOKENS.index("X")]
    return torch.tensor([[CLS_ID, *body, EOS_ID, PAD_ID]])


def test_known_head_features_give_their_correlation_exactly():
    """Attention built so that head h sends share F[h, b] of its residue-to-residue attention to type b
    (plus mass to <cls>/<eos>/X and to padding that must be ignored) -> corrcoef(F) exactly."""
    rng = np.random.default_rng(0)
    heads = 7
    F = rng.dirichlet(np.ones(20), size=heads)  # (H, 20) the features to recover
    ids = _protein_with_every_type()
    L = ids.shape[1]
    types = np.array([STANDARD_AA_IDS.index(t) if t in STANDARD_AA_IDS else -1 for t in ids[0].tolist()])
    attn = np.zeros((1, heads, L, L))
    residue_rows = [i for i, t in enumerate(ids[0].tolist()) if t not in (CLS_ID, EOS_ID, PAD_ID)]
    x_col = ids[0].tolist().index(TOKENS.index("X"))
    for h in range(heads):
        for i in range(L):
            attn[0, h, i, 0] = 0.1  # to <cls>: dropped
            attn[0, h, i, L - 2] = 0.1  # to <eos>: dropped
            attn[0, h, i, L - 1] = 0.1  # to padding: dropped
            for j in np.flatnonzero(types >= 0):
                attn[0, h, i, j] = 0.8 * F[h, types[j]] / 2  # each type occurs twice
    # X is a residue key: it enters the total. Give it nothing so the shares stay F exactly.
    assert attn[0, :, :, x_col].sum() == 0
    soft, exact = key_type_sums(torch.tensor(attn), ids, threshold=0.3)
    rows = len(residue_rows)
    np.testing.assert_allclose(soft[:, :20], 0.8 * F * rows, rtol=1e-12)
    features, kept = head_features(soft, min_total=1.0)
    assert kept.all()
    np.testing.assert_allclose(features, F, rtol=1e-12)
    expected = np.corrcoef(F.T)
    np.fill_diagonal(expected, np.nan)
    np.testing.assert_allclose(VigResult.from_sums(soft, min_total=1.0).matrix, expected, rtol=1e-10, atol=1e-12)
    assert np.isnan(np.diag(feature_correlation(F))).all()


def test_key_type_sums_match_an_explicit_loop():
    rng = np.random.default_rng(1)
    ids = torch.tensor(
        [[CLS_ID, *rng.choice(STANDARD_AA_IDS, 9).tolist(), TOKENS.index("X"), EOS_ID, PAD_ID, PAD_ID]]
        + [[CLS_ID, *rng.choice(STANDARD_AA_IDS, 12).tolist(), EOS_ID]]
    )
    B, L = ids.shape
    attn = torch.tensor(rng.dirichlet(np.ones(L) * 0.3, size=(B, 3, L)))  # peaky rows: some > 0.3
    soft, exact = key_type_sums(attn, ids, threshold=0.3)
    ref_soft = np.zeros((3, 21))
    ref_exact = np.zeros((3, 21))
    for b in range(B):
        for h in range(3):
            for i in range(L):
                for j in range(L):
                    ti, tj = TOKENS[int(ids[b, i])], TOKENS[int(ids[b, j])]
                    if ti.startswith("<") or tj.startswith("<"):
                        continue
                    col = STANDARD_AA.index(tj) if tj in STANDARD_AA else 20
                    w = float(attn[b, h, i, j])
                    ref_soft[h, col] += w
                    if w > 0.3:
                        ref_exact[h, col] += w
    np.testing.assert_allclose(soft, ref_soft, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(exact, ref_exact, rtol=1e-12, atol=1e-15)
    assert (exact.sum(1) < soft.sum(1)).all() and exact.sum() > 0


def test_exact_and_soft_agree_when_every_edge_passes_the_threshold():
    rng = np.random.default_rng(2)
    ids = _protein_with_every_type(3)
    L = ids.shape[1]
    attn = torch.zeros(1, 5, L, L, dtype=torch.float64)
    for h in range(5):
        for i in range(L):
            keys = rng.choice(np.arange(1, L - 3), size=2, replace=False)
            attn[0, h, i, keys] = 0.5  # every edge 0.5 > 0.3
    acc = VigAccumulator(1, 5)
    acc.add(0, attn, ids)
    np.testing.assert_array_equal(acc.sums["soft"], acc.sums["exact"])
    soft, exact = acc.result("soft", min_total=1.0), acc.result("exact", min_total=1.0)
    np.testing.assert_array_equal(soft.matrix, exact.matrix)
    # One weak edge per row makes them differ.
    attn[0, :, :, 1] += 0.05
    acc2 = VigAccumulator(1, 5)
    acc2.add(0, attn, ids)
    assert not np.allclose(acc2.sums["soft"], acc2.sums["exact"])


def test_heads_below_min_total_are_dropped():
    sums = np.ones((2, 3, 21))
    sums[0, 1] *= 1.0 / 21  # total 1
    features, kept = head_features(sums, min_total=5.0)
    assert kept.sum() == 5 and not kept[0, 1] and features.shape == (5, 20)
    assert VigResult.from_sums(sums, min_total=5.0).num_heads == 5
    few = VigResult.from_sums(sums[:1, :2], min_total=5.0)  # < 3 heads: undefined, said so
    assert np.isnan(few.matrix).all() and few.rank_DE is None and np.isnan(few.pearson)
    empty = sums.copy()
    empty[0, 0] = 0.0  # a head with no attention at all is dropped even with a tiny minimum
    assert VigResult.from_sums(empty, min_total=1e-9).num_heads == 5


def test_permutation_p_value_of_blosum_itself_is_the_smallest_possible():
    observed, p = blosum_permutation_test(blosum62(), num_permutations=199, seed=0)
    assert observed == pytest.approx(1.0)
    assert p == pytest.approx(1 / 200)


def _relabelled(matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    perm = rng.permutation(20)
    return matrix[np.ix_(perm, perm)]


def test_permutation_p_value_is_uniform_on_label_shuffled_data():
    """Under the null (BLOSUM62 with its residue labels shuffled, so any structure is kept but the
    labels carry no information) the p-value is uniform: over many seeds its distribution function
    stays within a Kolmogorov-Smirnov band of the diagonal. Also with a best-of-5-matrices selection,
    because the selection is repeated in every permutation."""
    n_trials, n_perm = 300, 99
    for n_matrices in (1, 5):
        ps = []
        for seed in range(n_trials):
            rng = np.random.default_rng(seed)
            mats = np.stack([_relabelled(blosum62(), rng) for _ in range(n_matrices)])
            ps.append(blosum_permutation_test(mats, num_permutations=n_perm, seed=10_000 + seed)[1])
        ps = np.sort(ps)
        ecdf = np.arange(1, n_trials + 1) / n_trials
        ks = np.max(np.abs(ecdf - ps))
        assert ks < 1.63 / np.sqrt(n_trials) + 1 / n_perm, (n_matrices, ks)  # 1% KS critical value
        assert 0.01 < np.mean(ps <= 0.05) < 0.10


def test_selection_must_be_repeated_to_stay_valid():
    """Picking the best of 10 null matrices and testing it alone rejects far too often; the
    permutation test with the max repeated does not (the reason analyze repeats the selection)."""
    naive, repeated = [], []
    for seed in range(150):
        rng = np.random.default_rng(seed)
        mats = np.stack([_relabelled(blosum62(), rng) for _ in range(10)])
        r = [max_pearson_with_blosum(m[None]) for m in mats]
        best = mats[int(np.argmax(r))]
        naive.append(blosum_permutation_test(best, 99, seed=seed)[1] <= 0.05)
        repeated.append(blosum_permutation_test(mats, 99, seed=seed)[1] <= 0.05)
    assert np.mean(naive) > 0.25
    assert np.mean(repeated) < 0.12


def test_permutation_statistic_handles_missing_pairs():
    m = blosum62().astype(float)
    m[3, :] = m[:, 3] = np.nan  # a residue type never seen
    observed, p = blosum_permutation_test(m, 99, seed=0)
    assert observed == pytest.approx(1.0) and p == pytest.approx(0.01)
    assert np.isnan(blosum_permutation_test(np.full((20, 20), np.nan), 99)[1])
    # Fewer finite pairs than a full matrix: the statistic still matches the plain Pearson on them.
    finite = np.isfinite(off_diagonal(m))
    r_direct = np.corrcoef(off_diagonal(m)[finite], off_diagonal(blosum62())[finite])[0, 1]
    assert max_pearson_with_blosum(m[None]) == pytest.approx(r_direct, abs=1e-12)


def test_random_weights_use_the_checkpoints_own_config_and_leave_the_rng_alone():
    torch.manual_seed(123)
    cfg = ModelConfig(dim=32, depth=3, heads=4, ff_dim=48, num_features=16, favor_backend="torch", feature_seed=7)
    trained = ProteinLM(cfg).eval()
    state = torch.random.get_rng_state()
    a = random_weights_like(trained, 5)
    b = random_weights_like(trained, 5)
    c = random_weights_like(trained, 6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert type(a) is type(trained) and not a.training
    for name in ("dim", "depth", "heads", "ff_dim", "num_features", "attention", "causal"):
        assert getattr(a.config, name) == getattr(trained.config, name)
    sa, sb, sc, st = a.state_dict(), b.state_dict(), c.state_dict(), trained.state_dict()
    assert sa.keys() == st.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # reproducible from the seed
    w = "blocks.0.attn.qkv.weight" if "blocks.0.attn.qkv.weight" in sa else next(k for k in sa if k.endswith("weight"))
    assert not torch.equal(sa[w], sc[w]) and not torch.equal(sa[w], st[w])
