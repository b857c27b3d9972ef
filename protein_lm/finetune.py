"""Starting training from a trained model: its architecture comes with its weights.

``--model.init_weights C`` loads the weights of ``C`` (a Lightning ``.ckpt`` or an exported
file). Weights only fit the architecture they were trained with, so the architecture fields of
``model.config`` are taken from ``C``, over whatever the config file says; a field given on the
command line (``--model.config.dim 128``) still wins, and then has to match the weights.

Fields that are not architecture stay the run's own: the objective-driven ``causal``, the
training length ``max_length`` (rotary models run at any length), ``dropout``, the kernel
backend, the feature seed and the training-only coefficients in :data:`RUN_FIELDS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from protein_lm.checkpoint import read_checkpoint
from protein_lm.model_config import FLAT_KEYS, flatten_options

RUN_FIELDS = frozenset({"causal", "max_length", "dropout", "favor_backend", "feature_seed", "vocab_size",
                        "span.loss_coef", "pkm.value_lr"})


def explicit_config_fields(argv: Iterable[str], prefix: str = "--model.config.") -> set[str]:
    """Names of the ``model.config`` fields set on the command line (``--model.config.X V`` or ``=V``;
    a group's as ``span.max``, also when spelled the old flat way)."""
    names = {arg[len(prefix):].split("=", 1)[0] for arg in argv if arg.startswith(prefix)}
    return {FLAT_KEYS.get(name, name) for name in names}


def architecture_from_checkpoint(config: dict[str, Any], trained: dict[str, Any],
                                 explicit: set[str]) -> dict[str, Any]:
    """The fields of ``config`` to replace with the trained model's (``trained``, its config).

    Args:
        config: the run's ``model.config`` as a dict (groups nested or dotted: ``span.max``).
        trained: the ``model.config`` the weights were trained with (nested, or flat as older
            checkpoints store it).
        explicit: fields the user set on the command line (kept as given; dotted).

    Returns:
        ``{field: trained value}`` for every architecture field that differs (dotted names).
    """
    config, trained = flatten_options(config), flatten_options(trained)
    return {k: v for k, v in trained.items()
            if k in config and k not in RUN_FIELDS and k not in explicit and k.split(".")[0] not in explicit
            and config[k] != v}


def apply_init_weights(cfg: Any, argv: Iterable[str]) -> str | None:
    """Take the architecture of ``cfg.model.init_weights`` into ``cfg.model.config`` (in place).

    Args:
        cfg: a subcommand's parsed config (jsonargparse Namespace) before instantiation.
        argv: the command line, to tell explicit ``--model.config.*`` settings from the config file's.

    Returns:
        A one-line note of what was taken, or None when nothing changed.
    """
    path = cfg["model"].get("init_weights")
    if not path:
        return None
    trained = read_checkpoint(path)["config"]
    config = cfg["model"]["config"]
    changed = architecture_from_checkpoint(dict(config.items()), trained, explicit_config_fields(argv))
    for key, value in changed.items():
        config[key] = value
    if not changed:
        return None
    return f"model.config from {path}: " + ", ".join(f"{k}={v}" for k, v in changed.items())
