"""The GPU result drivers bench/experiments/fair_runs.py and bench/ddp_scaling.py, end to end on CPU (--smoke, --dry-run).

They are written to run on a GPU machine in one call each; these tests run the same code paths
on tiny CPU shapes (a 300-protein cache, L = 64, a few steps) so a broken driver is found before
device time is spent. Checks that do not trust the drivers' own arithmetic:

* fair_runs: each run's saved LightningCLI config.yaml equals the plain run's except for the
  mechanism fields (equal budget by construction), parameter counts differ from the plain model
  by exactly what each mechanism adds, and the per-head spans read from the checkpoint's raw
  state dict equal the spans of the model loaded through the package;
* ddp_scaling: concatenated windows have no padding, so the global token count must be
  timed_steps x world_size x batch x L — it would be half that under DDP if only rank 0's tokens
  were counted; efficiencies are recomputed from the timers; DDP and FSDP checkpoints, trained on
  the same batches, must evaluate to the same loss; the capacity search's sizes are real models'.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
L, BATCH, HEADS, HEAD_DIM = 64, 2, 4, 64  # the drivers' smoke shapes (swissprot_runs.fit_command)


def _records(path: Path) -> list[tuple[str, str]]:
    text = gzip.open(path, "rt").read()
    out = []
    for chunk in text.split(">")[1:]:
        header, *lines = chunk.splitlines()
        out.append((header, "".join(lines)))
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, sample_fasta) -> tuple[Path, Path]:
    """A prepared 300-protein cache (every protein >= 100 residues) and a 12-protein OOD FASTA."""
    root = tmp_path_factory.mktemp("bench_drivers")
    long = [(h, s) for h, s in _records(sample_fasta) if len(s) >= 100]
    train, ood = long[:300], long[-12:]
    (root / "train.fasta").write_text("".join(f">{h}\n{s}\n" for h, s in train))
    (root / "ood.fasta").write_text("".join(f">{h}\n{s}\n" for h, s in ood))
    proc = subprocess.run([sys.executable, "-m", "protein_lm", "prepare", str(root / "train.fasta"),
                           "--out", str(root / "cache")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root / "cache", root / "ood.fasta"


def _run_driver(module: str, cache: Path, ood: Path, out: Path, steps: int) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", module, "--smoke", "--steps", str(steps), "--cache",
                           str(cache), "--ood", str(ood), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text()[-1500:] for p in sorted((out / "logs").glob("*.log"))) if (out / "logs").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:] + logs
    return json.loads((out / "summary.json").read_text())


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


MECHANISM = re.compile(r"^model\.config\.(span|memory|pkm)\.\w+$")
PATHS = {"output_dir", "trainer.default_root_dir", "checkpoint.dirpath"}


@pytest.mark.slow
def test_fair_runs_smoke_equal_settings_and_finite_results(tiny_data, tmp_path):
    import torch

    from protein_lm.attention.modules.span import adaptive_span_modules
    from protein_lm.checkpoint import load_model

    cache, ood = tiny_data
    out = tmp_path / "fair"
    summary = _run_driver("bench.experiments.fair_runs", cache, ood, out, steps=4)
    runs = summary["runs"]
    assert set(runs) == {"performer", "performer_span", "performer_memory", "performer_pkm", "exact_span"}
    for name, e in runs.items():
        assert e["steps"] == 4, name
        for part in ("test", "ood"):
            assert _finite(e[part]["accuracy"]) and 0 <= e[part]["accuracy"] <= 1, (name, part)
            assert _finite(e[part]["perplexity"]) and e[part]["perplexity"] > 1, (name, part)
        assert _finite(e["tokens_per_sec"]) and e["tokens_per_sec"] > 0, name
        assert e["peak_gb"] is None  # CUDA only; CPU smoke
        assert isinstance(e["params"], int) and e["params"] > 0, name
        assert e["config_diff"]["other"] == {}, name

    # Saved configs: identical to the plain run's outside the mechanism fields.
    def config(name: str) -> dict[str, object]:
        (path,) = (out / name).glob("csv/version_*/config.yaml")
        return {k: v for k, v in _flat(yaml.safe_load(path.read_text())).items() if k not in PATHS}

    plain = config("performer")
    assert plain["model.config.dim"] == 256 and plain["data.max_length"] == L
    assert plain["model.lr"] == 1e-3 and plain["trainer.max_steps"] == 4 and plain["data.batch_size"] == BATCH
    assert plain["model.config.span.enabled"] is False and plain["model.config.pkm.layers"] == []
    for name in runs:
        cfg = config(name)
        allowed = {k for k in cfg if MECHANISM.match(k)} | ({"model.config.attention"} if name == "exact_span" else set())
        assert set(cfg) == set(plain), name
        differ = {k for k in cfg if cfg[k] != plain[k]}
        assert differ <= allowed, (name, {k: (plain[k], cfg[k]) for k in differ - allowed})
    assert config("performer_span")["model.config.span.enabled"] is True
    assert config("exact_span")["model.config.attention"] == "exact"
    assert config("performer_memory")["model.config.memory.slots"] == 16
    assert config("performer_pkm")["model.config.pkm.layers"] == [-1]

    # Parameter counts: what each mechanism adds (depth 1 in smoke mode).
    base = runs["performer"]["params"]
    assert runs["performer_span"]["params"] - base == HEADS  # one span per head
    assert runs["performer_memory"]["params"] - base == 2 * HEADS * 16 * HEAD_DIM  # 16 keys + 16 values per head
    assert runs["performer_pkm"]["params"] != base and runs["performer_pkm"]["pkm_value_params"] == 32 * 32 * 256

    # Mechanism statistics logged at validation, and per-head spans from the checkpoint.
    for name in ("performer_span", "exact_span"):
        e = runs[name]
        assert 0 <= e["mechanism_stats"]["span/mean"] <= e["mechanism_stats"]["span/max"] <= L
        model, _ = load_model(e["checkpoint"])
        expected = [mod.current_spans().tolist() for _, mod in adaptive_span_modules(model)]
        assert torch.allclose(torch.tensor(e["spans_per_head"]), torch.tensor(expected), atol=0.01), name
    pkm = runs["performer_pkm"]["mechanism_stats"]
    assert 0 < pkm["pkm/0/used"] <= 1 and pkm["pkm/0/top50"] <= pkm["pkm/0/top90"] <= pkm["pkm/0/top99"]
    assert not runs["performer"]["mechanism_stats"]


@pytest.mark.slow
def test_ddp_scaling_dry_run_counts_every_rank_and_fsdp_trains_like_ddp(tiny_data, tmp_path):
    """Scaling on concatenated windows (L 128 in the dry run: every row is 128 real tokens), the
    capacity search on single proteins (L 64), the kept checkpoints evaluated."""
    from protein_lm.model import ModelConfig, ProteinLM

    cache, _ = tiny_data
    out = tmp_path / "scaling"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "bench.ddp_scaling", "--dry-run", "--cache", str(cache), "--out", str(out),
                           "--settings", "l8192", "--steps", "5", "--warmup-steps", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["strategy"], r["gpus"]): r for r in summary["scaling"]}
    assert set(rows) == {("single", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)}
    timers = {}
    for (strategy, gpus), row in rows.items():
        assert row["status"] == "ok", row
        t = timers[strategy, gpus] = summary["runs"][f"scaling-tiny-l8192-{strategy}-{gpus}gpu"]["timer"]
        assert t["world_size"] == gpus and t["timed_steps"] == 5 - 2
        assert t["global_tokens"] == t["global_padded_tokens"] == t["timed_steps"] * gpus * 2 * 128  # all ranks
        assert row["tokens_per_sec"] == pytest.approx(t["global_tokens"] / t["seconds"])
    rate = {k: t["global_tokens"] / t["seconds"] for k, t in timers.items()}
    assert rows["ddp", 2]["efficiency"] == pytest.approx(rate["ddp", 2] / (2 * rate["single", 1]))
    assert rows["fsdp", 2]["efficiency"] == pytest.approx(rate["fsdp", 2] / (2 * rate["fsdp", 1]))
    assert rows["fsdp", 2]["efficiency_vs_single"] == pytest.approx(rate["fsdp", 2] / (2 * rate["single", 1]))
    # One checkpoint per strategy (at the most GPUs) loaded and scored by `protein-lm evaluate`;
    # DDP and FSDP trained the same model on the same batches, so they score the same.
    kept = {k: r["checkpoint"] for k, r in rows.items() if r["checkpoint"]}
    assert set(kept) == {("single", 1), ("ddp", 2), ("fsdp", 2)}
    assert all(c["evaluate_returncode"] == 0 and c["is_file"] and c["num_tokens"] > 0 for c in kept.values())
    assert kept["fsdp", 2]["loss"] == pytest.approx(kept["ddp", 2]["loss"], rel=1e-5)
    # Capacity (a one-rung ladder in the dry run; the search is tested below): its size is a real model's.
    for strategy in ("ddp", "fsdp"):
        c = summary["capacity"][strategy]
        assert c["gpus"] == 2 and c["largest"] == "tiny-2l" and c["tried"] == {"tiny-2l": "ok"}
        fields = summary["ladder"]["tiny-2l"]
        model = ProteinLM(ModelConfig(**{k: v for k, v in fields.items() if k != "params"}))
        assert c["largest_params"] == fields["params"] == sum(p.numel() for p in model.parameters())
    assert summary["machine"]["dry_run"] is True
    assert "capacity fsdp on 2 GPUs" in proc.stdout and "scaling" not in proc.stderr


def test_scaling_presets_have_the_sizes_the_benchmark_promises():
    from bench.ddp_scaling import LADDER, PRESETS, model_params

    assert 150e6 <= model_params(PRESETS["150m"]) < 170e6
    assert 400e6 <= model_params(PRESETS["400m"]) < 450e6
    sizes = [model_params(v) for v in LADDER.values()]
    assert sizes == sorted(sizes) and sizes[0] > 1e9 and sizes[-1] > 15e9


def test_capacity_bisection_finds_the_largest_rung_that_trains():
    from bench.ddp_scaling import largest_that_trains

    for count in range(1, 10):
        for fits in range(0, count + 1):  # rungs 0..fits-1 train
            tried = []

            def attempt(i, fits=fits, tried=tried):
                tried.append(i)
                return "ok" if i < fits else "oom"

            best, outcomes = largest_that_trains(count, attempt)
            assert best == (fits - 1 if fits else None), (count, fits)
            assert len(tried) <= math.ceil(math.log2(count + 1)) and len(set(tried)) == len(tried)
            assert outcomes == {i: ("ok" if i < fits else "oom") for i in tried}


def test_failed_runs_are_classified_out_of_memory_before_timeout():
    from bench.ddp_scaling import classify

    assert classify(0, "", {"timed_steps": 3}) == "ok"
    assert classify(0, "", {}) == "error"  # exited without timing a step
    assert classify("timeout", "[rank1]: torch.OutOfMemoryError: CUDA out of memory.", {}) == "oom"
    assert classify("timeout", "", {}) == "timeout"
    assert classify(1, "ValueError: bad", {}) == "error"
