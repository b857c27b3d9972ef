"""End to end: `protein-lm fit --config configs/debug.yaml` on the shipped sample, on CPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from protein_lm.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]


def test_fit_debug_config_writes_checkpoints_and_metrics_and_learns(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "protein_lm", "fit", "--config", "configs/debug.yaml", "--output_dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    best = list((out / "checkpoints").glob("best-*.ckpt"))
    assert last.exists() and len(best) == 1
    metrics = out / "csv" / "version_0" / "metrics.csv"
    assert metrics.exists()
    # The run says where things went.
    assert f"last checkpoint: {last}" in proc.stdout
    assert str(metrics.resolve()) in proc.stdout

    rows = list(csv.DictReader(open(metrics)))
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(val) == 2 and val[0][0] < val[1][0]
    assert val[-1][1] < val[0][1], f"validation loss did not fall: {val}"
    assert train[-1] < train[0]
    for r in rows:
        if r.get("val/loss"):
            ppl, loss, acc = float(r["val/perplexity"]), float(r["val/loss"]), float(r["val/accuracy"])
            assert abs(ppl - torch.tensor(loss).exp().item()) < 1e-3 * ppl
            assert 0.0 < acc < 1.0
            assert float(r["val/num_tokens"]) > 0
    assert any(r.get("lr-AdamW/decay") for r in rows)  # LearningRateMonitor

    model, info = load_model(last)
    assert info["objective"] == "mlm" and info["global_step"] == 40
    assert model.config.attention == "performer-softmax"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # no code runs when loading
    assert ckpt["protein_lm"]["config"]["dim"] == 64
