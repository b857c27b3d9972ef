"""Vig et al.'s amino-acid statistic: which residue types heads attend to, correlated across heads.

Vig et al. 2020 ("BERTology meets biology", arXiv 2006.15222, Fig. 4; the Performer paper's Fig. 13
follows it) ask whether residue types that *substitute* for each other are *attended to alike*. For
each head ``h`` they take the attention edges ``i -> j`` between residues (``<cls>``/``<eos>``,
padding and other special tokens dropped on both sides, self-edges kept) and compute the share of
the head's attention that lands on keys of type ``b``::

    w_ij = A_h[i, j] * [A_h[i, j] > t]              # t = 0.3 ("exact"), t = -inf ("soft": every edge)
    total_h = sum_ij w_ij                            # keys of every residue token (X, B, Z, U, O, gaps too)
    f_h[b]  = sum_{ij: x_j = b} w_ij / total_h      # the head's feature for residue type b

Heads with ``total_h < min_total`` (100 in their code) are dropped. The similarity of types ``a`` and
``b`` is the Pearson correlation, across the kept heads, of ``f[a]`` and ``f[b]``; its 190
off-diagonal values are compared with BLOSUM62. Following their code (salesforce/provis,
``compute_edge_features.py`` and ``report_aa_correlations.py``), an edge that passes the threshold
counts with its attention weight, not as 1, so the two variants agree when every edge is > t.

The *soft* variant keeps every edge (no threshold), so untrained models and Performers, whose implied
attention is rarely above 0.3, always give a value. Both come with their chance levels in
``protein-lm analyze`` (random weights of the same architecture, a label-permutation p-value).

Shapes: B batch, H heads, Lq query rows, Lk keys; the last axis of the sums has 21 columns: the 20
standard residues in ``STANDARD_AA`` order, then one column for every other residue token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protein_lm.analysis.blosum import NUM_AA, compare_with_blosum62, pair_rank
from protein_lm.data.tokenizer import RESIDUES, TOKENS

EXACT_THRESHOLD = 0.3  # Vig et al.'s --min-attn
MIN_TOTAL = 100.0  # their min_total: heads with less kept attention weight are dropped
VARIANTS = ("soft", "exact")
RESIDUE_TOKEN_IDS = tuple(TOKENS.index(r) for r in RESIDUES)  # every residue token, standard or not


def _key_columns(token_ids):
    """(B, L) token ids -> (B, L, 21) one-hot key column: 0..19 standard residue, 20 other residue, none else."""
    import torch

    from protein_lm.analysis.similarity import residue_types

    is_residue = torch.isin(token_ids, torch.tensor(RESIDUE_TOKEN_IDS, device=token_ids.device))
    types = residue_types(token_ids)
    column = torch.where(types >= 0, types, torch.full_like(types, NUM_AA))
    out = torch.zeros(*token_ids.shape, NUM_AA + 1, dtype=torch.float32, device=token_ids.device)
    out.scatter_(-1, column.clamp_min(0)[..., None], 1.0)
    return out * is_residue[..., None]


def key_type_sums(attn, query_ids, key_ids=None, threshold: float = EXACT_THRESHOLD):
    """Attention each head sends from residues to keys of each residue type, soft and thresholded.

    Args:
        attn: attention probabilities ``(B, H, Lq, Lk)`` (torch; rows may be a block of the map).
        query_ids: token ids of the query rows ``(B, Lq)``.
        key_ids: token ids of the keys ``(B, Lk)`` (default ``query_ids``).
        threshold: edges with attention ``<= threshold`` are dropped from the exact sums.

    Returns:
        ``(soft, exact)``: float64 numpy ``(H, 21)`` each (columns: ``STANDARD_AA``, then other residues).
    """
    import torch

    key_ids = query_ids if key_ids is None else key_ids
    a = attn.to(torch.promote_types(attn.dtype, torch.float32))
    keys = _key_columns(key_ids).to(a.dtype)  # (B, Lk, 21)
    queries = _key_columns(query_ids).sum(-1).to(a.dtype)[:, None, None, :]  # (B, 1, 1, Lq): 1 at residues
    # Sum over the residue query rows first, as a product that never copies the (B, H, Lq, Lk) block.
    soft_keys = torch.matmul(queries, a)  # (B, H, 1, Lk)
    exact_keys = torch.matmul(queries, torch.where(a > threshold, a, 0.0))
    soft = torch.einsum("bhk,bkc->hc", soft_keys[:, :, 0], keys)
    exact = torch.einsum("bhk,bkc->hc", exact_keys[:, :, 0], keys)
    return soft.double().cpu().numpy(), exact.double().cpu().numpy()


def head_features(sums: np.ndarray, min_total: float = MIN_TOTAL) -> tuple[np.ndarray, np.ndarray]:
    """Per-head features ``f_h[b]`` of the heads with enough attention weight.

    Args:
        sums: ``(..., 21)`` key-type sums of any set of heads.
        min_total: heads whose total is below this are dropped.

    Returns:
        ``(features (n_kept, 20), kept (...) bool)``.
    """
    sums = np.asarray(sums, dtype=np.float64)
    total = sums.sum(-1)
    kept = (total > 0) & (total >= min_total)
    features = sums[kept][:, :NUM_AA] / total[kept][:, None]
    return features, kept


def feature_correlation(features: np.ndarray) -> np.ndarray:
    """(n, 20) features -> (20, 20) Pearson correlation of the columns across the n rows.

    The diagonal is NaN (a type with itself carries no information); so is every entry involving a
    column without variance, and the whole matrix when fewer than 3 heads are given.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] < 3:
        return np.full((NUM_AA, NUM_AA), np.nan)
    centred = features - features.mean(axis=0)
    norms = np.sqrt((centred * centred).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred.T @ centred) / np.outer(norms, norms)
    corr = np.where(np.outer(norms > 0, norms > 0), corr, np.nan)
    np.fill_diagonal(corr, np.nan)
    return np.clip(corr, -1.0, 1.0)  # rounding can step just past +-1; NaN stays NaN


