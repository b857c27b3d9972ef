"""Amino-acid similarity from attention (after Vig et al. 2020, "BERTology meets biology").

For every layer and head we sum, over many sequences, the attention that residues of type ``a``
(queries) pay to residues of type ``b`` (keys) — the *attention mass* ``M[a, b]``. Only the 20
standard residues (``ARNDCQEGHILKMFPSTWYV``) count, as queries and as keys: ``<cls>``, ``<eos>``,
padding, ``X``/``B``/``Z``/``U``/``O`` and other specials are dropped on both sides.

The mass is turned into log odds against a null, the way BLOSUM turns substitution counts into
scores, so the two matrices share a unit (log2 odds)::

    P[a, b] = (M[a, b] + M[b, a]) / (2 * sum(M))      # symmetrised joint distribution of type pairs
    Q[a, b] = the same for the null mass U              # what a head "by chance" would give
    S[a, b] = log2( P[a, b] / Q[a, b] )                 # observed / expected

Two nulls (``null=``):

* ``"uniform"`` (default): ``U`` is the mass of *uniform* attention over the same proteins
  (:func:`uniform_mass`). Uniform attention gives ``S = 0`` exactly, over any set of proteins; pairs of
  types that merely occur together in the same proteins (composition) are not scored as similar.
* ``"marginal"``: ``Q = p pᵀ`` with ``p`` the marginal of ``P`` — independence of query and key type
  over the whole data set, BLOSUM's own construction. Compositional co-occurrence across proteins then
  counts as similarity (a random-weights model already correlates with BLOSUM62).

A small ``pseudocount`` (a fraction of the total mass spread evenly over the 400 cells of both ``P``
and ``Q``) keeps pairs never seen in a small sample finite; it is 0 by default so that known answers are
recovered exactly. The aggregated matrix gives every head the same weight: the heads' ``P`` are
averaged before taking the log odds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protein_lm.analysis.blosum import NUM_AA, compare_with_blosum62, pair_rank
from protein_lm.data.tokenizer import STANDARD_AA, STANDARD_AA_IDS, VOCAB_SIZE

# token id -> 0..19 for standard residues, -1 for everything else (specials, X, B, Z, U, O, '.', '-').
TOKEN_TO_AA_INDEX = np.full(VOCAB_SIZE, -1, dtype=np.int64)
for _k, _tid in enumerate(STANDARD_AA_IDS):
    TOKEN_TO_AA_INDEX[_tid] = _k

NULLS = ("uniform", "marginal")
HIGHLIGHT_PAIRS: tuple[tuple[str, str], ...] = (("D", "E"), ("F", "Y"))


def residue_types(token_ids):
    """Map token ids (any shape, numpy or torch) to 0..19 (standard residue) or -1 (anything else)."""
    if isinstance(token_ids, np.ndarray):
        return TOKEN_TO_AA_INDEX[token_ids.astype(np.int64)]
    import torch

    table = torch.as_tensor(TOKEN_TO_AA_INDEX, device=token_ids.device)
    return table[token_ids.long()]


def one_hot_types(token_ids, dtype=None):
    """(B, L) token ids -> (B, L, 20) one-hot of the standard residue type; all-zero rows elsewhere."""
    import torch

    types = residue_types(token_ids)
    out = torch.zeros(*types.shape, NUM_AA, dtype=dtype or torch.float32, device=types.device)
    valid = types >= 0
    out[valid, types[valid]] = 1.0
    return out


def type_mass(attn, query_ids, key_ids=None, query_offset: int | None = None):
    """Attention mass between residue types for a (block of) attention maps.

    Args:
        attn: attention probabilities ``(B, H, Lq, Lk)`` (torch); rows may be a block of the full map.
        query_ids: token ids of the query rows, ``(B, Lq)``.
        key_ids: token ids of the keys, ``(B, Lk)``; defaults to ``query_ids`` (full square map).
        query_offset: when given, query row ``r`` is position ``query_offset + r`` and its attention to
            that same position (to itself) is left out. ``None`` keeps self-attention.

    Returns:
        float64 numpy array ``(H, 20, 20)``: ``M[h, a, b] = sum over batch, queries of type a, keys of
        type b of attn[., h, q, k]``.
    """
    import torch

    key_ids = query_ids if key_ids is None else key_ids
    # Float32 (or the input's float64) per block; the accumulator sums blocks in float64.
    a = attn.to(torch.promote_types(attn.dtype, torch.float32))
    xq = one_hot_types(query_ids, a.dtype)  # (B, Lq, 20)
    xk = one_hot_types(key_ids, a.dtype)  # (B, Lk, 20)
    to_type = torch.matmul(a, xk.unsqueeze(1))  # (B, H, Lq, 20): mass each query sends to each key type
    mass = torch.einsum("bqa,bhqc->hac", xq, to_type)  # (H, 20, 20)
    if query_offset is not None:
        # Remove attention of position t to itself: it always lands on the diagonal (type(t), type(t)).
        rows = torch.arange(a.shape[-2], device=a.device)
        rows = rows[rows + query_offset < a.shape[-1]]
        self_attn = a[..., rows, rows + query_offset]  # (B, H, n)
        own = torch.einsum("bhn,bna->ha", self_attn, xq[:, rows])  # (H, 20)
        mass = (mass - torch.diag_embed(own)).clamp_min(0.0)  # clamp: float32 rounding only
    return mass.double().cpu().numpy()


def joint_distribution(mass: np.ndarray, pseudocount: float = 0.0) -> np.ndarray:
    """Symmetrised, normalised type-pair distribution ``P`` of a mass ``(..., 20, 20)``.

    Args:
        mass: attention mass, any leading dims.
        pseudocount: fraction of the total mass added evenly to the 400 cells before normalising.
    """
    mass = np.asarray(mass, dtype=np.float64)
    sym = (mass + np.swapaxes(mass, -1, -2)) / 2.0
    total = sym.sum(axis=(-1, -2), keepdims=True)
    if pseudocount:
        sym = sym + pseudocount * total / (NUM_AA * NUM_AA)
        total = sym.sum(axis=(-1, -2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sym / total


def similarity_from_joint(joint: np.ndarray, expected: np.ndarray | None = None) -> np.ndarray:
    """Log2 odds of a joint distribution ``P`` (..., 20, 20) against an expected one.

    Args:
        joint: ``P``, e.g. from :func:`joint_distribution`.
        expected: ``Q`` (20, 20), the joint distribution under the null (e.g. uniform attention within
            the same proteins, see :func:`uniform_mass`). ``None``: independence of ``P``'s own
            marginals, ``Q = p pᵀ`` (the BLOSUM construction).

    Returns:
        ``log2(P / Q)``; NaN where ``Q = 0`` (a type that never occurs), ``-inf`` where only ``P = 0``.
    """
    if expected is None:
        p = joint.sum(axis=-1)
        expected = p[..., :, None] * p[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.log2(joint / expected)
    return np.where(expected > 0, sim, np.nan)


def similarity_from_mass(
    mass: np.ndarray, pseudocount: float = 0.0, baseline: np.ndarray | None = None
) -> np.ndarray:
    """Per-head similarity ``S`` (log2 odds) from attention mass ``(..., 20, 20)``; see the module doc.

    ``baseline``: the (20, 20) mass of uniform attention over the same proteins (:func:`uniform_mass`);
    ``None`` compares with the product of the marginals instead.
    """
    expected = None if baseline is None else joint_distribution(baseline, pseudocount)
    return similarity_from_joint(joint_distribution(mass, pseudocount), expected)


def aggregate_similarity(
    mass: np.ndarray, pseudocount: float = 0.0, baseline: np.ndarray | None = None
) -> np.ndarray:
    """One (20, 20) matrix from all heads ``(..., 20, 20)``: mean of the per-head ``P``, then log odds."""
    joint = joint_distribution(mass, pseudocount).reshape(-1, NUM_AA, NUM_AA)
    expected = None if baseline is None else joint_distribution(baseline, pseudocount)
    return similarity_from_joint(np.nanmean(joint, axis=0), expected)


def uniform_mass(input_ids, causal: bool = False, exclude_self: bool = True, padding_mask=None) -> np.ndarray:
    """Type-pair mass of *uniform* attention over the same sequences: the null of the similarity.

    Query ``i`` spreads its attention evenly over the keys it may see (all non-padding positions,
    ``<cls>``/``<eos>`` included; only ``j <= i`` when ``causal``); its own position is then dropped
    when ``exclude_self``, exactly as for the model's attention. Comparing with this — rather than
    with the product of overall type frequencies — removes the part of a pair's mass that only reflects
    which residue types occur together in the same proteins (composition: membrane proteins are rich in
    I/L/V/F, acidic proteins in D/E), which a head gets without attending by residue type at all.

    Args:
        input_ids: ``(B, L)`` framed token ids (torch or numpy).
        causal: the model is causal.
        exclude_self: drop each position's share of itself.
        padding_mask: ``(B, L)`` True at padding (default: ``<pad>`` ids).

    Returns:
        float64 ``(20, 20)``, summed over the batch.
    """
    import torch

    from protein_lm.data.tokenizer import PAD_ID

    ids = torch.as_tensor(input_ids).cpu()
    if padding_mask is None:
        padding_mask = ids.eq(PAD_ID)
    real = (~torch.as_tensor(padding_mask).cpu().bool()).double()  # (B, L)
    x = one_hot_types(ids, torch.float64)  # (B, L, 20)
    if causal:
        counts = torch.cumsum(x, dim=1)  # keys of each type among positions <= i
        keys = torch.cumsum(real, dim=1)  # number of keys position i may see
    else:
        counts = x.sum(dim=1, keepdim=True).expand_as(x)
        keys = real.sum(dim=1, keepdim=True).expand_as(real)
    share = 1.0 / keys.clamp_min(1.0)  # (B, L) uniform weight of each key for query i
    mass = torch.einsum("bia,bic,bi->ac", x, counts, share)
    if exclude_self:
        mass = mass - torch.diag(torch.einsum("bia,bi->a", x, share))
    return mass.clamp_min(0.0).numpy()


class SimilarityAccumulator:
    """Sums attention mass per (layer, head) over sequences, one layer's maps at a time.

    Usage::

        acc = SimilarityAccumulator(num_layers, num_heads)
        for layer, attn in model.attention_maps(ids):      # (B, H, L, L)
            acc.add(layer, attn, ids)
        acc.finish_sequence(n=ids.shape[0])
        result = acc.result()
    """

    def __init__(self, num_layers: int, num_heads: int):
        self.mass = np.zeros((num_layers, num_heads, NUM_AA, NUM_AA), dtype=np.float64)
        self.baseline = np.zeros((NUM_AA, NUM_AA), dtype=np.float64)
        self.num_sequences = 0
        self.num_residues = 0

    def add(self, layer: int, attn, query_ids, key_ids=None, query_offset: int | None = None) -> None:
        """Add one layer's attention (or a block of its query rows) for a batch of sequences.

        ``query_offset`` (the block's first row) drops self-attention; see :func:`type_mass`.
        """
        self.mass[layer] += type_mass(attn, query_ids, key_ids, query_offset)

    def add_baseline(
        self, input_ids, causal: bool = False, exclude_self: bool = True, padding_mask=None
    ) -> None:
        """Add the uniform-attention mass of these sequences (once per sequence, not per layer)."""
        self.baseline += uniform_mass(input_ids, causal, exclude_self, padding_mask)

    def finish_sequence(self, n: int = 1, residues: int = 0) -> None:
        """Count ``n`` analysed sequences holding ``residues`` standard residues in total."""
        self.num_sequences += n
        self.num_residues += residues

    def result(self, pseudocount: float = 0.0, null: str = "uniform") -> SimilarityResult:
        """Similarities and scores; ``null="uniform"`` needs :meth:`add_baseline` for every sequence.

        Args:
            pseudocount: see :func:`joint_distribution`.
            null: ``"uniform"`` (uniform attention within the same proteins) or ``"marginal"``
                (product of the attention's own type marginals, BLOSUM-style).
        """
        if null not in NULLS:
            raise ValueError(f"null must be one of {NULLS}, got {null!r}")
        baseline = None
        if null == "uniform":
            if not self.baseline.any():
                raise ValueError("null='uniform' needs add_baseline() for the analysed sequences")
            baseline = self.baseline
        return SimilarityResult.from_mass(
            self.mass,
            pseudocount,
            num_sequences=self.num_sequences,
            num_residues=self.num_residues,
            baseline=baseline,
        )


@dataclass
class SimilarityResult:
    """Per-head and aggregated similarity with its BLOSUM62 comparison.

    Attributes:
        mass: (layers, heads, 20, 20) summed attention mass.
        per_head: (layers, heads, 20, 20) log2-odds similarity of each head.
        aggregated: (20, 20) similarity of all heads together.
        pearson, spearman: (layers, heads) correlation of each head with BLOSUM62 (190 off-diagonal pairs).
        best_layer, best_head: the head with the highest Pearson correlation.
    """

    mass: np.ndarray
    per_head: np.ndarray
    aggregated: np.ndarray
    pearson: np.ndarray
    spearman: np.ndarray
    best_layer: int
    best_head: int
    num_sequences: int = 0
    num_residues: int = 0
    pseudocount: float = 0.0
    aggregated_scores: dict = field(default_factory=dict)
    baseline: np.ndarray | None = None

    @classmethod
    def from_mass(
        cls,
        mass: np.ndarray,
        pseudocount: float = 0.0,
        num_sequences: int = 0,
        num_residues: int = 0,
        baseline: np.ndarray | None = None,
    ) -> SimilarityResult:
        """Build from summed mass; ``baseline`` is the uniform-attention mass (None: marginal null)."""
        mass = np.asarray(mass, dtype=np.float64)
        if mass.ndim != 4 or mass.shape[-2:] != (NUM_AA, NUM_AA):
            raise ValueError(f"mass must be (layers, heads, 20, 20), got {mass.shape}")
        per_head = similarity_from_mass(mass, pseudocount, baseline)
        layers, heads = mass.shape[:2]
        pearson = np.full((layers, heads), np.nan)
        spearman = np.full((layers, heads), np.nan)
        for l in range(layers):
            for h in range(heads):
                scores = compare_with_blosum62(per_head[l, h])
                pearson[l, h] = scores["pearson"]
                spearman[l, h] = scores["spearman"]
        if np.all(np.isnan(pearson)):
            best = (0, 0)
        else:
            best = np.unravel_index(int(np.nanargmax(pearson)), pearson.shape)
        aggregated = aggregate_similarity(mass, pseudocount, baseline)
        return cls(
            mass=mass,
            per_head=per_head,
            aggregated=aggregated,
            pearson=pearson,
            spearman=spearman,
            best_layer=int(best[0]),
            best_head=int(best[1]),
            num_sequences=num_sequences,
            num_residues=num_residues,
            pseudocount=pseudocount,
            aggregated_scores=compare_with_blosum62(aggregated),
            baseline=baseline,
        )

    @property
    def best(self) -> np.ndarray:
        """(20, 20) similarity of the best head."""
        return self.per_head[self.best_layer, self.best_head]

    def summary(self) -> dict:
        """JSON-ready summary (what ``protein-lm analyze`` writes to summary.json)."""

        def num(x: float) -> float | None:
            return None if not np.isfinite(x) else round(float(x), 6)

        out = {
            "num_sequences": self.num_sequences,
            "num_residues": self.num_residues,
            "num_layers": int(self.mass.shape[0]),
            "num_heads": int(self.mass.shape[1]),
            "best_layer": self.best_layer,
            "best_head": self.best_head,
            "blosum62_pearson": num(self.pearson[self.best_layer, self.best_head]),
            "blosum62_spearman": num(self.spearman[self.best_layer, self.best_head]),
            "aggregated_blosum62_pearson": num(self.aggregated_scores["pearson"]),
            "aggregated_blosum62_spearman": num(self.aggregated_scores["spearman"]),
            "pseudocount": self.pseudocount,
            "null": "marginal" if self.baseline is None else "uniform",
            "num_pairs": 190,
            "per_head_pearson": [[num(x) for x in row] for row in self.pearson],
            "per_head_spearman": [[num(x) for x in row] for row in self.spearman],
        }
        for a, b in HIGHLIGHT_PAIRS:
            out[f"rank_{a}{b}"] = pair_rank(self.best, a, b)
            out[f"aggregated_rank_{a}{b}"] = pair_rank(self.aggregated, a, b)
        return out


__all__ = [
    "STANDARD_AA",
    "SimilarityAccumulator",
    "SimilarityResult",
    "aggregate_similarity",
    "joint_distribution",
    "residue_types",
    "similarity_from_mass",
    "type_mass",
    "uniform_mass",
]
