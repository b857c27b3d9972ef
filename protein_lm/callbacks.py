"""Checkpoint callbacks for `protein-lm fit`: best on ``val/loss`` and a resumable ``last.ckpt``.

Why two callbacks: a ModelCheckpoint that monitors ``val/loss`` defers every save (``last``
included) until a validation has produced the metric, so a run killed before its first
validation would have nothing to resume from. So the monitored callback keeps only the best
checkpoint (checked at every validation), and :class:`LastCheckpoint` — unmonitored, same
directory — writes ``last.ckpt`` every N optimiser steps and once more when training ends.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and at the end of training.

    Not written when training stops with an exception (e.g. a non-finite loss), so the file
    always holds the last good state.
    """

    def __init__(self, dirpath: str | None, every_n_train_steps: int | None,
                 train_time_interval: timedelta | None = None, save_last: bool | str = True):
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=save_last,
                         every_n_train_steps=every_n_train_steps, train_time_interval=train_time_interval)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def split_checkpointing(args: dict[str, Any], val_check_interval: Any) -> list[ModelCheckpoint]:
    """Callbacks for the CLI's ``checkpoint:`` settings (ModelCheckpoint's arguments).

    Returns the best-on-``monitor`` callback (top-k checked at every validation) and, when
    ``save_last`` is set, a :class:`LastCheckpoint` every ``every_n_train_steps`` steps (default:
    the validation interval when it is a step count, else every 1000 steps).
    """
    args = dict(args)
    every = args.pop("every_n_train_steps", None)
    interval = args.pop("train_time_interval", None)
    save_last = args.pop("save_last", None)
    args.pop("every_n_epochs", None)
    best = ModelCheckpoint(**args, save_last=False, every_n_epochs=1)
    callbacks: list[ModelCheckpoint] = [best]
    if save_last:
        if not every and interval is None:
            every = val_check_interval if isinstance(val_check_interval, int) else 1000
        callbacks.append(LastCheckpoint(args.get("dirpath"), every, interval, save_last))
    return callbacks
