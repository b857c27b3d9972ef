"""Training throughput and memory, logged like any other metric.

``ThroughputMonitor`` logs, every ``log_every_n_steps``:

* ``perf/tokens_per_sec`` — non-padding input tokens per second of wall time across all ranks,
  measured between logging points (so data loading, optimiser and logging are included —
  what a user actually gets);
* ``perf/tokens_seen`` — cumulative non-padding tokens;
* ``perf/peak_memory_gb`` — ``torch.cuda.max_memory_allocated`` on this rank (CUDA only).

Add it from the command line with ``--trainer.callbacks+=protein_lm.monitoring.ThroughputMonitor``.
"""

from __future__ import annotations

import time

import torch
from pytorch_lightning import Callback


class ThroughputMonitor(Callback):
    """Logs tokens/s, tokens seen and peak GPU memory during training.

    Args:
        log_every_n_steps: optimiser steps between measurements.
        warmup_steps: steps ignored at the start (compilation, cudnn autotune, allocator growth).
    """

    def __init__(self, log_every_n_steps: int = 50, warmup_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self._tokens_window = 0
        self._tokens_seen = 0
        self._t0: float | None = None

    def state_dict(self) -> dict:
        return {"tokens_seen": self._tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self._tokens_seen = int(state_dict.get("tokens_seen", 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mask = batch.get("padding_mask")
        n = int(batch["input_ids"].numel() - (int(mask.sum()) if mask is not None else 0))
        n *= trainer.world_size
        self._tokens_seen += n
        step = trainer.global_step
        if step < self.warmup_steps:
            return
        if self._t0 is None:  # first step after warm-up: start the clock
            self._synchronize(pl_module)
            self._t0, self._tokens_window = time.perf_counter(), 0
            return
        self._tokens_window += n
        if step % self.log_every_n_steps:
            return
        self._synchronize(pl_module)
        now = time.perf_counter()
        metrics = {
            "perf/tokens_per_sec": self._tokens_window / max(now - self._t0, 1e-9),
            "perf/tokens_seen": float(self._tokens_seen),
        }
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0, self._tokens_window = now, 0

    @staticmethod
    def _synchronize(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
