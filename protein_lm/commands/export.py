"""``protein-lm export``: a Lightning checkpoint -> a weights-plus-config file (no optimiser state).

The output loads with ``torch.load(path, weights_only=True)`` (no code runs on load) and
with :func:`protein_lm.checkpoint.load_model`; ``evaluate``, ``analyze`` and the notebooks
accept it wherever they accept a ``.ckpt``.
"""

from __future__ import annotations

import argparse

from protein_lm.checkpoint import read_checkpoint, save_weights, weights_payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt (or an exported file)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.pt")


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
    out = save_weights(payload, args.out)
    n = sum(v.numel() for v in payload["state_dict"].values())
    print(f"wrote {out} ({ckpt['config']['attention']}, {ckpt['objective']}, {n:,} weights)")
    return 0
