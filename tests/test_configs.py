"""Every YAML in configs/ parses with the CLI and builds its model, data module and trainer.

Heavy (GPU) configs are built on the meta device (no memory, no init cost) and pointed at
the shipped sample instead of their prepared cache, so this stays fast on a CPU. The strategy
overlays (``strategy_*.yaml``) are built on top of the paper's BID Performer config, as documented.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protein_lm.commands.config_files import load_config
from protein_lm.commands.train import build_cli
from protein_lm.lit_module import ProteinLMModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "base").glob("*.yaml"))
OVERLAY_BASE = REPO / "configs" / "protein_bid_performer_softmax.yaml"  # what strategy_*.yaml are added to


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"debug.yaml", "quickstart.yaml"} <= names
    for tag in ("bid", "uni"):
        for att in ("performer_softmax", "performer_relu", "exact"):
            assert f"protein_{tag}_{att}.yaml" in names
    assert {"concat_performer_softmax.yaml", "concat_exact.yaml"} <= names
    assert "packed_exact.yaml" in names


def test_shipped_configs_use_the_nested_option_names():
    for path in CONFIGS:
        _, _, renamed = load_config(path)
        assert renamed == {}, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(path, tmp_path, sample_fasta, monkeypatch):
    monkeypatch.chdir(REPO)
    overlay = path.stem.startswith("strategy_")
    options = {**(load_config(OVERLAY_BASE)[0] if overlay else {}), **load_config(path)[0]}
    args = [*(["--config", str(OVERLAY_BASE)] if overlay else []),
            "--config", str(path), "--output_dir", str(tmp_path), "--wandb", "false"]
    data_dir = (options.get("data") or {}).get("data_dir")
    if data_dir is None or not (REPO / data_dir).exists():
        args += ["--data.data_dir", str(sample_fasta)]  # GPU configs point at a prepared cache
    heavy = (options.get("trainer") or {}).get("accelerator") != "cpu"
    device = torch.device("meta") if heavy else torch.device("cpu")
    with device:
        cli = build_cli(args, run=False)
    module = cli.model
    assert isinstance(module, ProteinLMModule)
    cfg = module.config
    assert cfg.vocab_size == 33  # linked from the data module
    assert cfg.causal == (cli.datamodule.objective == "causal") == (module.objective == "causal")
    assert cfg.max_length == cli.datamodule.max_length
    assert module.model.embed.weight.device.type == device.type
    # The file name states the attention kind and objective; the config must agree.
    for kind in ("performer_softmax", "performer_relu", "exact"):
        if kind in path.stem:
            assert cfg.attention == kind.replace("_", "-")
    if "_uni_" in path.stem:
        assert module.objective == "causal"
    if "_bid_" in path.stem:
        assert module.objective == "mlm"
    if path.stem.startswith("protein_") or overlay:  # the Performer paper's protein setting
        assert (cfg.heads, cfg.depth, cfg.ff_dim, cfg.dim, cfg.max_length) == (8, 36, 1024, 512, 1024)
        assert cfg.num_features == 256
    if path.stem.startswith("concat_"):
        assert (cfg.heads, cfg.depth, cfg.ff_dim, cfg.dim, cfg.max_length) == (8, 6, 2048, 512, 8192)
        assert cli.datamodule.mode == "concat"
    if path.stem.startswith("packed_"):
        assert cli.datamodule.mode == "packed"
        assert cli.datamodule.rows_per_batch * cfg.max_length == cli.datamodule.tokens_per_batch
    if path.stem.startswith("recipe_"):  # the recipe that trained the shipped checkpoint
        from protein_lm.checkpoint import read_checkpoint

        shipped = read_checkpoint(REPO / "checkpoints" / "performer-softmax-bid-swissprot2014.pt")["config"]
        for name in ("dim", "depth", "heads", "ff_dim", "attention", "num_features", "dropout"):
            assert getattr(cfg, name) == shipped[name], name
    assert cli.trainer.max_steps > 0


@pytest.mark.parametrize(
    ("flag", "mode"), [("true", None), ("false", "off"), ("reduce-overhead", "reduce-overhead")]
)
def test_compile_flag_reaches_torch_compile(flag, mode, tmp_path, sample_fasta, monkeypatch):
    """``--model.compile true | false | <mode>``: the mode given is the one ``ProteinLM.compiled`` gets."""
    from protein_lm.model import ProteinLM

    monkeypatch.chdir(REPO)
    seen = []
    monkeypatch.setattr(ProteinLM, "compiled", lambda self, mode=None: seen.append(mode) or self)
    args = ["--config", "configs/debug.yaml", "--output_dir", str(tmp_path), "--wandb", "false"]
    cli = build_cli([*args, "--data.data_dir", str(sample_fasta), "--model.compile", flag], run=False)
    cli.model.configure_model()
    assert seen == ([] if mode == "off" else [mode])


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="reduce-overhead"):
        ProteinLMModule(compile="reduce_overhead")


def _overlay_trainer(name: str, tmp_path: Path, sample_fasta: Path, *extra: str):
    args = ["--config", str(OVERLAY_BASE), "--config", f"configs/{name}", "--output_dir", str(tmp_path),
            "--wandb", "false", "--data.data_dir", str(sample_fasta), *extra]
    with torch.device("meta"):
        return build_cli(args, run=False).trainer


def test_fsdp_overlay_shards_fully_per_block_with_checkpointing_and_float32_reduction(
        tmp_path, sample_fasta, monkeypatch):
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from protein_lm.distributed import BlockFSDP
    from protein_lm.model import Block

    monkeypatch.chdir(REPO)
    # bf16-mixed is what the CLI picks on a GPU; forced here, since this machine may have none.
    strategy = _overlay_trainer("strategy_fsdp.yaml", tmp_path, sample_fasta,
                                "--trainer.precision", "bf16-mixed").strategy
    assert type(strategy) is BlockFSDP
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == {Block}
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(checkpointed, ModuleWrapPolicy) and checkpointed._module_classes == {Block}
    assert strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"] is True  # the optimiser sees the model's own parameters
    mp = strategy.mixed_precision_config
    assert isinstance(mp, MixedPrecision)
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_fsdp_overlay_options_reach_the_strategy(tmp_path, sample_fasta, monkeypatch):
    monkeypatch.chdir(REPO)
    strategy = _overlay_trainer(
        "strategy_fsdp.yaml", tmp_path, sample_fasta, "--trainer.precision", "bf16-mixed",
        "--trainer.strategy.init_args.state_dict_type", "sharded",
        "--trainer.strategy.init_args.activation_checkpointing", "false",
        "--trainer.strategy.init_args.reduce_dtype", "bfloat16").strategy
    assert strategy._state_dict_type == "sharded"
    assert strategy._activation_checkpointing_kwargs == {}
    assert strategy.mixed_precision_config.reduce_dtype == torch.bfloat16
    assert strategy.mixed_precision_config.buffer_dtype == torch.float32


def test_ddp_overlay_is_lightnings_ddp(tmp_path, sample_fasta, monkeypatch):
    from pytorch_lightning.strategies import DDPStrategy

    monkeypatch.chdir(REPO)
    trainer = _overlay_trainer("strategy_ddp.yaml", tmp_path, sample_fasta, "--trainer.accelerator", "cpu",
                               "--trainer.devices", "2")
    assert type(trainer.strategy) is DDPStrategy and trainer.num_devices == 2
