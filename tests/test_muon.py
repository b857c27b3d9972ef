"""``model.optimizer muon``: Muon on the linear layers' weight matrices, AdamW on the rest, as one optimiser."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from protein_lm.commands.train import build_cli
from protein_lm.lit_module import ProteinLMModule, param_groups
from protein_lm.model import ModelConfig
from protein_lm.optimizers import MuonAdamW, split_for_muon

CONFIG = ModelConfig(vocab_size=33, dim=32, depth=2, heads=2, ff_dim=64, max_length=32, attention="exact",
                     dropout=0.0)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (4, 32), generator=g)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=g) < 0.3
    labels[picked] = ids[picked]
    inputs = ids.masked_fill(picked, 32)
    return {"input_ids": inputs, "labels": labels, "padding_mask": torch.zeros_like(ids, dtype=torch.bool)}


def test_muon_takes_exactly_the_linear_weight_matrices():
    module = ProteinLMModule(CONFIG, optimizer="muon", max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    muon = {id(p) for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    expected = {id(m.weight) for m in module.model.modules() if isinstance(m, nn.Linear)}
    expected -= {id(m.weight) for m in module.model.modules() if isinstance(m, nn.Embedding)}  # tied head
    assert muon == expected and muon
    every = {id(p) for p in module.model.parameters()}
    adam = {id(p) for g in optimizer.param_groups if not g.get("muon") for p in g["params"]}
    assert adam == every - muon


def test_muon_adamw_steps_like_the_two_torch_optimisers_and_lowers_the_loss():
    torch.manual_seed(0)
    module = ProteinLMModule(CONFIG, optimizer="muon", max_steps=10)
    reference = copy.deepcopy(module)
    optimizer = MuonAdamW(split_for_muon(param_groups(module.model, 0.1)), lr=3e-3)
    ref_groups = split_for_muon(param_groups(reference.model, 0.1))
    ref_muon = torch.optim.Muon([g for g in ref_groups if g.get("muon")], lr=3e-3, adjust_lr_fn="match_rms_adamw")
    ref_adam = torch.optim.AdamW([g for g in ref_groups if not g.get("muon")], lr=3e-3, betas=(0.9, 0.98))
    batch = _batch()
    losses = []
    for _ in range(30):
        def closure():
            optimizer.zero_grad()
            loss = module._shared_step(batch)[0]
            loss.backward()
            return loss.detach()

        losses.append(float(optimizer.step(closure)))
        ref_muon.zero_grad()
        ref_adam.zero_grad()
        reference._shared_step(batch)[0].backward()
        ref_muon.step()
        ref_adam.step()
    for (name, p), q in zip(module.model.named_parameters(), reference.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    assert losses[-1] < 0.8 * losses[0]  # 3.55 -> 2.60 nats; below ln(20) = 3.0, the floor without memorising


def test_fit_and_resume_with_muon(tmp_path, sample_fasta):
    """4 steps + resume to 6 gives the weights of 6 uninterrupted steps: both optimisers' states are restored."""
    common = ["--config", "configs/debug.yaml", "--data.data_dir", str(sample_fasta),
            "--model.config.depth", "1", "--model.config.dim", "32", "--model.config.ff_dim", "64",
            "--model.config.num_features", "16", "--data.max_length", "64", "--data.batch_size", "4",
            "--data.max_train_sequences", "64", "--data.max_eval_sequences", "4", "--trainer.limit_val_batches", "1",
            "--model.optimizer", "muon", "--checkpoint.every_n_train_steps", "4",
            "--trainer.val_check_interval", "4"]
    args = [*common, "--output_dir", str(tmp_path / "resumed")]
    build_cli(["fit", *args, "--trainer.max_steps", "4"])
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    inner = saved["optimizer_states"][0]["inner"]
    assert len(inner) == 2 and any("momentum_buffer" in s for s in inner[0]["state"].values())
    cli = build_cli(["fit", *args, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6
    optimizer = cli.trainer.optimizers[0]
    shared = {id(g) for g in optimizer.param_groups}
    assert shared == {id(g) for opt in optimizer.inner for g in opt.param_groups}  # the scheduler reaches both
    assert optimizer.inner[0].state and optimizer.inner[1].state
    build_cli(["fit", *common, "--output_dir", str(tmp_path / "straight"), "--trainer.max_steps", "6"])
    resumed, straight = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", map_location="cpu",
                                    weights_only=False)["state_dict"] for d in ("resumed", "straight"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
