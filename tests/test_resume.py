"""Exact resume: a run SIGKILLed mid-epoch resumes from last.ckpt and matches an uninterrupted run.

Three CPU runs of `protein-lm fit` (debug model, dropout on, projection redraws on):
A runs 14 steps straight; B is killed with SIGKILL right after step 7 (checkpoints every 3
steps, so last.ckpt is from step 6 and step 7 is lost); C resumes B with ``--ckpt_path last``.
C's per-step training losses from step 7 on (replayed batch, later redraw at step 10,
validation at step 7 and 14) must equal A's.

The second test resumes from ``last.ckpt`` files written where a validation follows the save
(the default: checkpoint interval = validation interval) and checks the best-on-``val/loss``
tracking: the best checkpoint a resumed run records exists and holds the lowest val/loss seen.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parents[1]

COMMON = [
    "--config", "configs/debug.yaml",
    "--trainer.max_steps", "14",
    "--trainer.val_check_interval", "7",
    "--trainer.limit_val_batches", "2",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_train_steps", "3",
    "--model.config.dropout", "0.1",
    "--model.redraw_interval", "5",
    "--data.max_length", "64",
    "--data.batch_size", "4",
    "--data.max_train_sequences", "400",
    "--data.max_eval_sequences", "16",
]


class KillInValidation(Callback):
    """SIGKILL this process during the first (non-sanity) validation: a run lost before any best."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(out: Path, *extra: str, check: bool = True, common: list[str] = COMMON) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "protein_lm", "fit", *common, "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def step_losses(out: Path) -> dict[int, float]:
    """train/loss by step over all CSV versions of a run (later versions win)."""
    losses: dict[int, float] = {}
    for path in sorted((out / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def val_losses(out: Path) -> dict[int, float]:
    values: dict[int, float] = {}
    for path in sorted((out / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("val/loss"):
                    values[int(row["step"])] = float(row["val/loss"])
    return values


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fit(a)
    killed = fit(b, "--trainer.callbacks+=helpers.callbacks.KillAtStep", "--trainer.callbacks.step", "7",
                 check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no clean shutdown happened
    last = b / "checkpoints" / "last.ckpt"
    assert last.exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6

    fit(b, "--ckpt_path", "last")
    ref, resumed = step_losses(a), step_losses(b)
    assert sorted(ref) == list(range(14))
    for step in range(14):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6, rel=0), f"step {step}"
    ref_val, resumed_val = val_losses(a), val_losses(b)
    assert sorted(ref_val) == sorted(resumed_val) and len(ref_val) == 2
    for step, value in ref_val.items():
        assert resumed_val[step] == pytest.approx(value, abs=1e-6, rel=0)
    # The final weights agree too.
    sd_a = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd_b = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in sd_a.items():
        torch.testing.assert_close(sd_b[key], value, atol=1e-6, rtol=0, msg=key)


# Validation and last.ckpt every 5 steps (equal intervals: the default when not configured).
AT_VALIDATION = [*COMMON[:COMMON.index("--trainer.max_steps")],
                 "--trainer.max_steps", "20", "--trainer.val_check_interval", "5",
                 *COMMON[COMMON.index("--trainer.limit_val_batches"):COMMON.index("--checkpoint.every_n_train_steps")],
                 "--checkpoint.every_n_train_steps", "5",
                 *COMMON[COMMON.index("--model.config.dropout"):]]


def best_state(ckpt: Path) -> dict:
    """The best-on-val/loss ModelCheckpoint's state stored in a checkpoint."""
    callbacks = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    states = [v for v in callbacks.values() if isinstance(v, dict) and v.get("monitor") == "val/loss"]
    assert len(states) == 1, list(callbacks)
    return states[0]


def test_resume_at_validation_keeps_best_checkpoint_tracking(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fit(a, common=AT_VALIDATION)
    ref_val = val_losses(a)
    assert sorted(ref_val) == [4, 9, 14, 19]  # CSV steps of the validations after steps 5, 10, 15, 20
    assert ref_val[14] < ref_val[9]  # the best file changes at step 15: the case that went wrong

    # Killed during the first validation: last.ckpt (step 5) was written before it, with no best yet.
    killed = fit(b, "--trainer.callbacks+=test_resume.KillInValidation", common=AT_VALIDATION, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = b / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5
    assert not best_state(last)["best_model_path"]

    # Resumed, then killed after step 17: last.ckpt is from step 15, written after its validation.
    killed = fit(b, "--ckpt_path", "last", "--trainer.callbacks+=helpers.callbacks.KillAtStep",
                 "--trainer.callbacks.step", "17", common=AT_VALIDATION, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 15
    state = best_state(last)
    assert Path(state["best_model_path"]).exists(), state["best_model_path"]
    assert Path(state["best_model_path"]).name == "best-0-15.ckpt"
    assert all(Path(p).exists() for p in state["best_k_models"])
    assert float(state["best_model_score"]) == pytest.approx(ref_val[14], abs=1e-6, rel=0)

    resumed = fit(b, "--ckpt_path", "last", common=AT_VALIDATION)
    # The resumed run's best is a file that exists, holds the lowest val/loss so far, and is the only one.
    state = best_state(last)
    best = Path(state["best_model_path"])
    val = val_losses(b)
    assert best.exists() and f"best checkpoint: {best}" in resumed.stdout
    assert float(state["best_model_score"]) == pytest.approx(min(val.values()), abs=1e-6, rel=0)
    assert sorted(p.name for p in (b / "checkpoints").glob("best-*.ckpt")) == [best.name]
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == int(best.stem.split("-")[-1])

    # The training itself continued exactly (Lightning skips the validation interrupted at step 5).
    ref, resumed_steps = step_losses(a), step_losses(b)
    assert sorted(resumed_steps) == list(range(20))
    for step in range(20):
        assert resumed_steps[step] == pytest.approx(ref[step], abs=1e-6, rel=0), f"step {step}"
    assert sorted(val) == [9, 14, 19]
    for step in val:
        assert val[step] == pytest.approx(ref_val[step], abs=1e-6, rel=0), f"val at step {step}"
