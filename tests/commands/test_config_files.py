"""``--config`` files that extend others, and the flat FAIR option names of older configs,
command lines and checkpoints (translated into the ``span`` / ``memory`` / ``pkm`` groups)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from protein_lm.commands.config_files import load_config, resolve_argv
from protein_lm.commands.train import build_cli
from protein_lm.errors import UserError
from protein_lm.model import ModelConfig, ProteinLM
from protein_lm.model_config import FLAT_KEYS, flatten_options, nest_flat_keys

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "base" / "cpu_tiny.yaml"

# The same model, once with the option names of older versions and once nested.
FLAT = {"adaptive_span": True, "span_max": 96, "span_ramp": 8.0, "span_init": 12.0, "span_loss_coef": 1e-5,
        "persistent_memory": 3, "pkm_layers": [-1], "pkm_num_keys": 8, "pkm_topk": 4, "pkm_heads": 2,
        "pkm_key_dim": 16, "pkm_value_lr": 0.05}
NESTED = {"span": {"enabled": True, "max": 96, "ramp": 8.0, "init": 12.0, "loss_coef": 1e-5},
          "memory": {"slots": 3},
          "pkm": {"layers": [-1], "num_keys": 8, "topk": 4, "heads": 2, "key_dim": 16, "value_lr": 0.05}}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- extends


def test_extends_merges_mappings_key_by_key_and_replaces_other_values(tmp_path):
    write(tmp_path / "bases" / "a.yaml", {"trainer": {"max_steps": 5, "devices": 1},
                                          "model": {"config": {"dim": 64, "pkm": {"layers": [0, 1], "topk": 4}}}})
    write(tmp_path / "bases" / "b.yaml", {"extends": "a.yaml", "trainer": {"max_steps": 7}})  # relative to b
    child = write(tmp_path / "run.yaml", {"extends": ["bases/b.yaml"],
                                          "model": {"config": {"pkm": {"layers": [-1]}}}, "seed_everything": 3})
    options, merged, renamed = load_config(child)
    assert merged and renamed == {}
    assert options == {"trainer": {"max_steps": 7, "devices": 1},
                       "model": {"config": {"dim": 64, "pkm": {"layers": [-1], "topk": 4}}},
                       "seed_everything": 3}


def test_several_bases_apply_in_order(tmp_path):
    write(tmp_path / "one.yaml", {"trainer": {"max_steps": 1, "devices": 1}})
    write(tmp_path / "two.yaml", {"trainer": {"max_steps": 2}})
    child = write(tmp_path / "c.yaml", {"extends": ["one.yaml", "two.yaml"]})
    assert load_config(child)[0] == {"trainer": {"max_steps": 2, "devices": 1}}


def test_a_file_without_extends_is_passed_on_as_a_path(tmp_path):
    plain = write(tmp_path / "plain.yaml", {"trainer": {"max_steps": 2}})
    argv, names, notes = resolve_argv(["fit", "--config", str(plain), "--config=" + str(plain)])
    assert argv == ["fit", "--config", str(plain), "--config=" + str(plain)]
    assert names == [str(plain), str(plain)] and notes == []


@pytest.mark.parametrize(("files", "message"), [
    ({"c.yaml": {"extends": "missing.yaml"}}, "--config {c}: extends missing.yaml: no such file (looked for "),
    ({"c.yaml": {"extends": "d.yaml"}, "d.yaml": {"extends": "c.yaml"}}, "`extends` goes round in a circle"),
    ({"c.yaml": {"extends": 3}}, "`extends` must be a file path or a list of them, got 3"),
    ({"c.yaml": {"extends": "d.yaml"}, "d.yaml": []}, "(extends d.yaml): expected YAML options"),
    ({"c.yaml": {"model": 5}}, "--config {c}: `model` must hold options (`key: value` lines under it), got 5"),
    ({"c.yaml": {"extends": "d.yaml"}, "d.yaml": {"checkpoint": [1]}}, "`checkpoint` must hold options"),
    ({"c.yaml": {"model": {"config": "big"}}}, "`model.config` must hold options"),
    ({"c.yaml": {"model": {"config": {"span": 5, "span_max": 3}}}},
     "--config {c}: model.config.span must be a mapping of its options"),
    ({"c.yaml": {"extends": "d.yaml"}, "d.yaml": {"extends": "e.yaml"}},
     "--config {c} (extends d.yaml): extends e.yaml: no such file"),
])
def test_bad_extends_is_one_line_naming_the_file(tmp_path, files, message):
    for name, data in files.items():
        write(tmp_path / name, data)
    c = tmp_path / "c.yaml"
    with pytest.raises(UserError) as err:
        resolve_argv(["fit", "--config", str(c)])
    assert message.format(c=c) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("form", ["--config", "-c", "--config="])
def test_a_merged_file_reaches_the_parser_as_its_text_in_every_form(tmp_path, form):
    write(tmp_path / "base.yaml", {"trainer": {"max_steps": 5, "devices": 1}})
    child = write(tmp_path / "c.yaml", {"extends": "base.yaml", "trainer": {"max_steps": 9}})
    given = [form + str(child)] if form.endswith("=") else [form, str(child)]
    argv, names, _ = resolve_argv(["fit", *given, "--trainer.devices", "2"])
    text = argv[1].split("=", 1)[1] if form.endswith("=") else argv[2]
    assert argv[0] == "fit" and argv[-2:] == ["--trainer.devices", "2"] and names == [str(child)]
    assert yaml.safe_load(text) == {"trainer": {"max_steps": 9, "devices": 1}}


def test_cli_sees_the_merged_file_and_names_the_run_after_it(tmp_path, sample_fasta, monkeypatch):
    monkeypatch.chdir(REPO)
    child = write(tmp_path / "my_run.yaml", {"extends": str(TINY), "model": {"config": {"attention": "exact"}},
                                              "trainer": {"max_steps": 3}})
    cli = build_cli(["--config", str(child), "--data.data_dir", str(sample_fasta), "--wandb", "false"], run=False)
    assert cli.model.config.attention == "exact" and cli.model.config.dim == 64  # override + base
    assert cli.trainer.max_steps == 3
    assert cli._output_dir().name == "my_run"  # the run directory is named after the file given


# --------------------------------------------------------------------------- flat names of older versions


def test_every_flat_name_maps_to_a_real_nested_option():
    names = set(ModelConfig.option_names())
    assert set(FLAT_KEYS.values()) <= names
    assert len(FLAT_KEYS) == sum(n.startswith(("span.", "memory.", "pkm.")) for n in names)


def test_flat_dict_gives_the_nested_config_with_a_warning():
    with pytest.warns(FutureWarning, match="span_max -> span.max"):
        old = ModelConfig.from_dict({"dim": 32, "heads": 4, "depth": 2, **FLAT})
    new = ModelConfig(dim=32, heads=4, depth=2, **NESTED)
    assert old == new and old.to_dict() == new.to_dict()
    assert old.to_dict()["span"]["max"] == 96 and "span_max" not in old.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_dict(new.to_dict()) == new  # nested: no warning


def test_nested_value_wins_over_its_flat_spelling_and_flattening_round_trips():
    data, renamed = nest_flat_keys({"span_max": 10, "span": {"max": 20}, "dim": 8})
    assert data == {"span": {"max": 20}, "dim": 8} and renamed == {"span_max": "span.max"}
    assert flatten_options({"dim": 8, **FLAT})["pkm.topk"] == 4
    assert flatten_options({"dim": 8, **NESTED}) == flatten_options({"dim": 8, **FLAT})


@pytest.mark.parametrize(("options", "message"), [
    ({"span": {"maximum": 3}}, r"unknown ModelConfig fields: \['span.maximum'\]"),
    ({"memory": 4}, r"memory must be a mapping of its options \(e.g. memory: {...}\), got 4"),
    ({"span": {"max": 0}}, "span.max must be a positive whole number"),
    ({"memory": {"replace_ffn": True}}, "memory.replace_ffn .all-attention. needs memory.slots > 0"),
    ({"pkm": {"layers": [9]}}, "pkm.layers entry 9 out of range"),
])
def test_bad_group_options_are_named_with_their_group(options, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**options)


def _tiny_cli(tmp_path, sample_fasta, *args):
    return build_cli(["--data.data_dir", str(sample_fasta), "--wandb", "false",
                      "--output_dir", str(tmp_path / "run"), *args], run=False)


def test_flat_yaml_and_flat_flags_build_the_same_model_as_nested(tmp_path, sample_fasta, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    old = write(tmp_path / "old.yaml", {**load_config(TINY)[0], "model": {"config": {"dim": 32, **FLAT}}})
    new = write(tmp_path / "new.yaml", {**load_config(TINY)[0], "model": {"config": {"dim": 32, **NESTED}}})
    from_old = _tiny_cli(tmp_path, sample_fasta, "--config", str(old), "--model.config.span_init=20",
                         "--model.config.pkm_topk", "2").model.config
    err = capsys.readouterr().err
    assert f"--config {old}: model.config options renamed" in err and "span_max -> span.max" in err
    assert "--model.config flags renamed" in err and "span_init -> span.init, pkm_topk -> pkm.topk" in err
    from_new = _tiny_cli(tmp_path, sample_fasta, "--config", str(new), "--model.config.span.init=20",
                         "--model.config.pkm.topk", "2").model.config
    assert "renamed" not in capsys.readouterr().err
    assert from_old == from_new
    assert (from_new.span.init, from_new.pkm.topk, from_new.memory.slots) == (20.0, 2, 3)


def test_resume_refuses_a_changed_group_option_against_a_flat_checkpoint():
    from protein_lm.commands.train_checks import check_resume

    defaults = {"config": ModelConfig().to_dict()}
    recorded = {"config": flatten_to_old(ModelConfig(span={"enabled": True, "max": 96}).to_dict())}
    same = {"config": ModelConfig(span={"enabled": True, "max": 96}).to_dict()}
    check_resume(same, defaults, recorded, "old.ckpt")  # the same run, spelt the new way
    changed = {"config": ModelConfig(span={"enabled": True, "max": 64}).to_dict()}
    with pytest.raises(UserError, match=r"which has model.config.span.max 96; --model.config.span.max 64 cannot change"):
        check_resume(changed, defaults, recorded, "old.ckpt")


def test_copies_of_a_config_do_not_share_its_groups():
    import dataclasses

    a = ModelConfig()
    b = dataclasses.replace(a, dim=256)
    b.span.max = 7
    assert a.span.max == 1024 and ModelConfig().span.max == 1024
    assert ModelConfig(span=None).span == ModelConfig().span  # `span: null` in YAML: the defaults


def test_init_weights_keeps_a_whole_group_given_on_the_command_line():
    from protein_lm.finetune import architecture_from_checkpoint, explicit_config_fields

    trained = flatten_to_old(ModelConfig(span={"enabled": True, "max": 96}).to_dict())
    run = ModelConfig(span={"enabled": True, "max": 64}).to_dict()
    assert architecture_from_checkpoint(run, trained, set())["span.max"] == 96
    assert architecture_from_checkpoint(run, trained, explicit_config_fields(["--model.config.span_max=64"])) == {}
    assert architecture_from_checkpoint(run, trained, explicit_config_fields(["--model.config.span", "{}"])) == {}


def test_exported_weights_with_flat_config_load_unchanged(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, heads=4, depth=2, ff_dim=64, num_features=16, favor_backend="torch", feature_seed=0,
                      **NESTED)
    model = ProteinLM(cfg).eval()
    from protein_lm.checkpoint import load_model, save_weights, weights_payload

    payload = weights_payload(cfg, "mlm", model.state_dict())
    payload["config"] = flatten_to_old(payload["config"])
    assert "span_max" in payload["config"] and "span" not in payload["config"]
    save_weights(payload, tmp_path / "old.pt")
    with pytest.warns(FutureWarning, match="old.pt: saved with the flat model.config names"):
        loaded, info = load_model(tmp_path / "old.pt")
    assert info["config"]["span"]["max"] == 96  # consumers see the nested form
    ids = torch.randint(4, 24, (2, 20))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def flatten_to_old(config: dict) -> dict:
    """A config dict as protein_lm wrote it before the groups (the inverse of nest_flat_keys)."""
    out = {k: v for k, v in config.items() if k not in ("span", "memory", "pkm")}
    for old, new in FLAT_KEYS.items():
        group, field = new.split(".")
        out[old] = config[group][field]
    return out


@pytest.mark.slow
def test_a_lightning_checkpoint_with_flat_hyperparameters_resumes(tmp_path):
    """A run of an older version (flat ``hyper_parameters["config"]``) continues with ``--ckpt_path``."""
    out = tmp_path / "run"
    common = ["-m", "protein_lm", "fit", "--config", "configs/performer_adaptive_span.yaml", "--output_dir",
              str(out), "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
              "--checkpoint.every_n_train_steps", "2", "--data.max_length", "48", "--data.batch_size", "4",
              "--data.max_train_sequences", "32", "--data.max_eval_sequences", "4",
              "--model.config.span.max", "48"]
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}

    def fit(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *common, *extra], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    fit("--trainer.max_steps", "2")
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    for part in ("hyper_parameters", "protein_lm"):  # both hold the config; an older version wrote both flat
        ckpt[part]["config"] = flatten_to_old(ckpt[part]["config"])
    torch.save(ckpt, last)
    # span.max given again, as the first run had it: compared with the checkpoint's flat span_max
    proc = fit("--trainer.max_steps", "4", "--ckpt_path", "last")
    note = f"protein-lm: {last}: saved with the flat model.config names"
    assert proc.stderr.count(note) == 1, proc.stderr[-2000:]  # one line, no warning source line
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 4
    assert resumed["hyper_parameters"]["config"]["span"]["max"] == 48
