"""Exact resume: where the next training iterator starts, with or without a Lightning ``Trainer``.

Determinism, which makes resuming exact:
    * train order (which examples form which batch, and batch order) is a pure function of
      ``(seed, epoch)``; crop offsets and MLM masks are pure functions of
      ``(seed, epoch, example index, position)`` (counter-based hashing, see ``collate.py``), so
      batches do not depend on ``num_workers``, prefetching or process.
    * evaluation batches and masks are fixed (independent of epoch), so ``val/*`` is comparable
      across epochs and ``evaluate`` is reproducible.

``ProteinDataModule.state_dict()`` returns ``{"epoch", "batches_done"}`` — the epoch the next
training iterator must produce and how many of its batches are already consumed. After
``load_state_dict()`` the training loader starts in that epoch and its iterators skip exactly
``batches_done`` batches (``len()`` stays the full epoch, as Lightning expects) until the sampler
moves on to another epoch (:meth:`protein_lm.data.sampler.ShardedBatchSampler.set_resume`).

**Hook for the LightningModule: none is needed under a Lightning ``Trainer``.** Lightning saves
``datamodule.state_dict()`` in every checkpoint and calls ``load_state_dict()`` on resume; while
fitting, ``state_dict()`` reads the progress straight from ``trainer.fit_loop`` (:func:`fit_progress`),
which is the same count Lightning itself resumes from, so a checkpoint written in
``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps=...)``, ``save_last``), at validation
end or at epoch end resumes with the exact remaining batches. Without a Trainer (a hand-written
loop) call ``ProteinDataModule.set_epoch`` at each epoch start and ``ProteinDataModule.mark_batch_done``
after each training batch; ``state_dict()`` then reports those counters.
"""

from __future__ import annotations

from typing import Any


def fit_progress(trainer: Any | None) -> tuple[int, int] | None:
    """``(epoch, batches done in it)`` while ``trainer`` is fitting, else ``None``.

    Once the epoch's last batch is processed this is ``(epoch + 1, 0)``: a checkpoint written at
    epoch end resumes at the start of the next epoch, not with an empty remainder of this one.
    """
    if trainer is None or trainer.state.fn != "fit":
        return None
    epoch = int(trainer.current_epoch)
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    total = trainer.num_training_batches
    if done > 0 and total != float("inf") and done >= total:
        return epoch + 1, 0
    return epoch, done
