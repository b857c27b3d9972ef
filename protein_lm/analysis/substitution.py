"""Masked-LM substitution readout: what the model predicts in place of each residue, vs BLOSUM62.

The attention statistics ask whether attention *shows* substitution structure; this asks whether the
model *learned* it at all. At scored positions we take the model's predicted distribution over the
20 standard residues (renormalised over those 20) and sum it by the true residue::

    C[a, b] = sum over scored positions t with x_t = a of p(b | context)
    P = C / sum(C)                       # joint distribution of (true a, predicted b)
    r = P.sum(1);  c = P.sum(0)          # how often a is the truth; how often b is predicted
    S = log2( P / (r c^T) );  S <- (S + S^T) / 2

the BLOSUM construction (observed pair frequency over the product of the marginals), in log2 odds,
with each marginal taken on its own side so that a model predicting the same distribution at every
position (random weights, a unigram model) gives ``S = 0`` exactly. Its 190 off-diagonal values are
compared with BLOSUM62: a model that predicts E where D is hidden has a high ``S[D, E]``.

* Masked-LM models: in each protein a seeded random 15% of the standard residues (at least one) are
  replaced by ``<mask>`` in one forward pass; every selected position is scored.
* Causal models: no masking; every standard residue after ``<cls>`` is scored from the prediction at
  the position before it.

What remains for an untrained network (its predictions still vary a little with the context) is
the random-weight chance level that ``protein-lm analyze`` reports beside it.
"""

from __future__ import annotations

import numpy as np

from protein_lm.analysis.blosum import NUM_AA, compare_with_blosum62, pair_rank

MASK_FRACTION = 0.15


def substitution_log_odds(counts: np.ndarray) -> np.ndarray:
    """(20, 20) predicted-mass counts ``C`` -> log2 odds ``S`` (see the module doc); NaN where undefined."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return np.full((NUM_AA, NUM_AA), np.nan)
    joint = c / total
    expected = np.outer(joint.sum(axis=1), joint.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(expected > 0, np.log2(joint / expected), np.nan)
    return (out + out.T) / 2.0


def masked_positions(types: np.ndarray, generator: np.random.Generator, fraction: float = MASK_FRACTION):
    """Indices to mask among the standard residues (``types >= 0``) of one framed protein."""
    candidates = np.flatnonzero(types >= 0)
    if candidates.size == 0:
        return candidates
    count = max(1, int(round(fraction * candidates.size)))
    return np.sort(generator.choice(candidates, size=count, replace=False))


class SubstitutionAccumulator:
    """Sums ``C[a, b]`` and the top-1 accuracy over the scored positions of many batches."""

    def __init__(self) -> None:
        self.counts = np.zeros((NUM_AA, NUM_AA), dtype=np.float64)
        self.num_positions = 0
        self.num_correct = 0

    def add(self, probs, true_types) -> None:
        """``probs (N, 20)`` predicted distributions (torch or numpy) at N positions of true type ``(N,)``."""
        probs = np.asarray(probs.detach().double().cpu() if hasattr(probs, "detach") else probs, dtype=np.float64)
        true_types = np.asarray(true_types.cpu() if hasattr(true_types, "cpu") else true_types, dtype=np.int64)
        np.add.at(self.counts, true_types, probs)
        self.num_positions += int(true_types.size)
        self.num_correct += int((probs.argmax(axis=1) == true_types).sum())

    def summary(self) -> dict:
        """``pearson``/``spearman`` with BLOSUM62, ranks of (D,E), (F,Y), accuracy, scored positions."""
        sim = substitution_log_odds(self.counts)
        scores = compare_with_blosum62(sim)
        return {
            "pearson": scores["pearson"],
            "spearman": scores["spearman"],
            "rank_DE": pair_rank(sim, "D", "E"),
            "rank_FY": pair_rank(sim, "F", "Y"),
            "accuracy": self.num_correct / self.num_positions if self.num_positions else float("nan"),
            "num_positions": self.num_positions,
        }

    @property
    def matrix(self) -> np.ndarray:
        return substitution_log_odds(self.counts)


def score_batch(model, input_ids, padding_mask, accumulator: SubstitutionAccumulator, generator) -> None:
    """Add the predictions of one framed, padded batch ``(B, L)`` to ``accumulator``.

    Args:
        model: a ProteinLM in eval mode; its ``config.causal`` picks next-token or masked scoring.
        input_ids: ``(B, L)`` framed token ids on the model's device.
        padding_mask: ``(B, L)`` bool, True at padding, or None.
        accumulator: where the predicted mass goes.
        generator: numpy Generator choosing the masked positions (seeded by the caller).
    """
    import torch

    from protein_lm.analysis.similarity import residue_types
    from protein_lm.data.tokenizer import MASK_ID, STANDARD_AA_IDS

    types = residue_types(input_ids)  # (B, L) 0..19 or -1
    standard = torch.as_tensor(STANDARD_AA_IDS, device=input_ids.device)
    with torch.no_grad():
        if model.config.causal:
            logits = model(input_ids, padding_mask).logits[:, :-1]  # position t-1 predicts token t
            target = types[:, 1:]
            rows, cols = torch.nonzero(target >= 0, as_tuple=True)
            picked = logits[rows, cols]
            truth = target[rows, cols]
        else:
            masked = input_ids.clone()
            types_np = types.cpu().numpy()
            rows_l, cols_l = [], []
            for b in range(input_ids.shape[0]):
                pos = masked_positions(types_np[b], generator)
                rows_l.append(np.full(pos.size, b))
                cols_l.append(pos)
            rows = torch.as_tensor(np.concatenate(rows_l), device=input_ids.device, dtype=torch.long)
            cols = torch.as_tensor(np.concatenate(cols_l), device=input_ids.device, dtype=torch.long)
            masked[rows, cols] = MASK_ID
            picked = model(masked, padding_mask).logits[rows, cols]
            truth = types[rows, cols]
        probs = picked.float()[:, standard].softmax(dim=-1)  # renormalised over the 20 residues
    accumulator.add(probs, truth)


__all__ = ["SubstitutionAccumulator", "masked_positions", "score_batch", "substitution_log_odds"]
