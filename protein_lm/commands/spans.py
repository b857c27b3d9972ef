"""``protein-lm spans``: the learned adaptive attention span of every layer and head, as a figure.

    protein-lm spans --checkpoint CKPT --out spans.png [--json spans.json] [--kind bars|heatmap]
    protein-lm spans --checkpoint CKPT --out spans.png --fasta proteins.fasta   # dynamic spans

Static spans are read from the weights. Dynamic spans (``span.dynamic: true``) depend on the input,
so ``--fasta`` is required for them: the first ``--max-sequences`` records (cropped to
``--max-length`` residues) are run through the model and each head's span is averaged over all
their real tokens. Outputs are written atomically; errors are one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protein_lm.errors import UserError
from protein_lm.outputs import check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt or exported weights file")
    parser.add_argument("--out", required=True, help="figure file (.png, .pdf or .svg)")
    parser.add_argument("--json", default=None, help="also write the spans (layers x heads, tokens) as JSON")
    parser.add_argument(
        "--kind",
        choices=("bars", "heatmap"),
        default="bars",
        help="grouped bars per layer (default) or heatmap",
    )
    parser.add_argument(
        "--fasta", default=None, help="FASTA(.gz) inputs for dynamic spans (required for them)"
    )
    parser.add_argument(
        "--max-sequences", type=int, default=64, help="dynamic spans: first N records (default 64)"
    )
    parser.add_argument(
        "--max-length", type=int, default=1024, help="dynamic spans: crop to L residues (default 1024)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="dynamic spans: sequences per forward (default 8)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:1, ...")


def _batches(args: argparse.Namespace, device, max_residues: int):
    """``(input_ids, padding_mask)`` batches of the first records of ``--fasta``, each cropped to
    ``max_residues``."""
    from protein_lm.analysis.spans import batch_sequences
    from protein_lm.data.readers import read_sequences

    fasta = Path(args.fasta)
    if not fasta.is_file():
        raise UserError(f"{fasta}: FASTA file not found (--fasta)")
    seqs = [t[:max_residues] for _, t in read_sequences(fasta, args.max_sequences)]
    if not seqs:
        raise UserError(f"{fasta}: no sequences")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    return [
        tuple(x.to(device) for x in batch_sequences([seqs[i] for i in order[s : s + args.batch_size]]))
        for s in range(0, len(order), args.batch_size)
    ]


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json")
    for flag, value in (("--max-sequences", args.max_sequences), ("--max-length", args.max_length)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")

    from protein_lm.analysis.spans import head_spans, plot_spans, save_figure, write_json
    from protein_lm.checkpoint import load_model
    from protein_lm.devices import resolve_device

    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, map_location="cpu")
    model = model.to(device).eval()
    dynamic = model.config.span.dynamic and model.config.span.enabled
    max_residues = args.max_length
    if model.config.position == "learned":  # no position embedding beyond the trained window
        max_residues = min(max_residues, model.config.max_length - 2)
    batches = _batches(args, device, max_residues) if dynamic and args.fasta else None
    if args.fasta and not dynamic:
        print("spans: --fasta ignored: static spans are read from the weights", file=sys.stderr)
    try:
        report = head_spans(model, batches)
    except UserError as err:  # name the checkpoint: "no adaptive span", "dynamic spans need --fasta"
        raise UserError(f"{args.checkpoint}: {err}") from None
    report.source = str(args.checkpoint)
    if dynamic:
        report.extra.update(
            fasta=str(args.fasta), max_sequences=args.max_sequences, max_residues=max_residues
        )
    save_figure(plot_spans(report, kind=args.kind), args.out, "--out")
    if args.json:
        write_json(report, args.json)
    for layer, row in zip(report.layers, report.spans, strict=True):
        print(
            f"spans: layer {layer}: mean {row.mean():.1f}, max {row.max():.1f} of S = {report.max_span:g} tokens",
            file=sys.stderr,
        )
    print(f"spans: wrote {args.out}" + (f" and {args.json}" if args.json else ""), file=sys.stderr)
    return 0
