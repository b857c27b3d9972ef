"""Checks that a checkpoint's config, weights and numbers agree, before anything uses it.

A file can be a valid pickle of tensors and still be unusable: its config names fields this
version does not know, its weights have other shapes than its config implies (hand-edited or
mixed-up files), or training diverged before it was saved and its weights hold NaN. Loading such
a file fails deep inside torch (``size mismatch``), or worse, succeeds: an export copies the
inconsistency on, and an evaluation prints ``loss NaN`` (not even valid JSON) with exit code 0.
:func:`check_checkpoint` refuses each case with one line naming the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from protein_lm.errors import OldConfigNames, UserError
from protein_lm.model import ModelConfig, ProteinLM
from protein_lm.model_config import CHECKPOINT_NOTE, nest_flat_keys

OBJECTIVES = ("mlm", "causal")


def model_config(config: Any, where: str) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint's ``config`` dict, or a one-line error."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: no protein_lm model config in the file")
    config, renamed = nest_flat_keys(config)
    if renamed:  # written before the options had groups
        warnings.warn(f"{where}: {CHECKPOINT_NOTE}", OldConfigNames, stacklevel=3)
    try:
        return ModelConfig.from_dict(config)
    except TypeError as err:  # a field of the wrong kind, e.g. a list where a number belongs
        raise UserError(f"{where}: invalid model config ({err})") from None
    except ValueError as err:
        text = str(err)
        if text.startswith("unknown ModelConfig fields"):
            raise UserError(f"{where}: the model config has fields this protein_lm does not know "
                            f"({text.split(': ', 1)[1]}); was it written by a newer version?") from None
        raise UserError(f"{where}: invalid model config ({text})") from None


def check_checkpoint(ckpt: dict[str, Any]) -> ModelConfig:
    """Refuse a checkpoint (a :func:`protein_lm.checkpoint.read_checkpoint` dict) that cannot be used.

    Returns its :class:`ModelConfig`. The expected shapes come from a model built on the ``meta``
    device (no memory, no initialisation), so checking costs little even for large models.

    Raises:
        UserError: unknown or invalid config, unknown objective, weights missing, unexpected or
            of another shape than the config gives, or a weight with NaN / inf values.
    """
    where = ckpt.get("path", "checkpoint")
    cfg = model_config(ckpt.get("config"), where)
    if ckpt.get("objective") not in OBJECTIVES:
        raise UserError(f"{where}: unknown objective {ckpt.get('objective')!r} (expected mlm or causal)")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where}: the weights are missing or are not tensors")
    # Shapes depend neither on the FAVOR kernel this machine runs nor on the projections' seed.
    with torch.device("meta"):
        shapes_of = ProteinLM(dataclasses.replace(cfg, favor_backend="auto", feature_seed=None))
    expected = {k: tuple(v.shape) for k, v in shapes_of.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        raise UserError(f"{where}: the weights do not match the file's model config ({'; '.join(parts)})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise UserError(
                f"{where}: the weights do not match the file's model config: {name} has shape "
                f"{tuple(state[name].shape)}, the config (dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}) "
                f"gives {shape}"
            )
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{where}: weight {name} holds non-finite values (NaN or inf): training had "
                            "diverged; use an earlier checkpoint")
    return cfg
