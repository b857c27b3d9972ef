"""Starting from a trained model: the architecture comes from the weights; exported weights in validate/predict."""

from __future__ import annotations

import pytest
import torch

from protein_lm.checkpoint import load_model
from protein_lm.cli import main
from protein_lm.commands.train import build_cli
from protein_lm.finetune import architecture_from_checkpoint, explicit_config_fields
from tests.conftest import REPO
from tests.helpers.tiny_models import save_tiny

SHIPPED = REPO / "checkpoints" / "performer-softmax-bid-swissprot2014.pt"
TINY = ["--config", "configs/debug.yaml", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.limit_predict_batches", "1", "--data.max_train_sequences", "64", "--data.max_eval_sequences", "8",
        "--data.batch_size", "4", "--wandb", "false"]


@pytest.fixture(autouse=True)
def _at_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def test_explicit_fields_and_what_is_taken():
    assert explicit_config_fields(["--model.config.dim", "8", "--model.config.depth=3", "--model.lr", "1"]) == {
        "dim", "depth"}
    ours = {"dim": 64, "depth": 2, "heads": 4, "dropout": 0.1, "max_length": 128, "attention": "exact"}
    trained = {"dim": 256, "depth": 6, "heads": 4, "dropout": 0.0, "max_length": 1024, "attention": "performer-relu"}
    assert architecture_from_checkpoint(ours, trained, {"depth"}) == {"dim": 256, "attention": "performer-relu"}


def test_shipped_finetune_config_builds_the_shipped_model(tmp_path):
    cli = build_cli(["--config", "configs/finetune_shipped.yaml", "--output_dir", str(tmp_path), "--wandb", "false"],
                    run=False)
    shipped, _ = load_model(SHIPPED)
    cfg = cli.model.config
    sc = shipped.config
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.ff_dim, cfg.num_features) == (
        sc.dim, sc.depth, sc.heads, sc.ff_dim, sc.num_features)
    assert (cfg.dim, cfg.heads) != (128, 4)  # not the quickstart config's own width
    assert cfg.max_length == 256  # the run's training length, not the checkpoint's
    ours = cli.model.model.state_dict()
    for key, value in shipped.state_dict().items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0)


def test_quickstart_with_init_weights_and_an_explicit_override(tmp_path, capsys):
    args = ["--config", "configs/quickstart.yaml", "--output_dir", str(tmp_path), "--wandb", "false",
            "--model.init_weights", str(SHIPPED)]
    shipped_dim = load_model(SHIPPED)[0].config.dim
    assert shipped_dim != 128  # the quickstart config's own width, which the weights must override
    assert build_cli(args, run=False).model.config.dim == shipped_dim
    # An explicit architecture setting is kept -- and then has to fit the weights.
    assert main(["fit", *args, "--model.config.depth", "2", "--trainer.max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("protein-lm fit: error:") and "weights do not match" in err[-1]


@pytest.mark.parametrize("command", ["validate", "predict"])
def test_exported_weights_work_as_ckpt_path(tmp_path, command):
    weights = save_tiny(tmp_path / "tiny.pt", max_length=64)
    cli = build_cli([command, *TINY, "--output_dir", str(tmp_path / "run"), "--ckpt_path", str(weights)])
    model, _ = load_model(weights)
    assert cli.model.config.dim == 32 and cli.model.config.depth == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(cli.model.model.state_dict()[key], value, atol=0, rtol=0)
    if command == "validate":
        assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    else:
        assert (tmp_path / "run" / "predictions" / "predictions_rank0.pt").exists()


def test_fit_refuses_exported_weights_as_ckpt_path(tmp_path, capsys):
    weights = save_tiny(tmp_path / "tiny.pt")
    assert main(["fit", *TINY, "--output_dir", str(tmp_path / "run"), "--ckpt_path", str(weights)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"protein-lm fit: error: --ckpt_path {weights}: exported weights hold no training state to "
                   f"resume; start from them with --model.init_weights {weights}"]
