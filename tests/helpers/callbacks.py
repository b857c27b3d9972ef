"""Callbacks injected into `protein-lm fit` subprocesses by the resume, DDP and FSDP tests.

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


class RecordSteps(Callback):
    """Write, per rank, every training micro-batch's loss, scored tokens and logged ``train/tokens``,
    the optimiser's parameter-group sizes, and (one process only) the weights after step ``weights_at``."""

    def __init__(self, out_dir: str, weights_at: int = 0):
        self.out_dir, self.weights_at = out_dir, weights_at
        self.batches: list[dict] = []
        self.groups: dict[str, int] = {}

    def on_train_start(self, trainer, pl_module):
        # Elements this rank holds per group (a flat shard under FSDP, the whole tensor otherwise).
        for group in trainer.optimizers[0].param_groups:
            self.groups[group["name"]] = sum(p.numel() for p in group["params"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.batches.append({
            "step": trainer.global_step,  # optimiser steps done after this micro-batch
            "batch": hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest(),
            "loss": float(metrics["train/loss"]),
            "scored": int((batch["labels"] != -100).sum()),
            "logged_tokens": float(metrics["train/tokens"]),
        })
        weights = Path(self.out_dir) / f"weights_step{self.weights_at}.pt"
        if trainer.world_size == 1 and self.weights_at and trainer.global_step == self.weights_at \
                and not weights.exists():  # first micro-batch end after that optimiser step
            import torch

            weights.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}, weights)

    def on_train_end(self, trainer, pl_module):
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"world_size": trainer.world_size, "batches": self.batches,
                                    "groups": self.groups}))
