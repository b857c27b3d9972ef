"""`protein-lm fit|validate|test`: ``--ckpt_path best|last`` in a new process, one-line errors, usage line.

Lightning resolves ``ckpt_path="best"`` only from a ModelCheckpoint of the same process, so the
documented ``protein-lm test --config X --ckpt_path best`` used to end in a ValueError traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from protein_lm.cli import main
from protein_lm.commands.train import _raised_by_lightning, build_cli, find_best_checkpoint

TINY = ["--config", "configs/debug.yaml", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--data.max_train_sequences", "200", "--data.max_eval_sequences", "8", "--data.batch_size", "4"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def _fake_checkpoint(path: Path, score: float | None, mtime: float, monitor: str = "val/loss") -> None:
    """A file shaped like a Lightning checkpoint whose ModelCheckpoint state records ``score`` for it."""
    state = {"monitor": monitor, "best_model_path": str(path), "best_model_score": None, "best_k_models": {}}
    if score is not None:
        state["best_model_score"] = torch.tensor(score)
        state["best_k_models"] = {str(path): torch.tensor(score)}
    torch.save({"callbacks": {f"ModelCheckpoint{{'monitor': '{monitor}'}}": state}}, path)
    os.utime(path, (mtime, mtime))


def test_find_best_checkpoint_uses_recorded_scores_not_age(tmp_path):
    assert find_best_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path / "best-0-10.ckpt", 2.5, mtime=1_000)
    _fake_checkpoint(tmp_path / "best-0-20.ckpt", 2.9, mtime=2_000)  # newer but worse
    _fake_checkpoint(tmp_path / "last.ckpt", 1.0, mtime=3_000)  # never a "best" candidate
    assert find_best_checkpoint(tmp_path).name == "best-0-10.ckpt"
    assert find_best_checkpoint(tmp_path, mode="max").name == "best-0-20.ckpt"
    # A file without a recorded score ranks after the scored ones; only unscored files: the newest.
    _fake_checkpoint(tmp_path / "best-0-30.ckpt", None, mtime=4_000)
    assert find_best_checkpoint(tmp_path).name == "best-0-10.ckpt"
    assert find_best_checkpoint(tmp_path, monitor="val/accuracy").name == "best-0-30.ckpt"


def test_fit_then_test_with_ckpt_path_best_and_last(tmp_path):
    out = ["--output_dir", str(tmp_path)]
    fit = build_cli(["fit", *TINY, *out, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                     "--checkpoint.every_n_train_steps", "2"])
    best = Path(fit.trainer.checkpoint_callback.best_model_path)
    assert best.exists() and best.parent == tmp_path / "checkpoints"

    cli = build_cli(["test", *TINY, *out, "--ckpt_path", "best"])  # a new CLI: no callback state to reuse
    assert cli.config["test"]["ckpt_path"] == str(best)
    assert cli.trainer.ckpt_path == str(best)
    by_keyword = float(cli.trainer.callback_metrics["test/loss"])
    explicit = build_cli(["test", *TINY, *out, "--ckpt_path", str(best)])
    assert by_keyword == float(explicit.trainer.callback_metrics["test/loss"])

    cli = build_cli(["validate", *TINY, *out, "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("command, ckpt, message", [
    ("test", "best", "--ckpt_path best: no best checkpoint in"),
    ("validate", "last", "--ckpt_path last: no last checkpoint in"),
    ("predict", "missing.ckpt", "--ckpt_path missing.ckpt: no such checkpoint file"),
])
def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys, command, ckpt, message):
    assert main([command, *TINY, "--output_dir", str(tmp_path), "--ckpt_path", ckpt]) == 2
    err = capsys.readouterr().err
    assert f"protein-lm {command}: error: {message}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_lightning_user_errors_are_one_line(tmp_path, capsys):
    # Raised by Lightning when the trainer is built (MisconfigurationException) and when fit starts (ValueError).
    assert main(["fit", *TINY, "--output_dir", str(tmp_path), "--trainer.devices", "0"]) == 2
    assert main(["fit", *TINY, "--output_dir", str(tmp_path), "--trainer.val_check_interval", "100000"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("protein-lm fit: error:")]
    assert len(errors) == 2 and "devices" in errors[0] and "val_check_interval" in errors[1], lines
    assert not any("Traceback" in line for line in lines)


def test_errors_from_our_code_keep_their_traceback():
    try:
        raise ValueError("a bug, not a user mistake")
    except ValueError as err:
        assert not _raised_by_lightning(err)


def test_usage_line_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: protein-lm fit ")
