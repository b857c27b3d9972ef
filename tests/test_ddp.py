"""DDP on CPU: 2 processes (gloo, strategy ddp) train a few steps through `protein-lm fit`.

Checks that the ranks saw different training batches, that the validation metrics each
rank logged are identical (reduced across ranks) and count the tokens of both ranks, and that
the throughput monitor's token count is the exact sum of both ranks' real tokens.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_two_cpu_processes_train_on_different_data_and_agree_on_metrics(tmp_path):
    out, record = tmp_path / "run", tmp_path / "record"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("LOCAL_RANK", None)
    cmd = [
        sys.executable, "-m", "protein_lm", "fit", "--config", "configs/debug.yaml",
        "--output_dir", str(out),
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "3",
        "--trainer.log_every_n_steps", "1",
        "--data.max_length", "160", "--data.batch_size", "4", "--data.max_train_sequences", "200",
        "--data.max_eval_sequences", "24",
        "--trainer.callbacks+=helpers.callbacks.RecordBatches", f"--trainer.callbacks.out_dir={record}",
        "--trainer.callbacks+=protein_lm.monitoring.ThroughputMonitor",
        "--trainer.callbacks.log_every_n_steps", "3", "--trainer.callbacks.warmup_steps", "0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # Different data on each rank, and the same number of steps.
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 6
    assert not set(ranks[0]["train"]) & set(ranks[1]["train"])
    # Validation metrics: reduced across ranks, so every rank logged the same numbers...
    assert len(ranks[0]["metrics"]) == len(ranks[1]["metrics"]) == 2
    for m0, m1 in zip(ranks[0]["metrics"], ranks[1]["metrics"], strict=True):
        for key in ("val/loss", "val/accuracy", "val/perplexity", "val/num_tokens"):
            assert m0[key] == m1[key], key
        # ...and they count the tokens both ranks scored.
        assert m0["val/num_tokens"] == m0["local_tokens"] + m1["local_tokens"]
        assert m0["local_tokens"] > 0 and m1["local_tokens"] > 0
    # Rank 0 wrote the CSV log and the checkpoints.
    rows = list(csv.DictReader(open(out / "csv" / "version_0" / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert val == pytest.approx([m["val/loss"] for m in ranks[0]["metrics"]], abs=1e-6)
    assert (out / "checkpoints" / "last.ckpt").exists()
    # Throughput monitor: its last count (step 6) is every real token of both ranks, counted per
    # rank and summed (ranks pad differently, so rank 0's count x 2 would be wrong).
    seen = [float(r["perf/tokens_seen"]) for r in rows if r.get("perf/tokens_seen")]
    both = sum(ranks[0]["train_tokens"]) + sum(ranks[1]["train_tokens"])
    assert sum(ranks[0]["train_tokens"]) != sum(ranks[1]["train_tokens"])  # else the check is weak
    assert seen and seen[-1] == both
