"""Callbacks injected into `protein-lm fit` subprocesses by the resume and DDP tests.

Use: ``PYTHONPATH=tests protein-lm fit ... --trainer.callbacks+=helpers.callbacks.KillAtStep
--trainer.callbacks.step 6``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from pytorch_lightning import Callback


class KillAtStep(Callback):
    """SIGKILL this process right after optimiser step ``step`` (no cleanup, like a node loss)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(Callback):
    """Write, per rank, a hash of every training batch and the metrics each rank computed."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.train: list[str] = []
        self.train_tokens: list[int] = []  # real (non-padding) input tokens per training batch
        self._val_tokens = 0
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = batch["input_ids"].cpu().numpy().tobytes()
        self.train.append(hashlib.sha1(ids).hexdigest())
        self.train_tokens.append(int((~batch["padding_mask"]).sum()))

    def on_validation_start(self, trainer, pl_module):
        self._val_tokens = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._val_tokens += int((batch["labels"] != -100).sum())

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        keys = ("val/loss", "val/accuracy", "val/perplexity", "val/num_tokens")
        record = {k: float(trainer.callback_metrics[k]) for k in keys}
        record["local_tokens"] = self._val_tokens
        self.metrics.append(record)

    def on_train_end(self, trainer, pl_module):
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "train": self.train, "train_tokens": self.train_tokens,
                  "metrics": self.metrics}
        path.write_text(json.dumps(record))
