"""BLOSUM62 selection (20 standard residues, by letter) and the correlation helpers."""

from __future__ import annotations

import numpy as np
import pytest
from Bio.Align import substitution_matrices

from protein_lm.analysis.blosum import (
    blosum62,
    blosum62_log2_odds,
    compare_with_blosum62,
    off_diagonal,
    pair_labels,
    pair_rank,
    pearson,
    rankdata,
    spearman,
)
from protein_lm.data.tokenizer import STANDARD_AA


def test_selection_matches_biopython_letter_by_letter():
    ref = substitution_matrices.load("BLOSUM62")
    m = blosum62()
    assert m.shape == (20, 20)
    for i, a in enumerate(STANDARD_AA):
        for j, b in enumerate(STANDARD_AA):
            assert m[i, j] == ref[a, b], (a, b)


def test_known_blosum62_values():
    m = blosum62()
    idx = STANDARD_AA.index
    assert m[idx("W"), idx("W")] == 11
    assert m[idx("C"), idx("C")] == 9
    assert m[idx("A"), idx("A")] == 4
    assert m[idx("D"), idx("E")] == 2
    assert m[idx("F"), idx("Y")] == 3
    assert m[idx("W"), idx("G")] == -2
    assert m[idx("I"), idx("V")] == 3


def test_selection_has_no_zero_rows_and_is_symmetric():
    m = blosum62()
    assert not np.any(np.all(m == 0, axis=1))
    assert not np.any(np.all(m == 0, axis=0))
    np.testing.assert_array_equal(m, m.T)
    assert np.all(np.diag(m) > 0)  # every residue is most similar to itself
    np.testing.assert_array_equal(blosum62_log2_odds() * 2, m)


def test_off_diagonal_pairs():
    labels = pair_labels()
    assert len(labels) == 190 == len(set(labels))
    assert labels[0] == "A-R" and "D-E" in labels and "F-Y" in labels
    m = np.arange(400.0).reshape(20, 20)
    vals = off_diagonal(m)
    assert vals.shape == (190,)
    assert vals[labels.index("D-E")] == m[3, 6]


def test_blosum_against_itself_correlates_perfectly():
    scores = compare_with_blosum62(blosum62())
    assert scores["pearson"] == pytest.approx(1.0)
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["num_pairs"] == 190
    flipped = compare_with_blosum62(-blosum62())
    assert flipped["pearson"] == pytest.approx(-1.0)


def test_rankdata_and_spearman_closed_forms():
    np.testing.assert_array_equal(rankdata(np.array([10.0, 30.0, 20.0, 20.0])), [1.0, 4.0, 2.5, 2.5])
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone -> 1 although not linear
    assert pearson(x, x**3) < 1.0
    assert np.isnan(pearson(np.ones(5), x[:5]))  # constant -> undefined


def test_pair_rank():
    sim = np.zeros((20, 20))
    idx = STANDARD_AA.index
    sim[idx("D"), idx("E")] = sim[idx("E"), idx("D")] = 3.0
    sim[idx("F"), idx("Y")] = sim[idx("Y"), idx("F")] = 2.0
    sim[idx("I"), idx("V")] = sim[idx("V"), idx("I")] = 2.5
    assert pair_rank(sim, "D", "E") == 1
    assert pair_rank(sim, "E", "D") == 1
    assert pair_rank(sim, "F", "Y") == 3
    assert pair_rank(sim, "A", "R") == 4  # ties count in the pair's favour
