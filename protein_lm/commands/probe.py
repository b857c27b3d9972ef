"""``protein-lm probe``: Q3 of a secondary-structure probe on frozen embeddings (FLIP), vs baselines.

Trains a head on the per-residue embeddings of ``--checkpoint`` (and of a seeded random-weights
model of the same architecture, and of one-hot residues) over FLIP's secondary-structure train
chains and reports Q3 on its test chains; what is measured and why: :mod:`protein_lm.probe`.
Prints a table and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse

FEATURES = ("model", "random", "onehot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt, exported weights file or directory")
    parser.add_argument("--data", required=True,
                        help="FLIP secondary_structure_splits.zip (or a directory holding its three FASTA files)")
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--layer", type=int, default=-1, help="embedding layer (0 = token embedding, -1 = last)")
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES),
                        help="what to probe (default: model random onehot)")
    parser.add_argument("--heads", nargs="+", choices=("linear", "mlp"), default=["linear", "mlp"],
                        help="probe heads (default: linear mlp)")
    parser.add_argument("--max-train", type=int, default=None, help="use at most N training chains (random, seeded)")
    parser.add_argument("--max-val", type=int, default=None, help="use at most N validation chains")
    parser.add_argument("--max-test", type=int, default=None, help="use at most N test chains (default all)")
    parser.add_argument("--batch-size", type=int, default=8, help="model inputs per batch (default 8)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0, help="seeds the subsampling, the random model and the MLP")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    import platform
    import time

    import torch

    from protein_lm.checkpoint import load_model
    from protein_lm.data.readers import Protein
    from protein_lm.devices import resolve_device
    from protein_lm.embeddings import embed_proteins
    from protein_lm.errors import UserError
    from protein_lm.inference import progress, residues_per_window
    from protein_lm.model import ModelConfig, ProteinLM
    from protein_lm.outputs import check_output_file, write_atomically
    from protein_lm.probe import load_flip_secondary_structure, onehot_features, probe_features, subsample

    check_output_file(args.out, "--out")
    start = time.perf_counter()
    device = resolve_device(args.device)
    trained, info = load_model(args.checkpoint)
    try:
        layer = trained.hidden_layers([args.layer])[args.layer]
    except IndexError as err:
        raise UserError(f"--layer: {err}") from None
    chains = load_flip_secondary_structure(args.data)
    limits = {"train": args.max_train, "val": args.max_val, "test": args.max_test}
    splits = {s: subsample(chains, s, limits[s], args.seed) for s in limits}
    for s, chosen in splits.items():
        if not chosen:
            raise UserError(f"--data {args.data}: no {s} chains")

    def embed(model: ProteinLM, name: str) -> dict[str, list[torch.Tensor]]:
        model.to(device).eval()
        window = residues_per_window(model.config.max_length)
        out = {}
        total = sum(len(c) for c in splits.values())
        with progress(total, "chain", not args.quiet) as bar:
            bar.set_description(name)
            for s, chosen in splits.items():
                feats = []
                for i in range(0, len(chosen), 64):
                    part = [Protein(c.id, c.tokens) for c in chosen[i : i + 64]]
                    emb = embed_proteins(model, part, [layer], window, window // 4, args.batch_size, ["per_tok"])
                    feats += [e["per_tok"][layer] for e in emb]
                    bar.update(len(part))
                out[s] = feats
        model.cpu()
        return out

    results = {}
    for name in dict.fromkeys(args.features):
        if name == "model":
            feats = embed(trained, "model")
        elif name == "random":
            config = {**trained.config.to_dict(), "feature_seed": args.seed}
            torch.manual_seed(args.seed)
            feats = embed(ProteinLM(ModelConfig.from_dict(config)), "random weights")
        else:
            feats = {s: [onehot_features(c) for c in chosen] for s, chosen in splits.items()}
        results[name] = probe_features(splits, feats, args.heads)
    counts = {s: {"chains": len(c), "residues": int(sum(x.resolved.sum() for x in c))} for s, c in splits.items()}
    report = {
        "task": "FLIP secondary structure, sampled split, Q3 over resolved residues",
        "checkpoint": str(args.checkpoint), "data": str(args.data), "layer": layer,
        "objective": info["objective"], "splits": counts, "max_train": args.max_train, "seed": args.seed,
        "results": results, "device": str(device), "machine": platform.processor() or platform.machine(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(report, indent=2)
    write_atomically(args.out, lambda tmp: tmp.write_text(text + "\n"), "--out")
    print(f"Q3 on {counts['test']['residues']:,} test residues ({counts['test']['chains']} chains; trained on "
          f"{counts['train']['chains']} chains):")
    for name, by_head in results.items():
        print(f"  {name:<8} " + "  ".join(f"{h} {r['q3_test']:.4f}" for h, r in by_head.items()))
    print(f"wrote {args.out}")
    return 0
