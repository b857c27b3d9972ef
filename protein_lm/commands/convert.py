"""``protein-lm convert``: an ``exact``-attention model -> a Performer with the same weights.

The Performer paper's backward-compatibility claim: FAVOR+ approximates softmax attention
without new parameters, so a Transformer's weights can be reused as they are (only the
random projection is new), and a short fine-tuning run recovers the accuracy. The output is
an exported weights file; fine-tune it with
``protein-lm fit --config <performer config> --model.init_weights OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from protein_lm.checkpoint import read_checkpoint, save_weights, weights_payload
from protein_lm.errors import UserError
from protein_lm.model import ModelConfig, ProteinLM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="exact-attention .ckpt or exported weights file")
    parser.add_argument(
        "--attention", required=True, choices=["performer-softmax", "performer-relu", "exact"], help="new attention"
    )
    parser.add_argument("--num-features", type=int, default=None, help="random features M (default: config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new random projections")
    parser.add_argument("--out", required=True, help="output weights file")


def convert_state(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], attention: str,
    num_features: int | None = None, seed: int = 0,
) -> tuple[ModelConfig, ProteinLM]:
    """A model with ``attention`` whose every shared weight equals ``state_dict``'s."""
    changes = {"attention": attention, "feature_seed": seed}
    if num_features is not None:
        changes["num_features"] = num_features
    new_config = dataclasses.replace(config, **changes)
    model = ProteinLM(new_config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Only attention-kernel buffers (random projections) may differ between attention kinds.
    bad_missing = [k for k in missing if ".kernel." not in k]
    bad_unexpected = [k for k in unexpected if ".kernel." not in k]
    if bad_missing or bad_unexpected:
        raise UserError(f"weights do not fit the converted model: missing {bad_missing}, unexpected {bad_unexpected}")
    return new_config, model.eval()


def run(args: argparse.Namespace) -> int:
    if args.num_features is not None and args.num_features < 1:
        raise UserError(f"--num-features must be at least 1, got {args.num_features}")
    ckpt = read_checkpoint(args.checkpoint)
    config = ModelConfig.from_dict(ckpt["config"])
    if config.attention != "exact":
        print(f"note: converting from {config.attention!r} (not 'exact'); weights are kept the same way")
    new_config, model = convert_state(config, ckpt["state_dict"], args.attention, args.num_features, args.seed)
    payload = weights_payload(
        new_config,
        ckpt["objective"],
        model.state_dict(),
        {},
        converted_from={"path": ckpt["path"], "attention": config.attention},
    )
    out = save_weights(payload, args.out)
    print(f"wrote {out}: {config.attention} -> {new_config.attention} (same weights; new random projections, "
          f"seed {args.seed}). Fine-tune with: protein-lm fit --config <config> --model.init_weights {out}")
    return 0
