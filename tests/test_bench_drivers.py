"""The GPU result drivers bench/fair_runs.py and bench/ddp_scaling.py, end to end in --smoke mode.

They are written to run on a GPU machine in one call each; these tests run the same code paths
on tiny CPU shapes (a 300-protein cache, L = 64, a few steps) so a broken driver is found before
device time is spent. Checks that do not trust the drivers' own arithmetic:

* fair_runs: each run's saved LightningCLI config.yaml equals the plain run's except for the
  mechanism fields (equal budget by construction), parameter counts differ from the plain model
  by exactly what each mechanism adds, and the per-head spans read from the checkpoint's raw
  state dict equal the spans of the model loaded through the package;
* ddp_scaling: proteins are >= 100 residues, so every row is cropped to exactly 64 tokens with
  no padding, and the global token count must be timed_steps x world_size x batch x 64 — it
  would be half that under DDP if only rank 0's tokens were counted.
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

REPO = Path(__file__).resolve().parents[1]
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


def _run_driver(script: str, cache: Path, ood: Path, out: Path, steps: int) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, f"bench/{script}", "--smoke", "--steps", str(steps), "--cache",
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


MECHANISM = re.compile(r"^model\.config\.(adaptive_span|span_\w+|persistent_memory|replace_ffn|pkm_\w+)$")
PATHS = {"output_dir", "trainer.default_root_dir", "checkpoint.dirpath"}


@pytest.mark.slow
def test_fair_runs_smoke_equal_settings_and_finite_results(tiny_data, tmp_path):
    import torch

    from protein_lm.attention.adaptive_span import adaptive_span_modules
    from protein_lm.checkpoint import load_model

    cache, ood = tiny_data
    out = tmp_path / "fair"
    summary = _run_driver("fair_runs.py", cache, ood, out, steps=4)
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
    assert plain["model.config.adaptive_span"] is False and plain["model.config.pkm_layers"] == []
    for name in runs:
        cfg = config(name)
        allowed = {k for k in cfg if MECHANISM.match(k)} | ({"model.config.attention"} if name == "exact_span" else set())
        assert set(cfg) == set(plain), name
        differ = {k for k in cfg if cfg[k] != plain[k]}
        assert differ <= allowed, (name, {k: (plain[k], cfg[k]) for k in differ - allowed})
    assert config("performer_span")["model.config.adaptive_span"] is True
    assert config("exact_span")["model.config.attention"] == "exact"
    assert config("performer_memory")["model.config.persistent_memory"] == 16
    assert config("performer_pkm")["model.config.pkm_layers"] == [-1]

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
def test_ddp_scaling_smoke_counts_every_rank_and_checkpoint_evaluates(tiny_data, tmp_path):
    cache, ood = tiny_data
    steps = 6
    summary = _run_driver("ddp_scaling.py", cache, ood, tmp_path / "ddp", steps=steps)
    runs = summary["runs"]
    assert set(runs) == {"devices1", "devices2"}
    warmup = summary["warmup_steps"]
    for name, world in (("devices1", 1), ("devices2", 2)):
        e, t = runs[name], runs[name]["timer"]
        assert t["world_size"] == world and t["timed_steps"] == steps - warmup, name
        expected = t["timed_steps"] * world * BATCH * L  # no padding: every protein is cropped to L
        assert t["global_padded_tokens"] == expected and t["global_tokens"] == expected, (name, t)
        assert _finite(t["tokens_per_sec"]) and t["tokens_per_sec"] > 0
        assert t["tokens_per_sec"] == pytest.approx(t["global_tokens"] / t["seconds"])
        assert _finite(e["monitor_tokens_per_sec"]) and e["monitor_tokens_per_sec"] > 0
        assert _finite(e["val"]["loss"]) and _finite(e["val"]["accuracy"])
        assert e["checkpoint_loads"] and e["checkpoint_step"] == steps, e.get("checkpoint_error")
        assert _finite(e["ood"]["accuracy"]) and _finite(e["ood"]["perplexity"])
    assert runs["devices1"]["params"] == runs["devices2"]["params"]
    assert summary["scaling_efficiency"] == pytest.approx(
        runs["devices2"]["timer"]["tokens_per_sec"] / (2 * runs["devices1"]["timer"]["tokens_per_sec"]))
