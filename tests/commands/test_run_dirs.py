"""Where a run writes: --trainer.default_root_dir is honoured, and a new fit never mixes with an older run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protein_lm.cli import main
from protein_lm.commands.train import build_cli
from tests.conftest import REPO

TINY = ["--config", "configs/debug.yaml", "--trainer.limit_val_batches", "1", "--data.max_train_sequences", "64",
        "--data.max_eval_sequences", "8", "--data.batch_size", "4", "--wandb", "false"]


@pytest.fixture(autouse=True)
def _at_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def test_default_root_dir_is_the_output_dir(tmp_path):
    cli = build_cli([*TINY, "--trainer.default_root_dir", str(tmp_path / "root")], run=False)
    dirs = {Path(cb.dirpath) for cb in cli.trainer.checkpoint_callbacks}
    assert dirs == {tmp_path / "root" / "checkpoints"}
    assert Path(cli.trainer.default_root_dir) == tmp_path / "root"
    assert Path(cli.trainer.loggers[0].save_dir) == tmp_path / "root"


def test_default_root_dir_and_a_different_output_dir_are_refused(tmp_path, capsys):
    assert main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "a"), "--output_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ; give --output_dir only" in err[0]


def test_a_new_fit_refuses_a_directory_with_another_runs_checkpoints(tmp_path, capsys):
    old = tmp_path / "checkpoints"
    old.mkdir()
    (old / "best-0-40.ckpt").write_bytes(b"earlier run")
    assert main(["fit", *TINY, "--output_dir", str(tmp_path), "--trainer.max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"protein-lm fit: error: {old} holds checkpoints of an earlier run (best-0-40.ckpt): resume it "
                   "with --ckpt_path last, or start a new run with --output_dir NEW_DIR (or delete them)"]
    assert sorted(p.name for p in old.iterdir()) == ["best-0-40.ckpt"]
