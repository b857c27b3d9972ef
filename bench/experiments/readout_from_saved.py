"""Recompute the readouts of an `analyze` output from its saved arrays (no model, no GPU).

`analyze` saves the raw sums behind every statistic (``vig_soft_sums.npy``, ``vig_exact_sums.npy``,
``substitution_counts.npy``), so a statistic can be recomputed — e.g. after a formula changes, or
with another ``--vig-min-total`` — from an analysis run elsewhere:

    python -m bench.experiments.readout_from_saved results/h200_recipes/analysis_cath1000_exact [--json OUT]

Prints (and optionally writes) Pearson r with BLOSUM62 and the permutation p-value of each readout.
Chance levels (random weights) need the model and are not recomputed here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from protein_lm.analysis.blosum import pair_rank
from protein_lm.analysis.permutation import blosum_permutation_test
from protein_lm.analysis.substitution import substitution_log_odds
from protein_lm.analysis.vig import MIN_TOTAL, VigResult


def recompute(folder: Path, permutations: int, min_total: float) -> dict:
    out: dict = {"folder": str(folder)}
    matrices = {}
    for variant in ("soft", "exact"):
        path = folder / f"vig_{variant}_sums.npy"
        if path.exists():
            r = VigResult.from_sums(np.load(path), min_total)
            matrices[f"vig_{variant}"] = r.matrix
            out[f"vig_{variant}_num_heads"] = r.num_heads
    path = folder / "substitution_counts.npy"
    if path.exists():
        matrices["substitution"] = substitution_log_odds(np.load(path))
    for name, matrix in matrices.items():
        r, p = blosum_permutation_test(matrix, permutations)
        out[f"{name}_pearson"] = None if not np.isfinite(r) else round(r, 6)
        out[f"{name}_p_value"] = None if not np.isfinite(p) else p
        out[f"{name}_rank_DE"] = pair_rank(matrix, "D", "E")
        out[f"{name}_rank_FY"] = pair_rank(matrix, "F", "Y")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="analyze output directories")
    p.add_argument("--permutations", type=int, default=9999)
    p.add_argument("--min-total", type=float, default=MIN_TOTAL)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results = [recompute(f, args.permutations, args.min_total) for f in args.folders]
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
