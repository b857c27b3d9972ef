"""Checkpoint callbacks for `protein-lm fit`: best on ``val/loss`` and a resumable ``last.ckpt``.

Why two callbacks: a ModelCheckpoint that monitors ``val/loss`` defers every save (``last``
included) until a validation has produced the metric, so a run killed before its first
validation would have nothing to resume from. So the monitored callback keeps only the best
checkpoint (checked at every validation), and :class:`LastCheckpoint` — unmonitored, same
directory — writes ``last.ckpt`` every N optimiser steps and once more when training ends;
when a validation follows a scheduled save, after that validation (see :class:`LastCheckpoint`).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and at the end of training.

    When a validation runs right after a scheduled step (``every_n_train_steps`` equal to the
    validation interval, the default), the file is written in ``on_validation_end`` instead, after
    the best-on-``val/loss`` callback has seen that validation. Written before it, ``last.ckpt``
    would hold a best-callback state pointing at the previous best file, which this validation
    then deletes: a resumed run would report a best checkpoint that does not exist, orphan the
    real one and could later record a worse model as best. One exception: a save due before the
    first validation (no best file yet, so nothing can go stale) is written at once *and* again
    after the validation, so a run killed during its first validation can still resume.

    Not written when training stops with an exception (e.g. a non-finite loss, or a failure
    inside the validation a save was waiting for), so the file always holds the last good state.
    """

    def __init__(self, dirpath: str | None, every_n_train_steps: int | None,
                 train_time_interval: timedelta | None = None, save_last: bool | str = True):
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=save_last,
                         every_n_train_steps=every_n_train_steps, train_time_interval=train_time_interval)
        self._deferred_step: int | None = None  # a scheduled save waiting for this step's validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._deferred_step = None
        if not pl_module.automatic_optimization or not _validation_follows(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if self._should_skip_saving_checkpoint(trainer) or not self._save_due(trainer):
            return
        if not self._has_best(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._deferred_step = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._deferred_step is None or trainer.sanity_checking:
            super().on_validation_end(trainer, pl_module)
            return
        if self._deferred_step == trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._deferred_step = None

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_due(self, trainer) -> bool:
        """ModelCheckpoint's step/time trigger for this step (updates the time trigger's clock)."""
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        interval = self._train_time_interval
        if interval is not None:
            now = time.monotonic()
            last = self._last_time_checked
            time_due = trainer.strategy.broadcast(last is not None and now - last >= interval.total_seconds())
            if time_due:
                self._last_time_checked = now
            due = due or bool(time_due)
        return due

    def _has_best(self, trainer) -> bool:
        """Whether a monitored checkpoint callback already points at a best file."""
        return any(cb is not self and cb.monitor is not None and bool(cb.best_model_path)
                   for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint))


def _validation_follows(trainer) -> bool:
    """Whether the fit loop runs a validation right after the current training batch.

    Uses the loop's own decision (private Lightning 2.x API, same inputs as in
    ``on_advance_end``); if that API changes, saving falls back to ``on_train_batch_end``.
    """
    loop = trainer.fit_loop.epoch_loop
    try:
        if loop._should_accumulate():
            return False
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):
        return False


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
