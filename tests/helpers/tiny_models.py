"""Tiny untrained models saved as exported weights files, for the CLI tests of embed / score / probe."""

from __future__ import annotations

from pathlib import Path

import torch

from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.model import ModelConfig, ProteinLM


def tiny_model(causal: bool = False, attention: str = "performer-softmax", max_length: int = 12,
               seed: int = 0) -> ProteinLM:
    """A 2-layer model in eval mode whose window holds ``max_length - 2`` residues."""
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, depth=2, heads=4, ff_dim=64, num_features=16, attention=attention,
                      causal=causal, max_length=max_length, feature_seed=seed, favor_backend="torch")
    model = ProteinLM(cfg).eval()
    with torch.no_grad():  # zero-initialised biases make the head nearly uniform; make outputs distinct
        model.head_bias.normal_(0.0, 0.5)
    return model


def save_tiny(path: Path, causal: bool = False, **kw) -> Path:
    """Write :func:`tiny_model` as an exported weights file and return its path."""
    model = tiny_model(causal=causal, **kw)
    save_weights(weights_payload(model.config, "causal" if causal else "mlm", model.state_dict()), path)
    return path
