"""FAIR mechanisms vs the plain Performer on Swiss-Prot at an equal budget.

BID masked LM on single proteins, L = 1024, the model of ``bench/experiments/swissprot_runs.py`` (6 layers,
d 256, 4 heads, d_ff 1024, m = 256), the same optimiser, batch (32 proteins) and number of steps
for every run. The runs train **at the same time on one GPU** (small models do not fill an
H100), so their tokens/s are shared-GPU numbers, not a speed comparison; peak memory is per
process and clean. Then each run is scored on the test split (``protein-lm test``) and on the
CATH out-of-distribution set (``protein-lm evaluate``).

    python -m bench.experiments.fair_runs --cache .gpu/sp45m --ood .gpu/cath_s40_lt50id.fasta.gz --out DIR
    python -m bench.experiments.fair_runs --cache CACHE --ood OOD.fasta --out DIR --smoke   # CPU pipeline check

Runs (``--runs``): ``performer`` (plain, configs/protein_bid_performer_softmax.yaml) and the
mechanisms from their shipped configs: ``performer_span`` (performer_adaptive_span.yaml),
``performer_memory`` (performer_persistent_memory.yaml), ``performer_pkm`` (performer_pkm.yaml),
``exact_span`` (exact_adaptive_span.yaml); ``exact`` (plain exact attention) is optional.

How the settings are kept equal: every command is the plain run's command (``fit_command`` of
swissprot_runs) with the FAIR config loaded *before* the plain config (``--config FAIR --config
PLAIN``): the plain config then overrides every key both set (size, lr, schedule, data, trainer),
and only the keys the plain config does not have — the mechanism's ``model.config`` fields —
come from the FAIR config. The FAIR configs are tiny CPU configs (L = 128), so ``span.max`` is
set to this run's L and a few mechanism sizes are scaled to this setting (:data:`GPU_SCALE`, not
applied under ``--smoke``); the exact runs add ``--model.config.attention exact``. Each run's saved ``config.yaml`` is compared
with the plain run's and any difference outside the mechanism fields is reported in
``summary.json`` (``config_diff``) and printed.

Writes ``DIR/summary.json``: per run the test and OOD accuracy / perplexity, tokens/s (median of
the ThroughputMonitor windows), peak GB, parameter count, the mechanism statistics logged at the
last validation (``val/span/*``, ``val/pkm/*``) and, for span runs, the per-head spans read from
the checkpoint's ``span_fraction`` parameters.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from bench.experiments.swissprot_runs import (
    MODEL,
    best_checkpoint,
    fit_command,
    last_metrics,
    last_metrics_series,
    run_parallel,
)
from bench.machine import check_triton_backend
from bench.tables import fmt_number

PLAIN_CONFIG = "configs/protein_bid_performer_softmax.yaml"
# run name -> (FAIR config inserted before the plain one, or None; attention kind)
RUNS: dict[str, tuple[str | None, str]] = {
    "performer": (None, "performer-softmax"),
    "performer_span": ("configs/performer_adaptive_span.yaml", "performer-softmax"),
    "performer_memory": ("configs/performer_persistent_memory.yaml", "performer-softmax"),
    "performer_pkm": ("configs/performer_pkm.yaml", "performer-softmax"),
    "exact_span": ("configs/exact_adaptive_span.yaml", "exact"),
    "exact": (None, "exact"),
}
DEFAULT_RUNS = ("performer", "performer_span", "performer_memory", "performer_pkm", "exact_span")
# Mechanism sizes of the CPU configs scaled to L = 1024, d = 256 (span.max: the configs' 128 is
# their L; R = 32 is the paper's ramp; PKM: ModelConfig's defaults, 128^2 = 16,384 slots, top-32,
# d_q 128 instead of the configs' 1,024 slots, which would hold fewer values than the FFN they
# replace). Everything else about a mechanism is the shipped config's.
GPU_SCALE: dict[str, dict[str, object]] = {
    "performer_span": {"span.ramp": 32},
    "exact_span": {"span.ramp": 32},
    "performer_pkm": {"pkm.num_keys": 128, "pkm.topk": 32, "pkm.key_dim": 128},
}
MECHANISM_FIELDS = re.compile(r"^model\.config\.(span|memory|pkm)\.\w+$")
PATH_KEYS = {"output_dir", "trainer.default_root_dir", "checkpoint.dirpath"}


def run_command(name: str, args: argparse.Namespace, out: Path, backend: str | None) -> list[str]:
    """`protein-lm fit` command of one run: the plain run's command plus the mechanism."""
    fair_config, attention = RUNS[name]
    cmd = fit_command("bid", "performer-softmax", args, out, args.steps)
    if fair_config:
        i = cmd.index("--config")
        cmd[i:i] = ["--config", fair_config]
    if fair_config and "span" in name:  # the configs' span.max (128) is their L
        cmd += ["--model.config.span.max", "64" if args.smoke else "1024"]  # = fit_command's L
    if not args.smoke:
        for key, value in GPU_SCALE.get(name, {}).items():
            cmd += [f"--model.config.{key}", str(value)]
    cmd += ["--model.config.attention", attention, "--trainer.enable_model_summary", "false"]
    if backend:
        cmd += ["--model.config.favor_backend", backend]  # same for every run (exact ignores it)
    if args.smoke:  # a few steps, every interval inside them
        every = str(max(1, args.steps // 2))
        cmd += ["--trainer.val_check_interval", every, "--checkpoint.every_n_train_steps", every,
                "--model.warmup_steps", "1", "--trainer.log_every_n_steps", "1",
                "--trainer.callbacks.log_every_n_steps", "1", "--trainer.callbacks.warmup_steps", "1",
                "--trainer.limit_val_batches", "2"]
    return cmd


def test_command(fit_cmd: list[str], out: Path, ckpt: Path, limit_batches: int) -> list[str]:
    """The same command as `protein-lm test` on ``ckpt``: training-only options dropped."""
    drop = {"--trainer.max_steps", "--trainer.max_time", "--trainer.val_check_interval",
            "--checkpoint.every_n_train_steps", "--output_dir"}
    cmd, i = [], 0
    while i < len(fit_cmd):
        arg = fit_cmd[i]
        if arg in drop or arg.startswith("--trainer.callbacks."):
            i += 2
        elif arg.startswith("--trainer.callbacks+="):
            i += 1
        else:
            cmd.append("test" if arg == "fit" else arg)
            i += 1
    return cmd + ["--output_dir", str(out), "--ckpt_path", str(ckpt),
                  "--trainer.limit_test_batches", str(limit_batches)]


def flat_config(path: Path) -> dict[str, object]:
    """A saved LightningCLI config.yaml as ``{"a.b.c": value}``."""
    import yaml

    def walk(node: object, prefix: str) -> dict[str, object]:
        if isinstance(node, dict):
            out: dict[str, object] = {}
            for key, value in node.items():
                out.update(walk(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    return walk(yaml.safe_load(path.read_text()), "")


def saved_config(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("csv/version_*/config.yaml"))
    return found[0] if found else None


def config_diff(plain: dict[str, object], other: dict[str, object]) -> dict[str, dict[str, list]]:
    """Keys whose values differ, split into mechanism fields and everything else (paths aside)."""
    diff: dict[str, dict[str, list]] = {"mechanism": {}, "other": {}}
    for key in sorted(set(plain) | set(other)):
        if key in PATH_KEYS or plain.get(key) == other.get(key):
            continue
        kind = "mechanism" if MECHANISM_FIELDS.match(key) or key == "model.config.attention" else "other"
        diff[kind][key] = [plain.get(key), other.get(key)]
    return diff


def checkpoint_facts(ckpt: Path) -> dict[str, object]:
    """Parameter counts and per-head spans, read from the checkpoint (no analysis helpers needed).

    Spans: every ``...span_fraction`` parameter (one per layer, shape (H,)) times the run's
    ``span.max``, clamped to [0, 1] as the model does; layers ordered by their block index.
    """
    from protein_lm.checkpoint import read_checkpoint
    from protein_lm.layers.pkm import pkm_value_parameters
    from protein_lm.model import ModelConfig, ProteinLM

    info = read_checkpoint(ckpt)
    config = info["config"]
    model = ProteinLM(ModelConfig.from_dict(config))
    facts: dict[str, object] = {
        "params": sum(p.numel() for p in model.parameters()),
        "pkm_value_params": sum(p.numel() for p in pkm_value_parameters(model)),
        "global_step": info["global_step"],
    }
    fractions = [(k, v) for k, v in info["state_dict"].items() if k.endswith("span_fraction")]
    if fractions:
        def layer(key: str) -> int:
            m = re.search(r"\.(\d+)\.", key)
            return int(m.group(1)) if m else -1

        fractions.sort(key=lambda kv: layer(kv[0]))
        facts["spans_per_head"] = [
            [round(x, 2) for x in (float(config["span"]["max"]) * v.float().clamp(0, 1)).tolist()]
            for _, v in fractions]
        facts["span_parameter_names"] = [k for k, _ in fractions]
    return facts


def median_window(run_dir: Path, key: str) -> float | None:
    values = [r[key] for r in last_metrics_series(run_dir, (key,)) if key in r]
    return statistics.median(values) if values else None


def _trained_steps(run_dir: Path) -> int | None:
    """Optimiser steps the run made (its last checkpoint's global step; a run stopped by
    ``--minutes`` made fewer than ``--steps``)."""
    from protein_lm.checkpoint import read_checkpoint

    last = run_dir / "checkpoints" / "last.ckpt"
    return int(read_checkpoint(last)["global_step"]) if last.exists() else None


def collect(name: str, out: Path, plain_cfg: dict | None) -> dict:
    run_dir = out / name
    metrics = last_metrics(run_dir)
    test = last_metrics(run_dir / "test")
    ood_file = run_dir / "eval_ood.json"
    ckpt = best_checkpoint(run_dir)
    peaks = [r["perf/peak_memory_gb"] for r in last_metrics_series(run_dir, ("perf/peak_memory_gb",))]
    entry: dict = {
        "fair_config": RUNS[name][0], "attention": RUNS[name][1], "checkpoint": str(ckpt),
        "steps": _trained_steps(run_dir),
        "val": {k.split("/", 1)[1]: v for k, v in metrics.items()
                if k in ("val/loss", "val/accuracy", "val/perplexity")},
        "mechanism_stats": {k[4:]: v for k, v in metrics.items() if k.startswith(("val/span/", "val/pkm/"))},
        "tokens_per_sec": median_window(run_dir, "perf/tokens_per_sec"),
        "peak_gb": max(peaks) if peaks else None,
        "test": {k.split("/")[1]: v for k, v in test.items() if k.startswith("test/")},
        "ood": json.loads(ood_file.read_text()) if ood_file.exists() else {},
        "val_curve": last_metrics_series(run_dir, ("val/loss", "val/accuracy")),
    }
    if ckpt.exists():
        entry.update(checkpoint_facts(ckpt))
    cfg_path = saved_config(run_dir)
    if cfg_path is not None and plain_cfg is not None:
        entry["config_diff"] = config_diff(plain_cfg, flat_config(cfg_path))
    return entry


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="prepared token cache of the corpus")
    p.add_argument("--ood", required=True, help="CATH S40 out-of-distribution FASTA")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS))
    # Defaults sized for one <= 10-minute device call on an H100 (5 runs sharing it): the span
    # Performer runs on the PyTorch FAVOR+ path (6 causal passes per layer; ~8x the plain model's
    # step on a CPU), so it is the slowest run; a run stopped by --minutes is flagged in the table.
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps of every run (equal budget)")
    p.add_argument("--minutes", type=int, default=6, help="safety limit per run (trainer.max_time)")
    p.add_argument("--test-batches", type=int, default=200, help="limit_test_batches of `protein-lm test`")
    p.add_argument("--eval-timeout", type=float, default=120, help="kill evaluation jobs after this many s")
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes: checks the pipeline, not the science")
    args = p.parse_args()
    if "performer" not in args.runs:
        args.runs.insert(0, "performer")  # the reference every other run is compared with
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    backend = None
    if not args.smoke:
        backend = check_triton_backend()["softmax-bid"]
    commands = {name: run_command(name, args, out / name, backend) for name in args.runs}
    train = run_parallel(commands, out / "logs", timeout=args.minutes * 60 + 90)

    jobs = {}
    for name in args.runs:
        ckpt = best_checkpoint(out / name)
        jobs[f"{name}.test"] = test_command(commands[name], out / name / "test", ckpt,
                                            4 if args.smoke else args.test_batches)
        jobs[f"{name}.ood"] = [sys.executable, "-m", "protein_lm", "evaluate", "--checkpoint", str(ckpt),
                               "--fasta", args.ood, "--json", str(out / name / "eval_ood.json"),
                               "--batch-size", "32", "--max-length", "64" if args.smoke else "1024", "--quiet",
                               *(["--max-sequences", "32", "--device", "cpu"] if args.smoke else [])]
    evals = run_parallel(jobs, out / "logs", timeout=args.eval_timeout)

    import torch

    plain_path = saved_config(out / "performer")
    plain_cfg = flat_config(plain_path) if plain_path else None
    summary: dict = {
        "what": "FAIR mechanisms vs plain Performer-softmax, BID, equal steps, runs sharing one GPU",
        "model": MODEL, "steps": args.steps, "smoke": args.smoke, "favor_backend": backend,
        "gpu_scale": {} if args.smoke else GPU_SCALE,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu",
        "train_jobs": train, "eval_jobs": evals, "runs": {},
    }
    for name in args.runs:
        summary["runs"][name] = collect(name, out, plain_cfg)
    summary["wall_s"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return 0


def print_table(summary: dict) -> None:
    for name, e in summary["runs"].items():
        if e["steps"] != summary["steps"]:
            print(f"WARNING {name}: {e['steps']} steps, not {summary['steps']} (stopped by --minutes or failed):"
                  " not an equal budget")
        other = (e.get("config_diff") or {}).get("other")
        if other:
            print(f"WARNING {name}: non-mechanism settings differ from the plain run: {other}")
        if e.get("spans_per_head"):
            print(f"{name} spans per head (layer rows):", e["spans_per_head"])
        pkm = {k: round(v, 3) for k, v in e["mechanism_stats"].items() if k.startswith("pkm/")}
        if pkm:
            print(f"{name} PKM usage:", pkm)
    print(f"{'run':<18}{'steps':>6}{'test acc':>9}{'test ppl':>9}{'ood acc':>8}{'ood ppl':>8}"
          f"{'tok/s':>9}{'GB':>6}{'params':>10}{'span mean/max':>15}")
    for name, e in summary["runs"].items():
        te, od, ms = e["test"], e["ood"], e["mechanism_stats"]
        span = (f"{ms['span/mean']:.0f}/{ms['span/max']:.0f}" if "span/mean" in ms else "-")
        print(f"{name:<18}{fmt_number(e['steps'], 'd'):>6}{fmt_number(te.get('accuracy'), '.4f'):>9}"
              f"{fmt_number(te.get('perplexity'), '.3f'):>9}{fmt_number(od.get('accuracy'), '.4f'):>8}"
              f"{fmt_number(od.get('perplexity'), '.3f'):>8}{fmt_number(e['tokens_per_sec'], '.0f'):>9}"
              f"{fmt_number(e['peak_gb'], '.2f'):>6}{fmt_number(e.get('params'), 'd'):>10}{span:>15}")


if __name__ == "__main__":
    sys.exit(main())
