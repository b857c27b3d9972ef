"""Training throughput and memory, logged like any other metric.

``ThroughputMonitor`` logs, every ``log_every_n_steps``:

* ``perf/tokens_per_sec`` — non-padding input tokens per second of wall time across all ranks,
  measured between logging points (so data loading, optimiser and logging are included —
  what a user actually gets);
* ``perf/tokens_seen`` — cumulative non-padding tokens of all ranks;
* ``perf/peak_memory_gb`` — ``torch.cuda.max_memory_allocated`` on this rank (CUDA only).

Add it from the command line with ``--trainer.callbacks+=protein_lm.monitoring.ThroughputMonitor``.

Counting is exact under DDP: each rank counts its own batches on its device (no host sync per
step) and the counts are summed across ranks only at logging points (one collective per
``log_every_n_steps``). Ranks pad differently, so "rank 0's count × world size" would not be.
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
        self._pending: torch.Tensor | None = None  # this rank's real tokens since the last flush
        self._tokens_seen = 0  # all ranks, up to the last flush
        self._t0: float | None = None
        self._last_step = -1  # global_step of the last measurement (repeats under grad accumulation)

    def state_dict(self) -> dict:
        return {"tokens_seen": self._tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self._tokens_seen = int(state_dict.get("tokens_seen", 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch["input_ids"]
        mask = batch.get("padding_mask")
        n = (mask.numel() - mask.sum()) if mask is not None else ids.numel()
        self._pending = n if self._pending is None else self._pending + n
        step = trainer.global_step
        # With gradient accumulation global_step repeats over micro-batches: measure once per
        # optimiser step (the same decision on every rank, so the collectives stay matched).
        if step < self.warmup_steps or step == self._last_step:
            return
        self._last_step = step
        if self._t0 is None:  # first step after warm-up: start the clock
            self._flush(trainer)
            self._synchronize(pl_module)
            self._t0 = time.perf_counter()
            return
        if step % self.log_every_n_steps:
            return
        window = self._flush(trainer)  # a collective: every rank reaches it at the same step
        self._synchronize(pl_module)
        now = time.perf_counter()
        metrics = {
            "perf/tokens_per_sec": window / max(now - self._t0, 1e-9),
            "perf/tokens_seen": float(self._tokens_seen),
        }
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0 = now

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer)  # count the steps after the last logging point too

    def _flush(self, trainer) -> int:
        """Sum the pending counts of all ranks into ``tokens_seen``; return that sum."""
        pending = 0 if self._pending is None else self._pending
        local = torch.as_tensor(pending, device=trainer.strategy.root_device).to(torch.long)
        total = int(trainer.strategy.reduce(local, reduce_op="sum"))
        self._pending = None
        self._tokens_seen += total
        return total

    @staticmethod
    def _synchronize(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
