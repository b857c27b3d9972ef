"""Training commands given bad options, bad config files, bad checkpoints or an unwritable output:
one line ``protein-lm CMD: error: ...``, exit code 2, no traceback, nothing trained or written.

Checkpoints are made by hand from a tiny ProteinLMModule (no training), then damaged.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.cli import main
from protein_lm.commands.train_checks import check_resume
from protein_lm.commands.train_parser import explain
from protein_lm.lit_module import ProteinLMModule
from protein_lm.model import ModelConfig

TINY = ["--config", "configs/debug.yaml", "--data.max_train_sequences", "50", "--data.max_eval_sequences", "8"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def _one_line_error(capsys, argv: list[str], command: str) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("Seed set")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"protein-lm {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("option, value, message", [
    ("--model.lr", "-0.001", "--model.lr must be > 0, got -0.001"),
    ("--model.lr", "nan", "--model.lr: expected float, got 'nan'"),
    ("--model.weight_decay", "-1", "--model.weight_decay must be >= 0"),
    ("--model.min_lr_ratio", "2", "--model.min_lr_ratio must be in [0, 1]"),
    ("--model.betas", "[0.9, 1.5]", "--model.betas must be two numbers in [0, 1)"),
    ("--model.config.dropout", "1.5", "--model.config.dropout must be in [0, 1), got 1.5"),
    ("--model.config.heads", "5", "--model.config.dim (64) must be divisible by heads (5)"),
    ("--model.config.num_features", "0", "--model.config.num_features must be a positive whole number, got 0"),
    ("--model.config.dim", "-8", "--model.config.dim must be a positive whole number, got -8"),
    ("--model.config.causal", "true", "needs the causal objective"),
    ("--model.config.span.max", "0", "--model.config.span.max must be a positive whole number, got 0"),
    ("--model.config.memory.replace_ffn", "true",
     "--model.config.memory.replace_ffn (all-attention) needs memory.slots > 0"),
])
def test_invalid_model_and_optimiser_values_are_refused_before_anything_is_built(
        tmp_path, capsys, option, value, message):
    out = tmp_path / "run"
    line = _one_line_error(capsys, ["fit", *TINY, "--output_dir", out, option, value], "fit")
    assert message in line
    assert not out.exists()  # refused before the output directory (or anything else) was made


@pytest.mark.parametrize("argv, message", [
    (["--model.lrr", "1"], "unknown option --model.lrr (did you mean --model.lr?)"),
    (["--trainr.max_steps", "1"], "unknown option --trainr.max_steps (did you mean --trainer.max_steps?)"),
    (["--trainer.max_steps", "sixteen"], "--trainer.max_steps: expected int, got 'sixteen'"),
    (["--data.batch_size", "2.5"], "--data.batch_size: expected int, got '2.5'"),
    (["--model.max_steps", "x"], "--model.max_steps: expected one of int, null, got 'x'"),
    (["--model.config.attention", "fast"],
     "--model.config.attention: expected one of 'performer-softmax', 'performer-relu', 'exact', got 'fast'"),
])
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_parser_errors_are_the_one_line_that_matters(tmp_path, capsys, command, argv, message):
    line = _one_line_error(capsys, [command, *TINY, "--output_dir", tmp_path, *argv], command)
    assert message in line and f"see `protein-lm {command} --help`" in line


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "the file is empty"),
    ("model:\n  lr: [1\n", "YAML syntax error at line 3, column 1"),
    ("- 1\n- 2\n", "expected YAML options (`key: value`), got a list"),
])
def test_bad_config_files_are_named(tmp_path, capsys, content, message):
    path = tmp_path / "my.yaml"
    if content is not None:
        path.write_text(content)
    line = _one_line_error(capsys, ["fit", "--config", path, "--output_dir", tmp_path / "o"], "fit")
    assert f"--config {path}: {message}" in line


def test_unknown_key_in_a_config_file_gets_a_suggestion():
    text = 'Problems parsing config: Key "model.lrr" is not expected'
    assert explain(text, ("--model.lr", "--model.eps")) == (
        "unknown option --model.lrr in a config file (did you mean --model.lr?)")


# -- checkpoints ----------------------------------------------------------------------


def _debug_module() -> ProteinLMModule:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, depth=2, heads=4, ff_dim=128, attention="performer-softmax", num_features=32)
    return ProteinLMModule(config=cfg, lr=3e-3, weight_decay=0.01, warmup_steps=5, redraw_interval=10)


def _lightning_checkpoint(module: ProteinLMModule) -> dict:
    """What Lightning saves, minus the loop and optimiser state (not read before the checks fail)."""
    return {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.6",
        "state_dict": {k: v.clone() for k, v in module.state_dict().items()},
        "hyper_parameters": copy.deepcopy(dict(module.hparams)),
        "protein_lm": {"format": "protein_lm.lightning", "version": 1, "config": module.config.to_dict(),
                       "objective": "mlm"},
    }


def _damaged(kind: str, path: Path) -> Path:
    good = _lightning_checkpoint(_debug_module())
    torch.save(good, path)
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "config not matching the weights":
        good["protein_lm"]["config"]["dim"] = good["hyper_parameters"]["config"]["dim"] = 32
        torch.save(good, path)
    elif kind == "no config":
        del good["protein_lm"]["config"], good["hyper_parameters"]["config"]
        torch.save(good, path)
    elif kind == "unknown config field":
        good["protein_lm"]["config"]["wings"] = good["hyper_parameters"]["config"]["wings"] = 2
        torch.save(good, path)
    elif kind == "non-finite weights":
        good["state_dict"]["model.blocks.1.ffn.fc1.weight"][3, 4] = float("nan")
        torch.save(good, path)
    return path


DAMAGE = {
    "truncated": "cannot read as a protein_lm checkpoint: damaged, truncated",
    "random bytes": "cannot read as a protein_lm checkpoint",
    "text": "cannot read as a protein_lm checkpoint",
    "not a dict": "not a protein_lm checkpoint (top level is list)",
    "config not matching the weights": "the weights do not match the file's model config: embed.weight has shape",
    "no config": "Lightning checkpoint without a protein_lm model config",
    "unknown config field": "the model config has fields this protein_lm does not know (['wings'])",
    "non-finite weights": "weight blocks.1.ffn.fc1.weight holds non-finite values",
}


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_damaged_checkpoints_are_refused_by_the_training_commands(tmp_path, capsys, command, kind):
    ckpt = _damaged(kind, tmp_path / "bad.ckpt")
    line = _one_line_error(capsys, [command, *TINY, "--output_dir", tmp_path / "o", "--ckpt_path", ckpt], command)
    assert f"{ckpt}: {DAMAGE[kind]}" in line


@pytest.mark.parametrize("kind", ["config not matching the weights", "non-finite weights", "unknown config field"])
def test_export_evaluate_and_convert_refuse_inconsistent_checkpoints(tmp_path, capsys, sample_fasta, kind):
    ckpt = _damaged(kind, tmp_path / "bad.ckpt")
    out = tmp_path / "model.pt"
    line = _one_line_error(capsys, ["export", "--checkpoint", ckpt, "--out", out], "export")
    assert DAMAGE[kind] in line and not out.exists()
    report = tmp_path / "eval.json"
    line = _one_line_error(capsys, ["evaluate", "--checkpoint", ckpt, "--fasta", sample_fasta,
                                    "--max-sequences", "4", "--json", report], "evaluate")
    assert DAMAGE[kind] in line and not report.exists()
    line = _one_line_error(capsys, ["convert", "--checkpoint", ckpt, "--attention", "performer-relu",
                                    "--out", out], "convert")
    assert DAMAGE[kind] in line and not out.exists()


def test_exported_weights_with_nan_are_refused_by_name(tmp_path, capsys, sample_fasta):
    module = _debug_module()
    state = module.model.state_dict()
    state["norm.weight"] = torch.full_like(state["norm.weight"], float("inf"))
    path = save_weights(weights_payload(module.config, "mlm", state), tmp_path / "w.pt")
    line = _one_line_error(capsys, ["evaluate", "--checkpoint", path, "--fasta", sample_fasta], "evaluate")
    assert "weight norm.weight holds non-finite values" in line


def test_exported_weights_are_not_a_training_checkpoint(tmp_path, capsys):
    module = _debug_module()
    path = save_weights(weights_payload(module.config, "mlm", module.model.state_dict()), tmp_path / "w.pt")
    line = _one_line_error(capsys, ["fit", *TINY, "--output_dir", tmp_path / "o", "--ckpt_path", path], "fit")
    assert "exported weights" in line and "--model.init_weights" in line


# -- resume -----------------------------------------------------------------------------


def test_resume_with_options_that_contradict_the_checkpoint_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(_debug_module()), ckpt)
    argv = ["fit", *TINY, "--output_dir", tmp_path / "o", "--ckpt_path", ckpt]
    line = _one_line_error(capsys, [*argv, "--model.config.dim", "32", "--model.lr", "1e-5"], "fit")
    assert "which has model.config.dim 64, model.lr 0.003" in line
    assert "--model.config.dim 32, --model.lr 1e-05 cannot change on resume" in line
    line = _one_line_error(capsys, [*argv, "--data.objective", "causal"], "fit")
    assert "--data.objective causal cannot change on resume" in line


def test_resume_check_ignores_options_left_at_their_defaults_and_equal_values():
    recorded = dict(_debug_module().hparams)
    defaults = {"config": ModelConfig().to_dict(), "lr": 5e-4, "objective": "mlm", "betas": (0.9, 0.98)}
    given = {"config": {**ModelConfig().to_dict(), "dim": 64}, "lr": 5e-4, "objective": "mlm",
             "betas": [0.9, 0.98], "compile": True}
    check_resume(given, defaults, recorded, "x.ckpt")  # dim equal, lr at its default, compile free
    with pytest.raises(Exception, match="model.config.heads 4"):
        check_resume({**given, "config": {**given["config"], "heads": 2}}, defaults, recorded, "x.ckpt")


# -- output directory --------------------------------------------------------------------


def test_unwritable_output_dir_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _one_line_error(capsys, ["fit", *TINY, "--output_dir", blocker / "run"], "fit")
    assert f"--output_dir {blocker / 'run'}: cannot write there" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _one_line_error(capsys, ["fit", *TINY, "--output_dir", ro], "fit")
    finally:
        ro.chmod(0o755)
    assert "cannot write there" in line


def test_evaluate_never_writes_a_non_finite_loss(tmp_path, capsys, sample_fasta):
    """Finite weights that overflow (a norm scale of 1e38) end in one line, not `"loss": NaN` in the JSON."""
    module = _debug_module()
    state = module.model.state_dict()
    state["norm.weight"] = torch.full_like(state["norm.weight"], 1e38)
    path = save_weights(weights_payload(module.config, "mlm", state), tmp_path / "w.pt")
    report = tmp_path / "eval.json"
    line = _one_line_error(capsys, ["evaluate", "--checkpoint", path, "--fasta", sample_fasta,
                                    "--max-sequences", "4", "--json", report, "--quiet"], "evaluate")
    assert "is not finite" in line and not report.exists()
