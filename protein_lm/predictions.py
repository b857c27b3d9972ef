"""``protein-lm predict`` output: per-position predictions written to disk, not only returned.

Each rank writes ``output_dir/predictions/predictions_rank{R}.pt``: a dict with ``batches``, one
dict per batch in loader order, of CPU tensors ``predictions`` (B, L) arg-max ids, ``labels``
(B, L), ``-100`` where nothing is scored, ``label_log_prob`` (B, L), 0 where unscored, and in
``mode: packed`` ``segment_ids`` (B, L), which protein of a packed row each position belongs to. The
batches are the data module's ``predict_dataloader`` (its test split, deterministic windows and
masks). Load it with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from protein_lm.outputs import write_atomically


class PredictionWriter(BasePredictionWriter):
    """Writes every prediction batch of the epoch to one file per rank (atomically)."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = [{k: v.detach().cpu() for k, v in batch.items()} for batch in predictions]
        payload = {"batches": batches}
        path = self.output_dir / "predictions" / f"predictions_rank{trainer.global_rank}.pt"
        self.written.append(write_atomically(path, lambda tmp: torch.save(payload, tmp), "predictions"))
