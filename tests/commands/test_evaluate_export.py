"""evaluate / export / convert / load_model on small checkpoints trained for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from protein_lm.checkpoint import load_model, read_checkpoint
from protein_lm.cli import main
from protein_lm.data.datamodule import ProteinDataModule
from protein_lm.errors import UserError
from protein_lm.lit_module import ProteinLMModule
from protein_lm.model import ModelConfig


def _train_checkpoint(out: Path, fasta: Path, attention: str, objective: str) -> Path:
    pl.seed_everything(0)
    dm = ProteinDataModule(str(fasta), max_length=64, objective=objective, batch_size=4,
                           max_train_sequences=32, max_eval_sequences=8, pin_memory=False)
    module = ProteinLMModule(
        ModelConfig(dim=32, depth=2, heads=4, ff_dim=64, attention=attention, num_features=16),
        objective=objective, warmup_steps=1, redraw_interval=1,
    )
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, dm)
    path = out / f"{attention}-{objective}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sample_fasta):
    out = tmp_path_factory.mktemp("ckpts")
    return {
        "performer": _train_checkpoint(out, sample_fasta, "performer-softmax", "mlm"),
        "exact_causal": _train_checkpoint(out, sample_fasta, "exact", "causal"),
    }


def test_export_round_trip_gives_identical_logits(checkpoints, tmp_path):
    ckpt = checkpoints["performer"]
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["format"] == "protein_lm.weights" and raw["version"] == 1
    assert raw["objective"] == "mlm" and raw["config"]["attention"] == "performer-softmax"
    assert "optimizer_states" not in raw and all(torch.is_tensor(v) for v in raw["state_dict"].values())
    model_ckpt, info_ckpt = load_model(ckpt)
    model_pt, info_pt = load_model(out)
    assert info_ckpt["format"] == "lightning" and info_pt["format"] == "weights"
    assert model_pt.config == model_ckpt.config
    ids = torch.randint(4, 24, (2, 20))
    torch.testing.assert_close(model_pt(ids).logits, model_ckpt(ids).logits, atol=0, rtol=0)
    # Projections (buffers) travel with the weights.
    assert int(model_pt.blocks[0].attn.kernel.redraw_count) >= 2


def test_evaluate_twice_gives_the_same_numbers(checkpoints, sample_fasta, tmp_path, capsys):
    results = []
    for i in range(2):
        out = tmp_path / f"eval{i}.json"
        argv = ["evaluate", "--checkpoint", str(checkpoints["performer"]), "--fasta", str(sample_fasta),
                "--max-sequences", "12", "--json", str(out), "--device", "cpu", "--quiet"]
        assert main(argv) == 0
        results.append(json.loads(out.read_text()))
    a, b = results
    for key in ("objective", "accuracy", "perplexity", "num_tokens", "loss"):
        assert a[key] == b[key]
    assert a["objective"] == "mlm" and a["num_tokens"] > 100
    assert a["perplexity"] == pytest.approx(float(torch.tensor(a["loss"]).exp()), rel=1e-5)
    printed = json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")
    assert printed["accuracy"] == a["accuracy"]


def test_evaluate_causal_scores_every_real_position(checkpoints, sample_fasta, tmp_path):
    from protein_lm.commands.evaluate import evaluate

    result = evaluate(checkpoints["exact_causal"], sample_fasta, max_sequences=3, device="cpu", max_length=64)
    assert result["objective"] == "causal"
    # Per window: every residue plus <eos> is a next-token target (<cls> is only an input).
    from protein_lm.data.cache import ensure_cache
    from protein_lm.data.readers import TokenCache

    cache = TokenCache(ensure_cache(sample_fasta))
    window = result["max_length"] - 2
    expected = sum(int(n) + -(-int(n) // window) for n in cache.lengths[:3])
    assert result["num_tokens"] == expected


def test_convert_exact_to_performer_keeps_every_other_weight(checkpoints, tmp_path):
    out = tmp_path / "performer.pt"
    src = checkpoints["exact_causal"]
    assert main(["convert", "--checkpoint", str(src), "--attention", "performer-relu", "--out", str(out)]) == 0
    old = read_checkpoint(src)
    new_model, info = load_model(out)
    assert new_model.config.attention == "performer-relu" and info["objective"] == "causal"
    assert new_model.config.causal
    new_state = new_model.state_dict()
    shared = [k for k in new_state if ".kernel." not in k]
    assert set(shared) == set(old["state_dict"])
    for key in shared:
        assert torch.equal(new_state[key], old["state_dict"][key]), key
    assert any(".kernel.projection" in k for k in new_state)
    # Fine-tuning starts from the converted weights.
    module = ProteinLMModule(new_model.config, objective="causal", init_weights=str(out))
    for key in shared:
        assert torch.equal(module.model.state_dict()[key], new_state[key])


def test_load_model_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"hello": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="neither"):
        load_model(bad)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_model(tmp_path / "junk.ckpt")
    # a pickle that weights_only refuses: torch's explanation is pages long, ours stays one line
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"config": pl.Trainer}, unsafe)
    with pytest.raises(UserError, match="cannot read") as err:
        load_model(unsafe)
    assert "\n" not in str(err.value)


def test_model_trained_with_forced_triton_loads_and_runs_on_cpu(checkpoints, tmp_path):
    """`favor_backend: triton` (a GPU-only choice) must not make a checkpoint unusable on a CPU."""
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(checkpoints["performer"]), "--out", str(out)]) == 0
    raw = torch.load(out, map_location="cpu", weights_only=True)
    raw["config"]["favor_backend"] = "triton"
    forced = tmp_path / "forced.pt"
    torch.save(raw, forced)
    model, info = load_model(forced)
    assert model.config.favor_backend == "auto"
    reference, _ = load_model(out)
    ids = torch.randint(4, 24, (2, 20))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_evaluate_causal_numbers_match_a_direct_computation(checkpoints, sample_fasta):
    """Token-weighted CE / accuracy from `evaluate` equal a plain loop over the proteins' logits."""
    import math

    from protein_lm.commands.evaluate import evaluate
    from protein_lm.data.cache import ensure_cache
    from protein_lm.data.readers import TokenCache
    from protein_lm.data.tokenizer import CLS_ID, EOS_ID

    n = 4
    cache = TokenCache(ensure_cache(sample_fasta))
    window = int(max(cache.lengths[:n])) + 2  # one window per protein: no splitting to reproduce
    result = evaluate(checkpoints["exact_causal"], sample_fasta, max_sequences=n, device="cpu",
                      max_length=window, batch_size=3)
    model, _ = load_model(checkpoints["exact_causal"])
    total_ce, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(n):
            ids = torch.tensor([[CLS_ID, *cache.sequence(i).tolist(), EOS_ID]])
            logits = model(ids).logits[0, :-1].double()  # position t predicts token t+1
            target = ids[0, 1:]
            total_ce += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += int(target.numel())
    assert result["num_tokens"] == count
    assert result["loss"] == pytest.approx(total_ce / count, rel=1e-4)
    assert result["accuracy"] == pytest.approx(correct / count, abs=1e-6)  # float32; one token = 1/count
    assert result["perplexity"] == pytest.approx(math.exp(total_ce / count), rel=1e-4)
