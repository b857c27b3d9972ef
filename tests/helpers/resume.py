"""Exact-resume harness: a LightningModule that fingerprints every training batch, fitted under a real
Trainer with checkpoints at every step, at epoch ends and after each validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


class BatchRecorder(pl.LightningModule):
    """Records ``(epoch, sha1 of the batch's tensors)`` of every training batch; learns nothing."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str]] = []

    def training_step(self, batch, batch_idx):
        digest = hashlib.sha1()
        for key in sorted(batch):  # packed batches add segment_ids and positions
            digest.update(key.encode() + batch[key].numpy().tobytes())
        self.seen.append((self.current_epoch, digest.hexdigest()))
        return (self.w * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_metric", float(batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_recording(dm, ckpt_dir: Path, ckpt_path=None, max_epochs=3) -> list[tuple[int, str]]:
    """Fit a :class:`BatchRecorder` on ``dm`` (optionally resuming ``ckpt_path``); the batches it saw.

    Checkpoints in ``ckpt_dir``: ``step=N`` after every step, ``epoch=E`` at each epoch end and
    ``val-step=N`` after each validation (twice per epoch), as ``ModelCheckpoint(monitor=...)`` saves.
    """
    model = BatchRecorder()
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_on_train_epoch_end=True, save_top_k=-1),
        ModelCheckpoint(dirpath=ckpt_dir, filename="val-{step}", monitor="val_metric", save_top_k=-1),
    ]
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=0.5,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen
