"""``protein-lm score``: per-protein (pseudo-)log-likelihoods, or variant effects, as a CSV.

Without ``--mutations``, one row per FASTA record:

* masked LM: ``id,length,pll,pll_per_residue`` (every residue masked in turn);
* causal LM: ``id,length,log_likelihood,log_likelihood_per_residue``.

With ``--mutations M.csv`` (columns ``id,mutation``; ``A23P`` or ``A23P:K40E``, 1-based), one row
per mutation: ``id,mutation,masked_marginal,wildtype_marginal`` (masked LM) or
``id,mutation,delta_log_likelihood`` (causal LM). Natural log throughout; definitions in
:mod:`protein_lm.scoring`.
"""

from __future__ import annotations

import argparse
import csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt, exported weights file or directory")
    parser.add_argument("--fasta", required=True, help="FASTA(.gz) file; record ids must be unique")
    parser.add_argument("--out", required=True, help="output CSV file")
    parser.add_argument("--mutations", default=None, help="CSV with columns id,mutation: score these variants")
    parser.add_argument("--batch-size", type=int, default=32, help="model inputs per batch (default 32)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="residues shared by the windows of a protein longer than the model's window "
                             "(default: half the window)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from protein_lm.checkpoint import load_model
    from protein_lm.data.readers import read_proteins
    from protein_lm.devices import resolve_device
    from protein_lm.inference import progress, residues_per_window, window_starts
    from protein_lm.outputs import check_output_file, write_atomically
    from protein_lm.scoring import (
        count_mutation_queries,
        count_sequence_queries,
        read_mutations,
        score_mutations,
        score_sequences,
    )

    check_output_file(args.out, "--out")
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint)
    model.to(device).eval()
    causal = model.config.causal
    window = residues_per_window(model.config.max_length)
    overlap = window // 2 if args.overlap is None else args.overlap
    window_starts(window + 1, window, overlap)  # checks the overlap before any work
    proteins = read_proteins(args.fasta)
    if args.mutations:
        by_id = {p.id: p for p in proteins}
        mutations = read_mutations(args.mutations, by_id)
        total = count_mutation_queries(mutations, causal, by_id, window, overlap)
        with progress(total, "input", not args.quiet) as bar:
            scores = score_mutations(model, by_id, mutations, window, overlap, args.batch_size, args.bf16,
                                     on_batch=bar.update)
        columns = ["id", "mutation", *scores[0]]
        rows = [[m.id, m.text, *(f"{v:.6f}" for v in s.values())] for m, s in zip(mutations, scores, strict=True)]
    else:
        total = count_sequence_queries(proteins, window, overlap, causal)
        with progress(total, "input", not args.quiet) as bar:
            totals = score_sequences(model, proteins, window, overlap, args.batch_size, args.bf16,
                                     on_batch=bar.update)
        name = "log_likelihood" if causal else "pll"
        columns = ["id", "length", name, f"{name}_per_residue"]
        rows = [[p.id, len(p.tokens), f"{t:.6f}", f"{t / len(p.tokens):.6f}"] for p, t in zip(proteins, totals, strict=True)]

    def write(tmp) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)

    out = write_atomically(args.out, write, "--out")
    print(f"wrote {out}: {len(rows):,} rows ({', '.join(columns[2:])})")
    return 0
