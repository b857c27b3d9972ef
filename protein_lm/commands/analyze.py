"""``protein-lm analyze``: amino-acid similarity read off attention and predictions, vs BLOSUM62.

Reads the first ``--max-sequences`` records of a FASTA file, frames each ``<cls> residues <eos>``
(cropped to ``--max-length`` residues), and runs them in length-sorted batches through the model and
through ``--random-inits`` random-weight models of the same architecture (the chance level). Per model:
Vig et al.'s statistic (soft and thresholded), the masked-LM substitution readout, and the older
log-odds view of attention mass between residue types; label-permutation p-values for the trained model.
Writes to ``--out`` (file list and every ``summary.json`` key in docs/analysis.md):

* ``summary.json`` — ``vig_soft_pearson``, ``vig_soft_p_value``, ``vig_exact_*``, ``substitution_*``,
  ``random_weights`` (per seed) and ``*_random_mean``, per-layer curves, the log-odds view and settings;
* ``similarity_vs_blosum62.png`` (headline: Vig soft), ``vig_exact_vs_blosum62.png``,
  ``substitution_vs_blosum62.png``, ``vig_per_layer.png``, the ``logodds_*`` figures and an
  ``attention_<protein>.png`` of one protein;
* the matrices as CSV and the raw sums as ``.npy`` (recompute anything from them).

Everything is written into a temporary directory beside ``--out`` that is renamed at the end, so an
interrupted run leaves no half-written output.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from protein_lm.analysis.vig import EXACT_THRESHOLD, MIN_TOTAL, VARIANTS
from protein_lm.data.readers import read_sequences
from protein_lm.devices import resolve_device
from protein_lm.errors import UserError
from protein_lm.io import remove_stale, replace_dir, scratch_dir

DEFAULT_BATCH_TOKENS = 8192  # as attention_maps' (not imported here: it would load torch for --help)
MAP_MAX_RESIDUES = 128  # per-protein figure: longer proteins are cropped for legibility


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt or exported weights file")
    parser.add_argument("--fasta", required=True, help="FASTA(.gz) of proteins to analyse")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument(
        "--max-sequences", type=int, default=200, help="analyse the first N records (default 200)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="crop each sequence to its first L residues (default 1024)",
    )
    parser.add_argument(
        "--protein",
        default=None,
        help="record id for the per-protein attention figure (default: the first analysed protein "
        f"of at most {MAP_MAX_RESIDUES} residues)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--pseudocount",
        type=float,
        default=1e-3,
        help="fraction of the total attention mass spread evenly over the 400 residue pairs (default 1e-3)",
    )
    parser.add_argument(
        "--null",
        choices=("uniform", "marginal"),
        default="uniform",
        help="expected mass: uniform attention within the same proteins (default; controls for "
        "composition) or the product of the attention's own type frequencies (BLOSUM-style)",
    )
    parser.add_argument(
        "--include-self",
        action="store_true",
        help="keep each position's attention to itself (left out by default: it only feeds the diagonal)",
    )
    parser.add_argument(
        "--random-inits",
        type=int,
        default=2,
        help="chance level: random initialisations of the checkpoint's architecture analysed on the "
        "same proteins (default 2)",
    )
    parser.add_argument(
        "--permutations",
        type=int,
        default=9999,
        help="residue-label permutations for each p-value (default 9999)",
    )
    parser.add_argument(
        "--vig-threshold",
        type=float,
        default=EXACT_THRESHOLD,
        help=f"Vig et al.'s exact variant keeps attention edges above this weight (default {EXACT_THRESHOLD})",
    )
    parser.add_argument(
        "--vig-min-total",
        type=float,
        default=MIN_TOTAL,
        help=f"heads with less kept attention weight are dropped (default {MIN_TOTAL:g})",
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=DEFAULT_BATCH_TOKENS,
        help=f"framed, padded tokens per batch (default {DEFAULT_BATCH_TOKENS}); results do not depend on it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds masks, random weights, permutations")
    parser.add_argument(
        "--on-invalid",
        choices=("error", "skip"),
        default="error",
        help="a record with characters outside the alphabet: stop with an error (default) or skip it",
    )


def _find_protein(path: Path, protein_id: str, on_invalid: str) -> np.ndarray:
    for rid, tokens in read_sequences(path, None, on_invalid):
        if rid == protein_id:
            return tokens
    raise UserError(f"{path}: no record with id {protein_id!r} (--protein)")


def _write_matrix_csv(path: Path, matrix: np.ndarray) -> None:
    from protein_lm.data.tokenizer import STANDARD_AA

    lines = ["," + ",".join(STANDARD_AA)]
    for a, row in zip(STANDARD_AA, matrix, strict=True):
        lines.append(a + "," + ",".join("nan" if not np.isfinite(v) else f"{v:.6f}" for v in row))
    path.write_text("\n".join(lines) + "\n")


def _write_head_scores(path: Path, result) -> None:
    from protein_lm.analysis.blosum import pair_rank

    lines = ["layer,head,pearson,spearman,rank_DE,rank_FY"]
    layers, heads = result.pearson.shape
    for l in range(layers):
        for h in range(heads):
            sim = result.per_head[l, h]
            lines.append(
                f"{l},{h},{result.pearson[l, h]:.6f},{result.spearman[l, h]:.6f},"
                f"{pair_rank(sim, 'D', 'E')},{pair_rank(sim, 'F', 'Y')}"
            )
    path.write_text("\n".join(lines) + "\n")


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80] or "protein"


def _check_out(out: Path) -> None:
    """``--out`` may be new, empty, or an earlier analyze output (which is replaced) — nothing else.

    Replacing is done directory-wise, so a directory holding anything else (``--out .``, a home
    directory) must never be accepted.
    """
    if not out.name or out == Path.cwd() or out in Path.cwd().parents:
        raise UserError(f"--out {out}: give a new directory for the analysis, not this one or a parent of it")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / "summary.json").is_file():
            raise UserError(
                f"--out {out}: exists and is not an earlier analyze output; choose a new directory"
            )


def _check_writable(directory: Path) -> None:
    """Fail now, not after the analysis, when the output's folder cannot be written."""
    from protein_lm.outputs import can_write_in

    err = can_write_in(directory)
    if err is not None:
        raise UserError(f"--out: cannot write to {directory} ({err.strerror or err}); choose another directory")


