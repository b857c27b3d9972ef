"""Permutation p-values for "this 20x20 matrix looks like BLOSUM62" (a Mantel test).

Null hypothesis: the model's amino-acid matrix carries no information about which residue types are
similar, so its rows/columns could belong to any residue. Relabelling the 20 residue types of the
model's matrix at random (the same permutation on rows and columns) and recomputing the statistic
gives its null distribution. Where a statistic selects among several matrices (the best of all
heads), every permutation repeats the selection: the permuted statistic is the maximum over the
same matrices, each relabelled by the same permutation, so choosing the best head is paid for.

    p = (1 + #{permutations with statistic >= observed}) / (1 + n_permutations)

This tests the *structure* of the matrix against BLOSUM62. It does not test against an untrained
model — a random network can still have residue-type structure (composition, the embedding's
random geometry) — which is why ``protein-lm analyze`` also reports the same statistic for random
weights of the same architecture.
"""

from __future__ import annotations

import numpy as np

from protein_lm.analysis.blosum import NUM_AA, UPPER_I, UPPER_J, blosum62, off_diagonal


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``x (..., n)`` with ``y (n,)`` over the entries where both are finite.

    NaN where fewer than 3 entries are finite or a side is constant (as :func:`blosum.pearson`).
    """
    ok = np.isfinite(x) & np.isfinite(y)
    count = ok.sum(-1)
    xz = np.where(ok, x, 0.0)
    yz = np.where(ok, y, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = xz.sum(-1, keepdims=True) / count[..., None]
        my = yz.sum(-1, keepdims=True) / count[..., None]
        dx = np.where(ok, x - mx, 0.0)
        dy = np.where(ok, y - my, 0.0)
        r = (dx * dy).sum(-1) / np.sqrt((dx * dx).sum(-1) * (dy * dy).sum(-1))
    return np.where(count >= 3, r, np.nan)


def max_pearson_with_blosum(matrices: np.ndarray) -> float:
    """The statistic itself: max over ``matrices (n, 20, 20)`` of Pearson r with BLOSUM62 (190 pairs)."""
    r = _pearson_rows(off_diagonal(np.asarray(matrices, dtype=np.float64)), off_diagonal(blosum62()))
    return float(np.nanmax(r)) if np.isfinite(r).any() else float("nan")


def blosum_permutation_test(
    matrices: np.ndarray,
    num_permutations: int = 9999,
    seed: int = 0,
    chunk: int | None = None,
) -> tuple[float, float]:
    """Observed statistic and its permutation p-value.

    Args:
        matrices: ``(20, 20)`` or ``(n, 20, 20)``; the statistic is the max over the n matrices of
            their Pearson r with BLOSUM62 (one matrix: its r).
        num_permutations: random relabellings of the 20 residue types.
        seed: seeds the permutations (the p-value is reproducible).
        chunk: permutations evaluated at once (memory: n * chunk * 190 float64; default about 32 MB).

    Returns:
        ``(observed, p_value)``; ``(nan, nan)`` when the statistic is undefined (all-NaN matrices).
    """
    mats = np.asarray(matrices, dtype=np.float64)
    if mats.ndim == 2:
        mats = mats[None]
    if mats.shape[-2:] != (NUM_AA, NUM_AA):
        raise ValueError(f"matrices must be (n, 20, 20), got {mats.shape}")
    if num_permutations < 1:
        raise ValueError("num_permutations must be at least 1")
    observed = max_pearson_with_blosum(mats)
    if not np.isfinite(observed):
        return float("nan"), float("nan")
    reference = off_diagonal(blosum62())
    chunk = chunk or max(1, (1 << 22) // (mats.shape[0] * 190))
    rng = np.random.default_rng(seed)
    at_least = 0
    done = 0
    while done < num_permutations:
        k = min(chunk, num_permutations - done)
        perms = np.argsort(rng.random((k, NUM_AA)), axis=1)  # (k, 20) uniform random permutations
        rows, cols = perms[:, UPPER_I], perms[:, UPPER_J]  # (k, 190): pair (i, j) -> (p[i], p[j])
        values = mats[:, rows, cols]  # (n, k, 190)
        r = _pearson_rows(values, reference)  # (n, k)
        best = np.where(np.isfinite(r), r, -np.inf).max(axis=0)  # (k,)
        at_least += int((best >= observed - 1e-12).sum())
        done += k
    return observed, (1 + at_least) / (1 + num_permutations)


__all__ = ["blosum_permutation_test", "max_pearson_with_blosum"]
