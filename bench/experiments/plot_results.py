"""Figures for docs/results.md from the CSV logs that bench/experiments/swissprot_runs.py brought back.

    python -m bench.experiments.plot_results [--results results/swissprot_h100] [--out docs/results]

Writes ``learning_curves.png`` (validation perplexity vs step, one panel per setting, one line per
attention type) and ``transfer.png`` (exact -> Performer weight transfer: accuracy while fine-tuning).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETTINGS = {"bid": "BID (masked LM), L=1024", "uni": "UNI (causal LM), L=1024", "concat": "BID, concatenated, L=8192"}
ATTENTIONS = ("performer-softmax", "performer-relu", "exact")


def series(path: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                steps.append(int(float(row["step"])))
                values.append(float(row[key]))
    return steps, values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results/swissprot_h100")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--prefix", default="", help="prefix of the figure file names (one campaign per prefix)")
    args = p.parse_args()
    res, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((res / "summary.json").read_text())

    settings = {s: t for s, t in SETTINGS.items() if any(r["setting"] == s for r in summary["runs"].values())}
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.2), sharey=False, squeeze=False)
    for ax, (setting, title) in zip(axes[0], settings.items(), strict=True):
        for attention in ATTENTIONS:
            steps, ppl = series(res / f"{setting}_{attention}.metrics.csv", "val/perplexity")
            ax.plot(steps, ppl, marker="o", ms=3, label=attention)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend()
    n_runs = len(summary["runs"])
    fig.suptitle(f"Swiss-Prot 2014 subset, equal budgets ({summary['steps']} steps), {summary['gpu']}"
                 f" ({n_runs} runs sharing the GPU)", fontsize=10)
    fig.tight_layout()
    curves, transfer_png = out / f"{args.prefix}learning_curves.png", out / f"{args.prefix}transfer.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    transfer = summary["transfer"]
    steps = [0] + [r["step"] + 1 for r in transfer["curve"]]
    acc = [transfer["step0_test"]["accuracy"]] + [r["val/accuracy"] for r in transfer["curve"]]
    exact = summary["runs"]["bid_exact"]["test"]["accuracy"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(steps, [100 * a for a in acc], marker="o", label="exact weights + FAVOR+ softmax, fine-tuned")
    ax.axhline(100 * exact, color="k", ls="--", label=f"exact attention model ({100 * exact:.2f}%)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("masked-token accuracy (%)")
    ax.set_title("Backward compatibility: exact -> Performer transfer")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(transfer_png, dpi=120)
    plt.close(fig)
    print(f"wrote {curves} and {transfer_png}")


if __name__ == "__main__":
    main()
