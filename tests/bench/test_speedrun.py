"""bench/experiments/speedrun.py and speedrun_campaign.py: time-to-quality runs, their summary, the time schedules."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.experiments import speedrun, speedrun_campaign
from protein_lm.data.datamodule import ProteinDataModule
from protein_lm.errors import UserError
from protein_lm.lit_module import ProteinLMModule
from protein_lm.model import ModelConfig
from protein_lm.schedules import TrainClock, time_warmup_decay, warmup_decay

REPO = Path(__file__).resolve().parents[2]

TINY = ["--config", "configs/debug.yaml", "--model.config.depth", "1", "--model.config.dim", "32",
        "--model.config.heads", "2", "--model.config.ff_dim", "64", "--model.config.num_features", "16",
        "--data.max_length", "64", "--data.batch_size", "4", "--data.max_train_sequences", "200",
        "--data.max_eval_sequences", "8", "--model.warmup_steps", "3"]
EVAL = ["--test-sequences", "8", "--ood-sequences", "8", "--eval-max-length", "64", "--eval-batch-tokens", "512"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ood_fasta(tmp_path_factory) -> Path:
    """An OOD file of 12 real records (the last ones of the sample: not what the test split starts with)."""
    with gzip.open(REPO / "data" / "swissprot_sample.fasta.gz", "rt") as handle:
        records = handle.read().split(">")[1:]
    path = tmp_path_factory.mktemp("ood") / "ood.fasta"
    path.write_text("".join(">" + r for r in records[-12:]))
    return path


# --------------------------------------------------------------------------- schedules


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("kind", ["time_cosine", "time_linear"])
def test_time_schedule_matches_the_closed_form(kind):
    now = FakeClock()
    clock = TrainClock(now)
    clock.start()
    factor = time_warmup_decay(warmup_steps=4, budget_seconds=100.0, min_lr_ratio=0.1, kind=kind, clock=clock)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    now.t = 20.0  # warm-up ends at 20 s: the decay spans the remaining 80 s
    assert factor(4) == pytest.approx(1.0)
    for t in (30.0, 60.0, 90.0, 100.0, 150.0):
        now.t = t
        p = min(1.0, (t - 20.0) / 80.0)
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) if kind == "time_cosine" else 1 - 0.9 * p
        assert factor(5) == pytest.approx(expected, abs=1e-12)
    assert factor(5) == pytest.approx(0.1)


def test_train_clock_leaves_out_paused_time():
    now = FakeClock()
    clock = TrainClock(now)
    assert clock.elapsed() == 0.0 and not clock.started
    clock.start()
    now.t = 10.0
    clock.pause()
    now.t = 25.0
    assert clock.elapsed() == 10.0  # frozen while paused
    clock.resume()
    now.t = 30.0
    assert clock.elapsed() == 15.0


def test_step_linear_schedule_and_module_checks():
    f = warmup_decay(10, 110, 0.2, "linear")
    assert f(9) == 1.0 and f(10) == 1.0 and f(60) == pytest.approx(0.6) and f(110) == pytest.approx(0.2)
    config = ModelConfig(vocab_size=33, dim=16, depth=1, heads=2, ff_dim=32, max_length=32, attention="exact")
    with pytest.raises(UserError, match="budget_minutes"):
        ProteinLMModule(config, schedule="time_cosine")
    with pytest.raises(UserError, match="schedule"):
        ProteinLMModule(config, schedule="step")
    module = ProteinLMModule(config, schedule="time_linear", budget_minutes=1.0, warmup_steps=0, lr=1e-3, max_steps=9,
                             min_lr_ratio=0.0)
    now = FakeClock()
    module.train_clock = TrainClock(now)
    module.train_clock.start()
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    now.t = 45.0  # 3/4 of the 60 s budget
    scheduler.optimizer.step()  # no gradients: changes nothing, keeps the step order torch expects
    scheduler.step()
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)


# --------------------------------------------------------------------------- summary


def test_minutes_to_target_interpolates_between_rows():
    rows = [{"train_seconds": s, "ood_ppl": p} for s, p in ((0, 20.0), (60, 15.0), (120, 14.0), (180, 13.0))]
    # 14.0 at 2 min, 13.0 at 3 min: 13.5 is half-way, 2.5 min
    assert speedrun.minutes_to_target(rows, 13.5) == pytest.approx(2.5)
    assert speedrun.minutes_to_target(rows, 12.0) is None
    assert speedrun.minutes_to_target(rows, 25.0) == 0.0
    assert speedrun.minutes_to_target(rows, 14.0) == pytest.approx(2.0)


# --------------------------------------------------------------------------- fixed evaluation sets


def _eval_args(**kw) -> argparse.Namespace:
    base = dict(eval_max_length=64, eval_seed=0, eval_batch_tokens=512, test_sequences=8, ood_sequences=8)
    return argparse.Namespace(**{**base, **kw})


def test_evaluation_masks_are_fixed_whatever_the_training_seed(sample_fasta, ood_fasta):
    sets = []
    for seed in (3, 7):  # the data seed of training must not move the evaluation masks
        dm = ProteinDataModule(str(sample_fasta), max_length=128, seed=seed, max_train_sequences=100)
        sets.append(speedrun.build_eval_sets(dm, str(ood_fasta), _eval_args(), model_max_length=128))
    for name in ("test", "ood"):
        a, b = sets[0][name], sets[1][name]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        labels = torch.cat([x["labels"].flatten() for x in a])
        real = torch.cat([(~x["padding_mask"]).flatten() for x in a]).sum()
        assert 0.08 < labels.ne(-100).sum() / real < 0.22  # ~15 % of residues masked
    dm = ProteinDataModule(str(sample_fasta), max_length=128, seed=3, max_train_sequences=100)
    other = speedrun.build_eval_sets(dm, str(ood_fasta), _eval_args(eval_seed=1), model_max_length=128)
    assert not torch.equal(other["ood"][0]["labels"], sets[0]["ood"][0]["labels"])  # the seed does matter
    with pytest.raises(UserError, match="eval-max-length"):
        speedrun.build_eval_sets(dm, str(ood_fasta), _eval_args(eval_max_length=256), model_max_length=128)


# --------------------------------------------------------------------------- a whole run


def test_smoke_run_records_rows_and_plots(tmp_path, ood_fasta, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "tiny.json"
    argv = [*TINY, *EVAL, "--minutes", "0.04", "--eval-every", "10", "--ood", str(ood_fasta), "--json", str(out)]
    assert speedrun.main(argv) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert len(rows) >= 3 and rows[0]["step"] == 0
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and all(s % 10 == 0 for s in steps[:-1])
    seconds = [r["train_seconds"] for r in rows]
    assert all(b > a for a, b in zip(seconds, seconds[1:], strict=False))
    assert seconds[-1] >= 0.04 * 60  # stopped by the budget, not before it
    assert all(r["wall_seconds"] >= r["train_seconds"] for r in rows)
    tokens = [r["tokens"] for r in rows]
    assert tokens[0] == 0 and all(b > a for a, b in zip(tokens, tokens[1:], strict=False))
    assert all(0 < r["scored_tokens"] < r["tokens"] for r in rows[1:])  # MLM: a share of the real tokens
    assert all(math.isfinite(r[k]) for r in rows for k in ("test_ppl", "ood_ppl", "test_acc", "ood_acc"))
    assert len({r["ood_tokens"] for r in rows}) == 1  # the same scored positions at every evaluation
    assert rows[-1]["lr"] == pytest.approx(3e-3 * 0.1, rel=0.05)  # time cosine: min_lr at the budget
    s = doc["summary"]
    assert s["final_ood_ppl"] == rows[-1]["ood_ppl"] and s["best_test_ppl"] == min(r["test_ppl"] for r in rows)
    assert s["minutes_to_target"] is None  # a 2-second tiny model does not reach ppl 13.5
    assert doc["meta"]["torch"] == torch.__version__ and "--model.lr" not in doc["meta"]["fit_argv"]
    assert (tmp_path / "tiny_run" / "checkpoints" / "last.ckpt").is_file()
    assert "| step |" in capsys.readouterr().out

    png = tmp_path / "curves.png"
    assert speedrun.main(["--plot", str(out), str(out), "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| tiny | " in capsys.readouterr().out


def test_run_needs_its_arguments(tmp_path, capsys):
    assert speedrun.main(["--config", "configs/debug.yaml", "--json", str(tmp_path / "x.json")]) == 2
    assert "needs --minutes, --ood" in capsys.readouterr().err


# --------------------------------------------------------------------------- the campaign launcher


def test_campaign_starts_detached_runs_and_reports_them(tmp_path, ood_fasta):
    out = tmp_path / "campaign"
    common = [*TINY[2:], *EVAL, "--trainer.accelerator", "cpu"]
    campaign = {"minutes": 0.02, "ood": str(ood_fasta), "eval_every": 5, "args": common,
                "runs": {"a": {"config": "configs/debug.yaml"},
                         "b": {"config": ["configs/debug.yaml"], "overrides": ["--model.lr", "1e-3"]}}}
    spec = tmp_path / "campaign.yaml"
    spec.write_text(json.dumps(campaign))
    launcher = [sys.executable, "-m", "bench.experiments.speedrun_campaign"]
    try:
        started = subprocess.run([*launcher, str(spec), "--out", str(out)], capture_output=True, text=True,
                                 timeout=60, check=True, cwd=REPO).stdout  # the configs' relative paths
        assert "started a" in started and "started b" in started
        report = {e["run"]: e for e in speedrun_campaign.status(out)}
        assert set(report) == {"a", "b"} and all(e["alive"] for e in report.values())  # returned at once
        again = subprocess.run([*launcher, str(spec), "--out", str(out)], capture_output=True, text=True, cwd=REPO)
        assert again.returncode == 2 and "already running" in again.stderr
        deadline = time.monotonic() + 240
        while any(e["alive"] for e in speedrun_campaign.status(out)) and time.monotonic() < deadline:
            time.sleep(1)
        text = subprocess.run([*launcher, "--out", str(out), "--status"], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout
        report = {e["run"]: e for e in speedrun_campaign.status(out)}
        for name in ("a", "b"):
            assert not report[name]["alive"], (out / f"{name}.log").read_text()[-2000:]
            assert report[name]["rows"] >= 2 and math.isfinite(report[name]["ood_ppl"])
            assert f"| {name} | no |" in text
        cmd_b = json.loads((out / "b.cmd.json").read_text())
        assert cmd_b[-2:] == ["--model.lr", "1e-3"]
    finally:
        speedrun_campaign.stop(out, None)
        for name in speedrun_campaign.run_names(out):
            pid = speedrun_campaign.read_pid(out, name)
            deadline = time.monotonic() + 30
            while pid is not None and speedrun_campaign.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
