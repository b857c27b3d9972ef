"""``protein-lm analyze``: attention -> amino-acid similarity, BLOSUM62 comparison, figures.

Reads the first ``--max-sequences`` records of a FASTA file, runs the model on each (one at a time,
``<cls> residues <eos>``, cropped to ``--max-length`` residues), sums the attention mass between
residue types for every layer and head, and writes to ``--out``:

* ``similarity.csv`` — the best head's 20×20 similarity (log2 odds), rows and columns labelled
  ``ARNDCQEGHILKMFPSTWYV``; ``similarity_aggregated.csv`` — all heads together;
* ``head_scores.csv`` — per (layer, head): Pearson and Spearman with BLOSUM62, ranks of (D,E), (F,Y);
* ``similarity_vs_blosum62.png`` (fixed order), ``similarity_vs_blosum62_clustered.png`` (one shared
  average-linkage order from the model's matrix), ``similarity_aggregated_vs_blosum62.png``,
  ``head_correlations.png``, ``attention_<protein>.png`` (layers × heads maps of one protein);
* ``mass.npy`` — the raw (layers, heads, 20, 20) attention mass, ``uniform_mass.npy`` the (20, 20)
  mass of uniform attention over the same proteins (the null); recompute anything from them;
* ``summary.json`` — ``blosum62_pearson``, ``blosum62_spearman`` (best head), ``best_layer``,
  ``best_head``, ``rank_DE``, ``rank_FY``, ``num_sequences``, … (see docs/analysis.md).

Everything is written into a temporary directory beside ``--out`` that is renamed at the end, so an
interrupted run leaves no half-written output. Method and formulas: docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from protein_lm.devices import resolve_device
from protein_lm.errors import UserError

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
        "--on-invalid",
        choices=("error", "skip"),
        default="error",
        help="a record with characters outside the alphabet: stop with an error (default) or skip it",
    )


def read_sequences(
    path: Path, limit: int | None, on_invalid: str = "error"
) -> Iterator[tuple[str, np.ndarray]]:
    """``(record id, residue token ids)`` of the first ``limit`` records of a FASTA(.gz) file.

    The one place this command reads FASTA (through :mod:`protein_lm.fasta`, which names the file, record
    and line in its errors).
    """
    from protein_lm.fasta import read_fasta

    counts: Counter = Counter()
    for n, record in enumerate(read_fasta(path, on_invalid=on_invalid, counts=counts)):
        if limit is not None and n >= limit:
            return
        yield record.id, record.tokens


def _find_protein(path: Path, protein_id: str, on_invalid: str) -> np.ndarray:
    for rid, tokens in read_sequences(path, None, on_invalid):
        if rid == protein_id:
            return tokens
    raise UserError(f"{path}: no record with id {protein_id!r} (--protein)")


def _write_matrix_csv(path: Path, matrix: np.ndarray) -> None:
    from protein_lm.tokenizer import STANDARD_AA

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


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is replaced only once ``tmp`` is complete."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the usual permissions of a new directory
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def run(args: argparse.Namespace) -> int:
    fasta = Path(args.fasta)
    out = Path(args.out).resolve()
    _check_out(out)
    if args.max_sequences < 1:
        raise UserError("--max-sequences must be at least 1")
    if args.max_length < 2:
        raise UserError("--max-length must be at least 2")
    if not fasta.is_file():
        raise UserError(f"{fasta}: FASTA file not found")

    import torch

    from protein_lm.analysis import plots
    from protein_lm.analysis.attention_maps import accumulate_similarity, attention_map, frame
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
    # An unknown --protein is reported before the (long) accumulation, not after it.
    picked = (args.protein, _find_protein(fasta, args.protein, args.on_invalid)) if args.protein else None

    t0 = time.time()
    acc = accumulate_similarity(
        model, sequences, exclude_self=not args.include_self, progress=True, total=len(sequences)
    )
    result = acc.result(pseudocount=args.pseudocount, null=args.null)
    seconds = time.time() - t0

    if picked is not None:
        protein_id, protein = picked
    else:
        protein_id, protein = next(
            ((rid, t) for rid, t in sequences if len(t) <= MAP_MAX_RESIDUES), sequences[0]
        )
    protein = protein[: min(MAP_MAX_RESIDUES, max_residues)]
    maps = attention_map(model, frame(protein).to(device))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        from protein_lm.analysis.blosum import compare_with_blosum62
        from protein_lm.tokenizer import TOKENS

        best = (result.best_layer, result.best_head)
        best_scores = compare_with_blosum62(result.best)
        title = f"layer {best[0]}, head {best[1]} (best of {cfg.depth * cfg.heads} heads)"
        _write_matrix_csv(tmp / "similarity.csv", result.best)
        _write_matrix_csv(tmp / "similarity_aggregated.csv", result.aggregated)
        _write_head_scores(tmp / "head_scores.csv", result)
        np.save(tmp / "mass.npy", result.mass)
        np.save(tmp / "uniform_mass.npy", acc.baseline)
        plots.save(
            plots.plot_similarity_vs_blosum(result.best, title, clustered=False, scores=best_scores),
            tmp / "similarity_vs_blosum62.png",
        )
        plots.save(
            plots.plot_similarity_vs_blosum(result.best, title, clustered=True, scores=best_scores),
            tmp / "similarity_vs_blosum62_clustered.png",
        )
        plots.save(
            plots.plot_similarity_vs_blosum(
                result.aggregated, "all heads (aggregated)", clustered=False, scores=result.aggregated_scores
            ),
            tmp / "similarity_aggregated_vs_blosum62.png",
        )
        plots.save(
            plots.plot_head_correlations(result.pearson, result.spearman, result.best, best),
            tmp / "head_correlations.png",
        )
        residues = "".join(TOKENS[int(i)] for i in protein)
        map_file = f"attention_{_safe_name(protein_id)}.png"
        plots.save(
            plots.plot_attention_grid(maps, residues, title=f"{protein_id}: {cfg.attention} attention"),
            tmp / map_file,
        )
        summary = result.summary()
        summary.update(
            {
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
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"analyze: {result.num_sequences} sequences; best head layer {best[0]} head {best[1]}: "
        f"Pearson {summary['blosum62_pearson']}, Spearman {summary['blosum62_spearman']} with BLOSUM62, "
        f"rank(D,E) {summary['rank_DE']}, rank(F,Y) {summary['rank_FY']} of 190 -> {out}",
        file=sys.stderr,
    )
    return 0
