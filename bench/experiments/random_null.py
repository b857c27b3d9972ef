"""How much BLOSUM62 'agreement' does an UNTRAINED model show? (the control for docs/analysis.md)

    python -m bench.experiments.random_null [--sequences 60] [--seed 0]

Builds a random-weights Performer-softmax model (4 layers x 4 heads, d 128, m 64 — the quickstart
shape), runs ``protein-lm analyze`` on the first proteins of the shipped sample under both nulls
(``uniform``, the default, and ``marginal``), and writes ``results/random_null.json``.
A trained model's numbers mean something only above these.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.cli import main as cli
from protein_lm.model import ModelConfig, ProteinLM

REPO = Path(__file__).resolve().parents[2]

KEYS = ("blosum62_pearson", "aggregated_blosum62_pearson", "blosum62_spearman", "rank_DE", "rank_FY")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(REPO / "results" / "random_null.json"))
    args = p.parse_args()
    torch.manual_seed(args.seed)
    config = ModelConfig(dim=128, depth=4, heads=4, ff_dim=256, attention="performer-softmax", num_features=64,
                         feature_seed=args.seed)
    model = ProteinLM(config)
    results = {"model": config.to_dict(), "seed": args.seed, "sequences": args.sequences, "nulls": {}}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "random.pt"
        save_weights(weights_payload(config, "mlm", model.state_dict()), weights)
        for null in ("uniform", "marginal"):
            out = Path(tmp) / null
            rc = cli(["analyze", "--checkpoint", str(weights), "--fasta", str(REPO / "data" / "swissprot_sample.fasta.gz"),
                      "--max-sequences", str(args.sequences), "--null", null, "--out", str(out)])
            if rc != 0:
                raise SystemExit(f"analyze failed ({rc})")
            summary = json.loads((out / "summary.json").read_text())
            results["nulls"][null] = {k: summary[k] for k in KEYS}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'null':<10}" + "".join(f"{k:>30}" for k in KEYS))
    for null, row in results["nulls"].items():
        print(f"{null:<10}" + "".join(f"{row[k]:>30}" for k in KEYS))


if __name__ == "__main__":
    main()
