"""``protein-lm export``: a Lightning checkpoint -> weights plus config (no optimiser state).

``--format pt`` (default) writes one file that loads with ``torch.load(path, weights_only=True)``
(no code runs on load); ``--format safetensors`` writes a directory ``model.safetensors`` +
``config.json`` + ``vocab.txt`` that needs neither torch pickles nor this package to read
(:mod:`protein_lm.safetensors_dir`). Both load with :func:`protein_lm.checkpoint.load_model`, and
every command accepts them wherever it accepts a ``.ckpt``.
"""

from __future__ import annotations

import argparse

from protein_lm.checkpoint import read_checkpoint, save_weights, weights_payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt (or an exported file)")
    parser.add_argument("--out", required=True, help="output file (pt, e.g. model.pt) or new directory (safetensors)")
    parser.add_argument("--format", choices=("pt", "safetensors"), default="pt",
                        help="pt: one torch file; safetensors: a directory with model.safetensors + config.json")


def run(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.checkpoint)
    payload = weights_payload(
        ckpt["config"],
        ckpt["objective"],
        ckpt["state_dict"],
        ckpt["metrics"],
        global_step=ckpt["global_step"],
        epoch=ckpt["epoch"],
    )
    if args.format == "safetensors":
        from protein_lm.safetensors_dir import save_directory

        out = save_directory(payload, args.out)
    else:
        out = save_weights(payload, args.out)
    n = sum(v.numel() for v in payload["state_dict"].values())
    print(f"wrote {out} ({ckpt['config']['attention']}, {ckpt['objective']}, {n:,} weights)")
    return 0
