"""Exact resume: a run SIGKILLed mid-epoch resumes from last.ckpt and matches an uninterrupted run.

Three CPU runs of `protein-lm fit` (debug model, dropout on, projection redraws on):
A runs 14 steps straight; B is killed with SIGKILL right after step 7 (checkpoints every 3
steps, so last.ckpt is from step 6 and step 7 is lost); C resumes B with ``--ckpt_path last``.
C's per-step training losses from step 7 on (replayed batch, later redraw at step 10,
validation at step 7 and 14) must equal A's.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def fit(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "protein_lm", "fit", *COMMON, "--output_dir", str(out), *extra]
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
