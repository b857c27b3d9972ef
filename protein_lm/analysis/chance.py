"""Chance levels: the same statistic on random weights of the checkpoint's own architecture.

A statistic read off a trained model means something only next to what an untrained network of the
same shape gives on the same proteins: random embeddings already separate residue types, and a
random network's attention already depends on them. :func:`random_weights_like` builds that network
(the model's own :class:`~protein_lm.model.ModelConfig`, freshly initialised from ``seed``, random
features drawn from ``seed`` too), without touching the caller's RNG state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


def random_weights_like(model, seed: int):
    """A freshly initialised model with ``model``'s class and config, on its device, in eval mode."""
    config = model.config
    if config.is_performer:
        # Layer l's projection is seeded feature_seed + 1000 * l: draw feature_seed from its own stream
        # so that no random model's projection repeats the checkpoint's or another seed's.
        feature_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
        config = dataclasses.replace(config, feature_seed=feature_seed)
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover - every ProteinLM has parameters
        device = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(config)
    return fresh.to(device).eval()


__all__ = ["random_weights_like"]
