"""Checks of ``ProteinDataModule``'s arguments, so a bad one fails at construction with its name.

The CLI builds the data module before anything is read, so checking here turns a typo in a config
into one line naming the option, instead of an error deep inside a DataLoader worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from protein_lm.errors import UserError

MODES = ("single", "concat", "packed")
OBJECTIVES = ("mlm", "causal")


class DataConfigError(UserError, ValueError):
    """A bad ``ProteinDataModule`` argument (a ``UserError`` for the CLI, a ``ValueError`` for Python)."""


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass: `batch_size: true` in a config must not pass as 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_options(
    *,
    data_dir: Any,
    mode: Any,
    max_length: Any,
    objective: Any,
    batch_size: Any,
    num_workers: Any,
    seed: Any,
    val_fraction: Any,
    test_fraction: Any,
    val_fasta: Any,
    test_fasta: Any,
    mask_prob: Any,
    tokens_per_batch: Any,
    max_train_sequences: Any,
    max_eval_sequences: Any,
) -> None:
    """Raise :class:`DataConfigError` naming the first argument of ``ProteinDataModule`` that is invalid."""
    check_choice("mode", mode, MODES)
    check_choice("objective", objective, OBJECTIVES)
    # single and packed examples need room for one residue between <cls> and <eos>
    check_int("max_length", max_length, 2 if mode == "concat" else 3)
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
    check_int("seed", seed, 0)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise DataConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise DataConfigError(
            f"val_fraction + test_fraction must be < 1 (nothing left to train on), got "
            f"{val_fraction!r} + {test_fraction!r}"
        )
    if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not 0.0 < mask_prob < 1.0:
        raise DataConfigError(f"mask_prob must be a number in (0, 1), got {mask_prob!r}")
    if tokens_per_batch is not None:
        if mode == "concat":
            raise DataConfigError(
                f"tokens_per_batch={tokens_per_batch!r} applies to mode='single' or 'packed' only; concat "
                "batches are always batch_size x max_length tokens"
            )
        check_int("tokens_per_batch", tokens_per_batch, max_length)
    for name, value in (("max_train_sequences", max_train_sequences), ("max_eval_sequences", max_eval_sequences)):
        if value is not None:
            check_int(name, value, 1)
    if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
        raise DataConfigError(f"data_dir must be a path to a token cache or FASTA file, got {data_dir!r}")
    for name, value in (("data_dir", data_dir), ("val_fasta", val_fasta), ("test_fasta", test_fasta)):
        if value is not None and not Path(value).expanduser().exists():
            raise DataConfigError(f"{name}: {value}: no such file or directory")
