"""BLOSUM62 restricted to the 20 standard amino acids, and how a 20×20 matrix compares with it.

Biopython's BLOSUM62 has 24 letters (``ARNDCQEGHILKMFPSTWYVBZX*``). We select the 20 standard residues
*by letter* (never by position, never letters BLOSUM lacks such as U or O), so the result is in
:data:`protein_lm.data.tokenizer.STANDARD_AA` order whatever order Biopython stores.

BLOSUM62 scores are ``round(2 * log2(q_ab / (p_a p_b)))`` (half-bit units). :func:`blosum62_log2_odds`
divides by two so that the matrix is in the same units (log2 odds) as
:func:`protein_lm.analysis.similarity.similarity_from_mass` — that is the "normalised BLOSUM62" of the figures.

Correlations are computed over the 190 off-diagonal unordered pairs (the upper triangle): the diagonal
of BLOSUM (self-substitution) measures residue conservation, not similarity between residue types, and
would dominate both Pearson and Spearman.

Pure numpy (no scipy): Spearman is Pearson on average ranks.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from protein_lm.data.tokenizer import STANDARD_AA

NUM_AA = len(STANDARD_AA)  # 20
# Indices of the 190 unordered off-diagonal pairs (a < b) in STANDARD_AA order.
UPPER_I, UPPER_J = np.triu_indices(NUM_AA, k=1)


@lru_cache(maxsize=1)
def _blosum62_cached() -> np.ndarray:
    from Bio.Align import substitution_matrices

    matrix = substitution_matrices.load("BLOSUM62")
    letters = matrix.alphabet
    missing = [a for a in STANDARD_AA if a not in letters]
    if missing:  # pragma: no cover - would mean a broken Biopython install
        raise RuntimeError(f"BLOSUM62 from Biopython lacks standard residues {missing}")
    out = np.empty((NUM_AA, NUM_AA), dtype=np.float64)
    for i, a in enumerate(STANDARD_AA):
        for j, b in enumerate(STANDARD_AA):
            out[i, j] = matrix[a, b]
    out.setflags(write=False)
    return out


def blosum62() -> np.ndarray:
    """BLOSUM62 scores (half bits) for the 20 standard residues, rows/columns in ``STANDARD_AA`` order.

    Returns:
        A new float64 array of shape (20, 20).
    """
    return _blosum62_cached().copy()


def blosum62_log2_odds() -> np.ndarray:
    """BLOSUM62 / 2: log2 odds, the units of the attention similarity matrix."""
    return blosum62() / 2.0


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """The 190 upper-triangle values of a (..., 20, 20) matrix -> (..., 190), pair order of ``pair_labels()``."""
    matrix = np.asarray(matrix)
    return matrix[..., UPPER_I, UPPER_J]


def pair_labels() -> list[str]:
    """Labels ``"A-R"``, ... of the 190 off-diagonal pairs, in the order of :func:`off_diagonal`."""
    return [f"{STANDARD_AA[i]}-{STANDARD_AA[j]}" for i, j in zip(UPPER_I, UPPER_J, strict=True)]


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of a 1-D array, ties get the mean of their ranks (as scipy's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Boundaries of runs of equal values.
    boundaries = np.flatnonzero(np.diff(sorted_x) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the positions where both are finite; NaN if fewer than 3 or constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0:
        return float("nan")
    return float((x * y).sum() / denom)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks) over positions where both are finite."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return pearson(rankdata(x[ok]), rankdata(y[ok]))


def compare_with_blosum62(similarity: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation of a 20×20 matrix with BLOSUM62 over the 190 off-diagonal pairs.

    Args:
        similarity: (20, 20) matrix in ``STANDARD_AA`` order (only its upper triangle is read).

    Returns:
        ``{"pearson": r, "spearman": rho, "num_pairs": n}`` (``n`` counts pairs where the matrix is finite).
    """
    sim = off_diagonal(similarity)
    ref = off_diagonal(blosum62())
    return {
        "pearson": pearson(sim, ref),
        "spearman": spearman(sim, ref),
        "num_pairs": int(np.isfinite(sim).sum()),
    }


def pair_rank(similarity: np.ndarray, a: str, b: str) -> int:
    """Rank of the pair (a, b) among the 190 off-diagonal pairs, 1 = most similar.

    Ties count in the pair's favour (rank = 1 + number of pairs strictly more similar); NaN pairs
    count as least similar.
    """
    i, j = STANDARD_AA.index(a), STANDARD_AA.index(b)
    value = float(np.asarray(similarity)[i, j])
    values = off_diagonal(similarity)
    values = np.where(np.isfinite(values), values, -np.inf)
    if not np.isfinite(value):
        return int(len(values))
    return int((values > value).sum()) + 1
