"""Checks of a training command's settings, made before anything is built or trained.

Without them a negative learning rate, a dropout of 1.5 or a width that the heads do not divide
fails as a traceback from deep inside torch (after the data are loaded), an unwritable
``--output_dir`` fails after the first checkpoint interval, and ``fit --ckpt_path last
--model.config.dim 32`` silently resumes the checkpoint's own dim (Lightning replaces the
model options by the checkpoint's). Each becomes one line naming the option.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from protein_lm.errors import UserError
from protein_lm.model import ModelConfig, segments_unsupported
from protein_lm.model_config import flatten_options
from protein_lm.outputs import can_write_in

# Options of the LightningModule that a resumed run takes from its checkpoint. The others
# (``compile``, ``init_weights``) do not change what is trained and may differ.
RESUME_FIXED = ("config", "objective", "lr", "weight_decay", "betas", "eps", "warmup_steps", "max_steps",
                "min_lr_ratio", "redraw_interval", "seed")
# Model-config fields set from the data module (links), not by a user.
_LINKED_CONFIG_FIELDS = ("vocab_size", "max_length", "causal")
_CONFIG_FIELDS = set(ModelConfig.option_names())


def check_model_settings(model: dict[str, Any]) -> None:
    """The ``model:`` options (as a plain dict) describe a model and an optimiser that can be built."""
    try:
        config = ModelConfig.from_dict(dict(model.get("config") or {}))
    except (TypeError, ValueError) as err:
        text = str(err)
        field = text.split(" ", 1)[0]
        # "dropout must be in [0, 1)" -> "--model.config.dropout must be in [0, 1)"
        raise UserError(f"--model.config.{text}" if field in _CONFIG_FIELDS else f"--model.config: {text}") from None
    if model.get("objective") == "mlm" and config.causal:
        raise UserError("--model.config.causal true needs the causal objective (--data.objective causal)")
    _check_optimiser(model)


# Why each option cannot keep the proteins of a packed row apart (see model.segments_unsupported).
_NOT_PACKABLE = {
    "span.enabled": "adaptive spans mask by distance, not by protein, so attention would cross proteins; "
                     "use --data.mode single",
    "memory.slots": "the persistent-memory kernels know no protein boundaries, so attention would cross "
                         "proteins; use --data.mode single",
}


def check_packed_model(data: dict[str, Any], model: dict[str, Any]) -> None:
    """``--data.mode packed`` needs a model whose every layer keeps the proteins of a row apart."""
    if data.get("mode") != "packed":
        return
    config = ModelConfig.from_dict(dict(model.get("config") or {}))  # already checked: builds
    option = segments_unsupported(config)
    if option is not None:
        value = config.option(option)
        shown = str(value).lower() if isinstance(value, bool) else _show(value)
        raise UserError(f"--data.mode packed cannot be used with --model.config.{option} {shown}: "
                        f"{_NOT_PACKABLE[option]}")


def _check_optimiser(model: dict[str, Any]) -> None:
    def number(name: str) -> float:
        value = model.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise UserError(f"--model.{name} must be a finite number, got {value!r}")
        return float(value)

    if number("lr") <= 0:
        raise UserError(f"--model.lr must be > 0, got {model['lr']}")
    if number("weight_decay") < 0:
        raise UserError(f"--model.weight_decay must be >= 0, got {model['weight_decay']}")
    if number("eps") <= 0:
        raise UserError(f"--model.eps must be > 0, got {model['eps']}")
    if not 0 <= number("min_lr_ratio") <= 1:
        raise UserError(f"--model.min_lr_ratio must be in [0, 1], got {model['min_lr_ratio']}")
    betas = model.get("betas")
    if (not isinstance(betas, list | tuple) or len(betas) != 2
            or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)):
        raise UserError(f"--model.betas must be two numbers in [0, 1), got {betas!r}")
    if int(model.get("warmup_steps") or 0) < 0:
        raise UserError(f"--model.warmup_steps must be >= 0, got {model['warmup_steps']}")
    if model.get("max_steps") is not None and model["max_steps"] < 1:
        raise UserError(f"--model.max_steps must be >= 1 (or null: the trainer's estimate), got {model['max_steps']}")
    if model.get("redraw_interval") is not None and model["redraw_interval"] < 0:
        raise UserError(f"--model.redraw_interval must be >= 0 (0 or null: never), got {model['redraw_interval']}")


def check_output_dir(path: Path, flag: str = "--output_dir") -> None:
    """``path`` is (or can become) a directory this process can write in (:func:`can_write_in`)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        err = can_write_in(path)
    except OSError as mkdir_err:
        err = mkdir_err
    if err is not None:
        raise UserError(f"{flag} {path}: cannot write there ({err.strerror or err}); choose another "
                        "directory")


def checkpoint_hparams(path: str | os.PathLike) -> dict[str, Any]:
    """The LightningModule options recorded in a Lightning checkpoint (already validated)."""
    from protein_lm.sharded_checkpoint import checkpoint_meta, is_sharded_checkpoint

    if is_sharded_checkpoint(path):
        return dict(checkpoint_meta(path).get("hyper_parameters") or {})
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict(data.get("hyper_parameters") or {})


def check_resume(given: dict[str, Any], defaults: dict[str, Any], recorded: dict[str, Any], ckpt: str) -> None:
    """Refuse ``model.*`` options given for a resumed ``fit`` that differ from the checkpoint's.

    Args:
        given: the parsed ``model:`` options (plain dict) before the checkpoint's replace them.
        defaults: the parser's defaults for them; an option equal to its default counts as not given.
        recorded: the checkpoint's ``hyper_parameters``.
        ckpt: the checkpoint path, for the message.
    """
    clashes = [
        (key, mine, theirs)
        for key, mine, theirs in _pairs(given, defaults, recorded)
        if _plain(mine) != _plain(theirs)
    ]
    if clashes:
        wanted = ", ".join(f"{_flag(k)} {_show(mine)}" for k, mine, _ in clashes[:4])
        has = ", ".join(f"{_flag(k)[2:]} {_show(theirs)}" for k, _, theirs in clashes[:4])
        raise UserError(
            f"--ckpt_path {ckpt}: resuming continues the checkpoint's run, which has {has}; {wanted} "
            "cannot change on resume (model options come from the checkpoint). Drop them, or start a new "
            f"run from these weights with --model.init_weights {ckpt}"
        )


def _pairs(given: dict[str, Any], defaults: dict[str, Any], recorded: dict[str, Any]) -> Iterator[tuple]:
    """(dotted key, given value, recorded value) of every resume-fixed option the user set."""
    for key in RESUME_FIXED:
        if key not in recorded or key not in given:
            continue
        if key == "config":
            mine, default, theirs = (flatten_options(c or {}) for c in (given["config"], defaults.get("config"),
                                                                       recorded["config"]))
            for field, value in mine.items():
                if field not in _LINKED_CONFIG_FIELDS and field in theirs and _plain(value) != _plain(default.get(field)):
                    yield f"config.{field}", value, theirs[field]
        elif key == "objective" or _plain(given[key]) != _plain(defaults.get(key)):
            # the objective is linked from data.objective, so it is always set: always compared
            yield key, given[key], recorded[key]


def _flag(key: str) -> str:
    return "--data.objective" if key == "objective" else f"--model.{key}"


def _plain(value: Any) -> Any:
    return tuple(_plain(v) for v in value) if isinstance(value, list | tuple) else value


def _show(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
