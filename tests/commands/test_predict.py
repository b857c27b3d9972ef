"""`protein-lm predict` writes its predictions, and they agree with `protein-lm test` on the same batches."""

from __future__ import annotations

import csv

import torch

from protein_lm.cli import main
from tests.conftest import REPO

DEBUG = str(REPO / "configs" / "debug.yaml")


def test_predict_writes_predictions_consistent_with_test_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--config", DEBUG, "--output_dir", str(out), "--wandb", "false", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", *common, "--trainer.max_steps", "2"]) == 0
    ckpt = str(out / "checkpoints" / "last.ckpt")
    assert main(["test", *common, "--ckpt_path", ckpt, "--trainer.limit_test_batches", "2"]) == 0
    capsys.readouterr()
    assert main(["predict", *common, "--ckpt_path", ckpt, "--trainer.limit_predict_batches", "2"]) == 0
    path = out / "predictions" / "predictions_rank0.pt"
    assert f"predictions:     {path.resolve()}" in capsys.readouterr().out
    written = torch.load(path, weights_only=True)
    batches = written["batches"]
    assert len(batches) == 2
    correct = count = 0
    for b in batches:
        labels, pred, logp = b["labels"], b["predictions"], b["label_log_prob"]
        assert labels.shape == pred.shape == logp.shape
        scored = labels != -100
        assert (logp[~scored] == 0).all() and (logp[scored] < 0).all()
        correct += int((pred[scored] == labels[scored]).sum())
        count += int(scored.sum())
    # The test loop scored the same two (deterministic) batches: same accuracy and token count.
    rows = [r for f in sorted((out / "csv").glob("version_*/metrics.csv")) for r in csv.DictReader(f.open())]
    test_row = next(r for r in rows if r.get("test/accuracy"))
    assert int(float(test_row["test/num_tokens"])) == count
    assert abs(float(test_row["test/accuracy"]) - correct / count) < 1e-6