def _check_args(args: argparse.Namespace) -> None:
    """Every numeric option's range, before any work (a one-line error each)."""
    checks = [
        (args.max_sequences >= 1, "--max-sequences must be at least 1"),
        (args.max_length >= 2, "--max-length must be at least 2"),
        (math.isfinite(args.pseudocount) and 0 <= args.pseudocount < 1, "--pseudocount must be in [0, 1)"),
        (args.random_inits >= 2, "--random-inits must be at least 2 (the chance level of every statistic)"),
        (args.permutations >= 99, "--permutations must be at least 99"),
        (math.isfinite(args.vig_threshold) and 0 <= args.vig_threshold < 1, "--vig-threshold must be in [0, 1)"),
        (math.isfinite(args.vig_min_total) and args.vig_min_total > 0, "--vig-min-total must be > 0"),
        (args.seed >= 0, "--seed must be >= 0"),
        (args.batch_tokens >= 1, "--batch-tokens must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _readout(model, sequences, args, label: str) -> dict:
    """Every accumulator of one model over the analysed proteins."""
    from protein_lm.analysis.attention_maps import accumulate_similarity
    from protein_lm.analysis.substitution import SubstitutionAccumulator
    from protein_lm.analysis.vig import VigAccumulator

    cfg = model.config
    vig = VigAccumulator(cfg.depth, cfg.heads, threshold=args.vig_threshold)
    substitution = SubstitutionAccumulator()
    acc = accumulate_similarity(
        model,
        sequences,
        exclude_self=not args.include_self,
        progress=True,
        vig=vig,
        substitution=substitution,
        batch_tokens=args.batch_tokens,
        seed=args.seed,
        label=f"analyze: {label}",
    )
    return {
        "acc": acc,
        "logodds": acc.result(pseudocount=args.pseudocount, null=args.null),
        "vig": {v: vig.result(v, args.vig_min_total) for v in VARIANTS},
        "vig_per_layer": {v: vig.per_layer(v, args.vig_min_total) for v in VARIANTS},
        "vig_sums": vig.sums,
        "substitution": substitution,
    }


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _statistics(readout: dict, args, p_values: bool) -> dict:
    """The headline numbers of one model (with permutation p-values when asked)."""
    from protein_lm.analysis.permutation import blosum_permutation_test

    out: dict = {}
    matrices = {f"vig_{v}": r.matrix for v, r in readout["vig"].items()}
    matrices["substitution"] = readout["substitution"].matrix
    for v, r in readout["vig"].items():
        out.update(
            {
                f"vig_{v}_pearson": _num(r.pearson),
                f"vig_{v}_spearman": _num(r.spearman),
                f"vig_{v}_num_heads": r.num_heads,
                f"vig_{v}_rank_DE": r.rank_DE,
                f"vig_{v}_rank_FY": r.rank_FY,
                f"vig_{v}_per_layer_pearson": [_num(x.pearson) for x in readout["vig_per_layer"][v]],
            }
        )
    sub = readout["substitution"].summary()
    out.update({f"substitution_{k}": (_num(x) if isinstance(x, float) else x) for k, x in sub.items()})
    logodds = readout["logodds"]
    out["logodds_best_head_pearson"] = _num(logodds.pearson[logodds.best_layer, logodds.best_head])
    if p_values:
        for name, matrix in matrices.items():
            _, p = blosum_permutation_test(matrix, args.permutations, seed=args.seed)
            out[f"{name}_p_value"] = _num(p)
        # The best of all heads: every permutation repeats the choice of the best head.
        _, p = blosum_permutation_test(logodds.per_head.reshape(-1, 20, 20), args.permutations, seed=args.seed)
        out["logodds_best_head_p_value"] = _num(p)
    return out


def _chance_text(stats: dict, random_stats: list[dict], key: str) -> str:
    values = [r[key] for r in random_stats if r[key] is not None]
    rnd = ", ".join(f"{v:.2f}" for v in values) or "n/a"
    p = stats.get(f"{key.removesuffix('_pearson')}_p_value")
    r = stats[key]
    text = f"Pearson r = {r:.3f}" if r is not None else "Pearson r = n/a"
    if p is not None:
        text += f", permutation p = {p:.2g}"
    return text + f"; random weights of this architecture: r = {rnd}"


def run(args: argparse.Namespace) -> int:
    fasta = Path(args.fasta)
    out = Path(args.out).resolve()
    _check_out(out)
    _check_args(args)
    if not fasta.is_file():
        raise UserError(f"{fasta}: FASTA file not found")
    _check_writable(out.parent)

    import torch

    from protein_lm.analysis import plots
    from protein_lm.analysis.attention_maps import attention_map, frame
    from protein_lm.analysis.chance import random_weights_like
    from protein_lm.checkpoint import load_model

    device = resolve_device(args.device)
    model, info = load_model(args.checkpoint, map_location="cpu")
    model = model.to(device).eval()
    cfg = model.config
    print(
        f"analyze: {cfg.attention} model, {cfg.depth} layers x {cfg.heads} heads, "
        f"{'causal' if cfg.causal else 'bidirectional'}, on {device}",
        file=sys.stderr,
    )
    max_residues = args.max_length
    if cfg.position == "learned" and max_residues > cfg.max_length - 2:
        # No position embedding beyond the trained window (<cls> + residues + <eos>): crop, don't crash.
        max_residues = cfg.max_length - 2
        print(
            f"analyze: cropping sequences to {max_residues} residues: the model has learned positions "
            f"up to max_length {cfg.max_length}",
            file=sys.stderr,
        )
    sequences = [
        (rid, tokens[:max_residues])
        for rid, tokens in read_sequences(fasta, args.max_sequences, args.on_invalid)
    ]
    if not sequences:
        raise UserError(f"{fasta}: no sequences to analyse")
    from protein_lm.data.tokenizer import STANDARD_AA_IDS

    if not any(np.isin(np.asarray(t), STANDARD_AA_IDS).any() for _, t in sequences):
        raise UserError(f"{fasta}: no standard amino acids in the analysed records (only X, B, Z, U, O or gaps)")
    # An unknown --protein is reported before the (long) accumulation, not after it.
    picked = (args.protein, _find_protein(fasta, args.protein, args.on_invalid)) if args.protein else None

    t0 = time.time()
    trained = _readout(model, sequences, args, "trained model")
    stats = _statistics(trained, args, p_values=True)
    random_seeds = [args.seed + 1000 + i for i in range(args.random_inits)]
    random_stats = []
    for s in random_seeds:
        fresh = random_weights_like(model, s)
        random_stats.append(_statistics(_readout(fresh, sequences, args, f"random weights (seed {s})"), args, False))
        del fresh
    seconds = time.time() - t0
    result = trained["logodds"]
    acc = trained["acc"]

    if picked is not None:
        protein_id, protein = picked
    else:
        protein_id, protein = next(
            ((rid, t) for rid, t in sequences if len(t) <= MAP_MAX_RESIDUES), sequences[0]
        )
    protein = protein[: min(MAP_MAX_RESIDUES, max_residues)]
    maps = attention_map(model, frame(protein).to(device))

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # scratch directories of analyses that were killed
    tmp = scratch_dir(out)
    try:
        from protein_lm.analysis.blosum import compare_with_blosum62
        from protein_lm.data.tokenizer import TOKENS

        heads_total = cfg.depth * cfg.heads
        for v in VARIANTS:
            r = trained["vig"][v]
            _write_matrix_csv(tmp / f"vig_{v}.csv", r.matrix)
            np.save(tmp / f"vig_{v}_sums.npy", trained["vig_sums"][v])
            name = "similarity_vs_blosum62.png" if v == "soft" else f"vig_{v}_vs_blosum62.png"
            what = "every edge weighted by its attention" if v == "soft" else f"edges > {args.vig_threshold:g}"
            plots.save(
                plots.plot_readout_vs_blosum(
                    r.matrix,
                    f"Vig et al. ({v}: {what}), {r.num_heads} of {heads_total} heads",
                    _chance_text(stats, random_stats, f"vig_{v}_pearson"),
                ),
                tmp / name,
            )
        sub = trained["substitution"]
        _write_matrix_csv(tmp / "substitution.csv", sub.matrix)
        np.save(tmp / "substitution_counts.npy", sub.counts)
        plots.save(
            plots.plot_readout_vs_blosum(
                sub.matrix,
                f"masked-LM substitutions (log2 odds), {sub.num_positions:,} positions"
                if not cfg.causal
                else f"next-residue predictions (log2 odds), {sub.num_positions:,} positions",
                _chance_text(stats, random_stats, "substitution_pearson"),
            ),
            tmp / "substitution_vs_blosum62.png",
        )
        curves = {"trained": stats["vig_soft_per_layer_pearson"]}
        for s, r in zip(random_seeds, random_stats, strict=True):
            curves[f"random weights (seed {s})"] = r["vig_soft_per_layer_pearson"]
        curves = {k: [np.nan if x is None else x for x in v] for k, v in curves.items()}
        plots.save(
            plots.plot_per_layer(curves, "Vig et al. (soft), heads of each layer alone"),
            tmp / "vig_per_layer.png",
        )

        # The log-odds view (attention mass between residue types against uniform attention).
        best = (result.best_layer, result.best_head)
        best_scores = compare_with_blosum62(result.best)
        title = f"layer {best[0]}, head {best[1]} (best of {heads_total} heads)"
        _write_matrix_csv(tmp / "logodds_best_head.csv", result.best)
        _write_matrix_csv(tmp / "logodds_aggregated.csv", result.aggregated)
        _write_head_scores(tmp / "logodds_head_scores.csv", result)
        np.save(tmp / "mass.npy", result.mass)
        np.save(tmp / "uniform_mass.npy", acc.baseline)
        plots.save(
            plots.plot_similarity_vs_blosum(result.best, title, clustered=False, scores=best_scores),
            tmp / "logodds_best_head_vs_blosum62.png",
        )
        plots.save(
            plots.plot_similarity_vs_blosum(result.best, title, clustered=True, scores=best_scores),
            tmp / "logodds_best_head_vs_blosum62_clustered.png",
        )
        plots.save(
            plots.plot_similarity_vs_blosum(
                result.aggregated, "all heads (aggregated)", clustered=False, scores=result.aggregated_scores
            ),
            tmp / "logodds_aggregated_vs_blosum62.png",
        )
        plots.save(
            plots.plot_head_correlations(result.pearson, result.spearman, result.best, best),
            tmp / "logodds_head_correlations.png",
        )
        residues = "".join(TOKENS[int(i)] for i in protein)
        map_file = f"attention_{_safe_name(protein_id)}.png"
        plots.save(
            plots.plot_attention_grid(maps, residues, title=f"{protein_id}: {cfg.attention} attention"),
            tmp / map_file,
        )
        summary = {"headline": "vig_soft", **stats}
        summary["random_weights"] = [{"seed": s, **r} for s, r in zip(random_seeds, random_stats, strict=True)]
        for key in ("vig_soft_pearson", "vig_exact_pearson", "substitution_pearson", "logodds_best_head_pearson"):
            values = [r[key] for r in random_stats if r[key] is not None]
            summary[f"{key}_random_mean"] = _num(float(np.mean(values))) if values else None
        summary.update(result.summary())
        summary.update(
            {
                "vig_threshold": args.vig_threshold,
                "vig_min_total": args.vig_min_total,
                "permutations": args.permutations,
                "seed": args.seed,
                "checkpoint": str(args.checkpoint),
                "fasta": str(fasta),
                "attention": cfg.attention,
                "causal": bool(cfg.causal),
                "objective": info.get("objective"),
                "max_sequences": args.max_sequences,
                "max_length": max_residues,  # the crop applied (learned positions may lower it)
                "exclude_self": not args.include_self,
                "attention_map_protein": protein_id,
                "attention_map_file": map_file,
                "device": str(device),
                "torch": torch.__version__,
                "seconds": round(seconds, 2),
            }
        )
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        replace_dir(tmp, out)  # an earlier output is replaced only now that this one is complete
    except OSError as e:  # e.g. the disk filled up while writing: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--out {out}: could not write the analysis ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rnd = summary["vig_soft_pearson_random_mean"]
    print(
        f"analyze: {result.num_sequences} proteins; Vig et al. (soft) r = {summary['vig_soft_pearson']} "
        f"(p = {summary['vig_soft_p_value']}; random weights {rnd}), exact r = {summary['vig_exact_pearson']} "
        f"(p = {summary['vig_exact_p_value']}); masked-LM substitutions r = {summary['substitution_pearson']} "
        f"(p = {summary['substitution_p_value']}); rank(D,E) {summary['vig_soft_rank_DE']}, "
        f"rank(F,Y) {summary['vig_soft_rank_FY']} of 190 -> {out}",
        file=sys.stderr,
    )
    return 0