@dataclass
class VigResult:
    """Vig et al.'s similarity of one variant over a set of heads, with its BLOSUM62 comparison."""

    matrix: np.ndarray  # (20, 20) correlation across heads, NaN diagonal
    num_heads: int  # heads kept (total >= min_total)
    pearson: float
    spearman: float
    rank_DE: int | None  # None when the matrix is undefined (too few heads kept)
    rank_FY: int | None

    @classmethod
    def from_sums(cls, sums: np.ndarray, min_total: float = MIN_TOTAL) -> VigResult:
        """From the ``(..., 21)`` key-type sums of the heads to correlate across."""
        features, kept = head_features(sums, min_total)
        matrix = feature_correlation(features)
        scores = compare_with_blosum62(matrix)
        defined = bool(np.isfinite(matrix).any())
        return cls(
            matrix=matrix,
            num_heads=int(kept.sum()),
            pearson=scores["pearson"],
            spearman=scores["spearman"],
            rank_DE=pair_rank(matrix, "D", "E") if defined else None,
            rank_FY=pair_rank(matrix, "F", "Y") if defined else None,
        )


class VigAccumulator:
    """Sums :func:`key_type_sums` per (layer, head) over proteins; one layer's row block at a time."""

    def __init__(self, num_layers: int, num_heads: int, threshold: float = EXACT_THRESHOLD):
        self.threshold = threshold
        self.sums = {v: np.zeros((num_layers, num_heads, NUM_AA + 1)) for v in VARIANTS}

    def add(self, layer: int, attn, query_ids, key_ids=None) -> None:
        soft, exact = key_type_sums(attn, query_ids, key_ids, self.threshold)
        self.sums["soft"][layer] += soft
        self.sums["exact"][layer] += exact

    def result(self, variant: str, min_total: float = MIN_TOTAL) -> VigResult:
        """The statistic over every head of the model."""
        return VigResult.from_sums(self.sums[variant], min_total)

    def per_layer(self, variant: str, min_total: float = MIN_TOTAL) -> list[VigResult]:
        """The statistic over the heads of each layer alone (Vig et al. follow it with depth); undefined
        (NaN) for layers with fewer than 3 kept heads."""
        return [VigResult.from_sums(layer, min_total) for layer in self.sums[variant]]


__all__ = [
    "EXACT_THRESHOLD",
    "MIN_TOTAL",
    "VigAccumulator",
    "VigResult",
    "feature_correlation",
    "head_features",
    "key_type_sums",
]
