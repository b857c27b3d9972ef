"""ProteinLMModule: metrics, optimiser groups, schedule, projection redraw, non-finite loss."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from protein_lm.data.datamodule import ProteinDataModule
from protein_lm.lit_module import (
    NonFiniteLossError,
    ProteinLMModule,
    TokenMetrics,
    param_groups,
    token_statistics,
    warmup_cosine,
)
from protein_lm.model import ModelConfig

TINY = dict(dim=32, depth=2, heads=4, ff_dim=64, num_features=16, max_length=64)


def tiny_dm(fasta, objective="mlm") -> ProteinDataModule:
    return ProteinDataModule(str(fasta), max_length=64, objective=objective, batch_size=4,
                             max_train_sequences=64, max_eval_sequences=8, pin_memory=False)


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                enable_checkpointing=False, default_root_dir=tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


def test_token_statistics_and_epoch_metrics_are_token_weighted():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 33)
    labels = torch.randint(4, 30, (3, 5))
    labels[0, :4] = -100
    loss_sum, correct, count = token_statistics(logits, labels)
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert count == keep.sum()
    torch.testing.assert_close(loss_sum, ref)
    assert correct == (logits.argmax(-1)[keep] == labels[keep]).sum()

    # Two batches of very different sizes: the epoch value weights every token equally.
    metric = TokenMetrics()
    metric.update(torch.tensor(10.0), torch.tensor(1), torch.tensor(2))  # batch mean 5.0
    metric.update(torch.tensor(8.0), torch.tensor(6), torch.tensor(8))  # batch mean 1.0
    out = metric.compute()
    assert float(out["loss"]) == pytest.approx(18.0 / 10)  # not (5 + 1) / 2
    assert float(out["accuracy"]) == pytest.approx(0.7)
    assert float(out["perplexity"]) == pytest.approx(math.exp(1.8), rel=1e-6)
    assert int(out["num_tokens"]) == 10


def test_param_groups_exclude_norms_biases_embeddings_and_honour_overrides():
    module = ProteinLMModule(ModelConfig(**TINY))
    model = module.model
    model.blocks[0].attn.out.bias.optim_overrides = {"lr": 1e-2, "lr_schedule": "constant"}
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert id(model.embed.weight) in ids["no_decay"]
    assert id(model.norm.weight) in ids["no_decay"] and id(model.head_bias) in ids["no_decay"]
    assert id(model.blocks[0].ffn.fc1.weight) in ids["decay"]
    assert id(model.blocks[0].ffn.fc1.bias) in ids["no_decay"]
    custom = groups["custom0"]
    assert custom["lr"] == 1e-2 and custom["weight_decay"] == 0.0
    assert {id(p) for p in custom["params"]} == {id(model.blocks[0].attn.out.bias)}
    every = [p for g in groups.values() for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_cosine(0, None, 0.1)(1000) == 1.0


def test_objective_sets_causality():
    assert ProteinLMModule(ModelConfig(**TINY), objective="causal").model.config.causal
    assert not ProteinLMModule(ModelConfig(**TINY), objective="mlm").model.config.causal
    with pytest.raises(ValueError, match="bidirectional"):
        ProteinLMModule(ModelConfig(causal=True, **TINY), objective="mlm")


def _projections(module):
    return [k.projection.clone() for k in module.model.favor_modules()]


def test_projection_redraw_every_n_steps_is_reproducible_and_off_in_eval(tmp_path, sample_fasta):
    runs = []
    for _ in range(2):
        pl.seed_everything(0)
        module = ProteinLMModule(ModelConfig(**TINY), redraw_interval=2, seed=3)
        initial = _projections(module)
        t = trainer(tmp_path, max_steps=3)
        t.fit(module, tiny_dm(sample_fasta))
        after = _projections(module)
        # Redrawn once (before step 2), every layer differently.
        assert all(not torch.equal(a, b) for a, b in zip(initial, after, strict=True))
        assert not torch.equal(after[0], after[1])
        counts = [int(k.redraw_count) for k in module.model.favor_modules()]
        assert counts == [2, 2]  # the initial draw + one redraw
        t.validate(module, tiny_dm(sample_fasta), verbose=False)
        assert all(torch.equal(a, b) for a, b in zip(after, _projections(module), strict=True))
        runs.append(after)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _NaNAtStep(ProteinLMModule):
    def _shared_step(self, batch):
        loss, aux, loss_sum, correct, count = super()._shared_step(batch)
        if self.training and self.global_step == 3:
            loss = loss * float("nan")
        return loss, aux, loss_sum, correct, count


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, sample_fasta):
    pl.seed_everything(0)
    module = _NaNAtStep(ModelConfig(**TINY), redraw_interval=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    t = trainer(tmp_path, max_steps=10, enable_checkpointing=True, callbacks=[ckpt])
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss .* step 3.*last\.ckpt"):
        t.fit(module, tiny_dm(sample_fasta))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    # The weights in memory were not stepped with the NaN gradient either.
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_validation_metrics_are_logged(tmp_path, sample_fasta):
    pl.seed_everything(0)
    module = ProteinLMModule(ModelConfig(**TINY), objective="causal")
    t = trainer(tmp_path, max_steps=1, limit_val_batches=None)
    [metrics] = t.validate(module, tiny_dm(sample_fasta, "causal"), verbose=False)
    assert set(metrics) >= {"val/loss", "val/accuracy", "val/perplexity", "val/num_tokens"}
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    # Near-uniform predictions from a fresh model: ~ln(33) nats.
    assert 2.5 < metrics["val/loss"] < 4.5
    [test_metrics] = t.test(module, tiny_dm(sample_fasta, "causal"), verbose=False)
    assert "test/perplexity" in test_metrics


def test_validation_logs_span_and_pkm_statistics(sample_fasta, tmp_path):
    """Models with adaptive span and PKM layers report span lengths and slot usage at validation."""
    import pytorch_lightning as pl

    from protein_lm.data.datamodule import ProteinDataModule
    from protein_lm.lit_module import ProteinLMModule
    from protein_lm.model import ModelConfig

    config = ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, attention="exact", span={"enabled": True, "max": 64},
                         pkm={"layers": [1], "num_keys": 8, "topk": 4, "heads": 2, "key_dim": 16})
    module = ProteinLMModule(config=config, objective="mlm", warmup_steps=1, redraw_interval=None)
    dm = ProteinDataModule(str(sample_fasta), max_length=48, batch_size=4, max_train_sequences=16,
                           max_eval_sequences=8, cache_root=str(tmp_path / "cache"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=2, val_check_interval=2)
    trainer.fit(module, dm)
    logged = trainer.callback_metrics
    # independent of span_statistics: the largest learned span fraction times S (config.span.max)
    fractions = [p.detach().clamp(0, 1) for n, p in module.model.named_parameters() if n.endswith("span_fraction")]
    assert fractions, "the model has learnable spans"
    assert float(logged["val/span/max"]) == pytest.approx(64 * float(torch.cat(fractions).max()), rel=1e-6)
    assert float(logged["val/span/mean"]) == pytest.approx(64 * float(torch.cat(fractions).mean()), rel=1e-6)
    assert 0.0 < float(logged["val/pkm/0/used"]) <= 1.0
    assert float(logged["val/pkm/0/top99"]) >= float(logged["val/pkm/0/top50"]) >= 1


def test_optimiser_schedule_per_group_matches_closed_form():
    """Decaying groups follow warm-up + cosine (written out here); PKM values keep a constant LR."""
    import math

    from protein_lm.lit_module import ProteinLMModule
    from protein_lm.model import ModelConfig

    config = ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, attention="exact",
                         pkm={"layers": [1], "num_keys": 8, "topk": 4, "heads": 2, "key_dim": 16, "value_lr": 0.05})
    module = ProteinLMModule(config=config, objective="mlm", lr=1e-3, warmup_steps=10, max_steps=110,
                             min_lr_ratio=0.1, weight_decay=0.1, redraw_interval=None)
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    value_ids = {id(p) for n, p in module.model.named_parameters() if n.endswith("values.weight")}
    assert value_ids, "the PKM layer has value parameters"
    kinds = []
    for group in optimizer.param_groups:
        is_values = {id(p) for p in group["params"]} <= value_ids
        kinds.append("values" if is_values else "decay" if group["weight_decay"] > 0 else "no_decay")
        if is_values:
            assert group["weight_decay"] == 0.0
    assert set(kinds) == {"values", "decay", "no_decay"}

    def expected(step: int) -> float:  # the documented schedule, independently written
        if step < 10:
            return 1e-3 * (step + 1) / 10
        progress = min(1.0, (step - 10) / 100)
        return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    for step in range(130):
        for kind, group in zip(kinds, optimizer.param_groups, strict=True):
            want = 0.05 if kind == "values" else expected(step)
            assert group["lr"] == pytest.approx(want, rel=1e-9), (step, kind)
        optimizer.step()
        scheduler.step()
