"""ThroughputMonitor counts exactly the real (non-padding) tokens the model was trained on."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from protein_lm.data.datamodule import ProteinDataModule
from protein_lm.lit_module import ProteinLMModule
from protein_lm.model import ModelConfig
from protein_lm.monitoring import ThroughputMonitor


def _datamodule(sample_fasta, tmp_path):
    return ProteinDataModule(
        str(sample_fasta), mode="single", max_length=48, objective="mlm", batch_size=4, seed=3,
        max_train_sequences=64, cache_root=str(tmp_path / "cache"),
    )


def test_tokens_seen_matches_independent_count(sample_fasta, tmp_path):
    steps = 6
    dm = _datamodule(sample_fasta, tmp_path)
    config = ModelConfig(dim=16, depth=1, heads=2, ff_dim=32, attention="exact")
    module = ProteinLMModule(config=config, objective="mlm", warmup_steps=1, redraw_interval=None)
    monitor = ThroughputMonitor(log_every_n_steps=2, warmup_steps=1)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[monitor],
    )
    trainer.fit(module, datamodule=dm)

    # Independent count: iterate the same (seeded) training batches without a model.
    fresh = _datamodule(sample_fasta, tmp_path)
    fresh.setup("fit")
    expected = 0
    for i, batch in enumerate(fresh.train_dataloader()):
        if i == steps:
            break
        expected += int((~batch["padding_mask"]).sum())
    assert monitor.state_dict()["tokens_seen"] == expected
    rate = trainer.callback_metrics["perf/tokens_per_sec"]
    assert torch.isfinite(rate) and rate > 0
    # the last measurement is logged at the last step (6 % 2 == 0), so it counts every batch
    assert trainer.callback_metrics["perf/tokens_seen"] == expected


def test_gradient_accumulation_measures_once_per_optimiser_step(sample_fasta, tmp_path):
    """global_step repeats over accumulated micro-batches: one measurement (and one cross-rank
    collective) per optimiser step, and the token count still covers every micro-batch."""
    steps, accumulate = 6, 2
    dm = _datamodule(sample_fasta, tmp_path)
    config = ModelConfig(dim=16, depth=1, heads=2, ff_dim=32, attention="exact")
    module = ProteinLMModule(config=config, objective="mlm", warmup_steps=1, redraw_interval=None)
    monitor = ThroughputMonitor(log_every_n_steps=2, warmup_steps=1)
    flushed = []
    real_flush = monitor._flush
    monitor._flush = lambda trainer: flushed.append(trainer.global_step) or real_flush(trainer)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[monitor],
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, datamodule=dm)
    # clock start at step 1, measurements at steps 2, 4, 6, then the final flush at train end
    assert flushed == [1, 2, 4, 6, 6]
    fresh = _datamodule(sample_fasta, tmp_path)
    fresh.setup("fit")
    expected = 0
    for i, batch in enumerate(fresh.train_dataloader()):
        if i == steps * accumulate:
            break
        expected += int((~batch["padding_mask"]).sum())
    assert monitor.state_dict()["tokens_seen"] == expected
