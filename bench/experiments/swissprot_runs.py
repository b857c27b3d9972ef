"""GPU results on Swiss-Prot: equal-budget runs of Performer-softmax, Performer-ReLU and
exact attention, evaluated on the test split and the CATH out-of-distribution set.

All nine runs (3 settings x 3 attention types) train concurrently on one GPU: small models do
not fill an H100, so running them side by side gives each more steps in the same wall time. The
tokens/s they log are therefore shared-GPU numbers; clean single-run throughput comes from
``bench/model.py``. Every run uses the shipped config of its setting plus the overrides below,
with the same optimiser, batch tokens (32,768 per step) and step budget; ``--minutes`` is only a
safety net (a run stopped by it reports its real step count).

    python -m bench.experiments.swissprot_runs --phase train --cache CACHE --ood CATH.fasta.gz --out DIR
    python -m bench.experiments.swissprot_runs --phase eval  --cache CACHE --ood CATH.fasta.gz --out DIR

Settings: ``bid`` (masked LM) and ``uni`` (causal LM) on single proteins, L = 1024, batch 32;
``concat``: masked LM on proteins concatenated into 8192-token windows, batch 4.
The eval phase scores every run on the test split (``protein-lm test``) and the CATH OOD set
(``protein-lm evaluate``), exports the BID Performer-softmax model, runs ``analyze`` over 800 test
proteins and the exact -> Performer weight-transfer experiment, and writes ``DIR/summary.json``
(every number in docs/results.md comes from it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import check_triton_backend

ATTENTIONS = ("performer-softmax", "performer-relu", "exact")
# Model size shared by every run: small enough that a run is a few GPU-minutes (and the shipped
# weights file stays < 25 MB), large enough to learn real protein statistics.
MODEL = {"depth": 6, "dim": 256, "heads": 4, "ff_dim": 1024, "num_features": 256, "dropout": 0.0}


def fit_command(setting: str, attention: str, args: argparse.Namespace, out: Path, max_steps: int) -> list[str]:
    """The `protein-lm fit` command line of one run (shipped config + overrides)."""
    base = {"bid": "protein_bid", "uni": "protein_uni", "concat": "concat"}[setting]
    config = f"configs/{base}_{attention.replace('-', '_')}.yaml"
    cmd = [sys.executable, "-m", "protein_lm", "fit", "--config", config,
           "--output_dir", str(out), "--wandb", "false",
           "--data.data_dir", args.cache, "--data.num_workers", "2",
           "--trainer.max_steps", str(max_steps), "--model.max_steps", str(max_steps),
           "--trainer.max_time", f"00:00:{args.minutes:02d}:00",
           "--trainer.val_check_interval", str(max(50, max_steps // 8)),
           "--trainer.limit_val_batches", "20", "--trainer.log_every_n_steps", "25",
           "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks+=protein_lm.monitoring.ThroughputMonitor",
           "--trainer.callbacks.log_every_n_steps", "50",
           "--model.warmup_steps", str(max(50, max_steps // 20)), "--model.lr", "1e-3",
           "--checkpoint.every_n_train_steps", str(max(50, max_steps // 8))]
    for key, value in MODEL.items():
        cmd += [f"--model.config.{key}", str(value)]
    if args.smoke:  # pipeline check on a CPU: tiny shapes, same commands
        cmd += ["--model.config.depth", "1", "--data.max_length", "64", "--data.batch_size", "2",
                "--trainer.accelerator", "cpu", "--data.num_workers", "0", "--data.max_eval_sequences", "16"]
    elif setting == "concat":
        cmd += ["--data.max_length", "8192", "--data.batch_size", "4"]
    else:
        cmd += ["--data.max_length", "1024", "--data.batch_size", "32"]
    return cmd


def last_metrics(run_dir: Path) -> dict[str, float]:
    """Last logged value of every metric in a run's CSV log(s)."""
    import csv

    values: dict[str, float] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value not in ("", None) and key not in ("epoch",):
                        values[key] = float(value)
    return values


def run_parallel(commands: dict[str, list[str]], logs: Path, timeout: float | None = None) -> dict[str, dict]:
    """Start every command at once; wait (killing what outlives ``timeout`` s); exit code + wall time."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, t0 = {}, time.time()
    for name, cmd in commands.items():
        log = open(logs / f"{name}.log", "w")
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    results = {}
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=None if timeout is None else max(1.0, t0 + timeout - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = f"killed after {timeout} s"
            proc.wait()
        log.close()
        results[name] = {"returncode": rc, "wall_s": round(time.time() - t0, 1)}
        print(f"[runs] {name}: exit {rc} after {results[name]['wall_s']} s", flush=True)
    return results


def cli(*argv: str, log: Path | None = None) -> int:
    """Run one `protein-lm` command, output appended to ``log``."""
    cmd = [sys.executable, "-m", "protein_lm", *argv]
    with open(log, "a") if log else open(os.devnull, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def best_checkpoint(run_dir: Path) -> Path:
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    return best[-1] if best else run_dir / "checkpoints" / "last.ckpt"


def write_test_fasta(cache: str, out: Path, max_sequences: int) -> Path:
    """The test split of the data module (content-hash split) as FASTA, for evaluate/analyze."""
    from protein_lm.data.datamodule import ProteinDataModule
    from protein_lm.data.tokenizer import TOKENS

    dm = ProteinDataModule(cache, mode="single", max_length=1024)
    dm.setup("test")
    tc, idx = dm.split_indices("test")
    idx = idx[:max_sequences]
    path = out / "test_split.fasta"
    with open(path, "w") as f:
        for i in idx:
            f.write(f">{tc.record_id(int(i))}\n{''.join(TOKENS[t] for t in tc.sequence(int(i)))}\n")
    return path


def train_phase(args: argparse.Namespace, out: Path, runs: dict[str, tuple[str, str]]) -> None:
    backends = check_triton_backend() if not args.smoke else {}
    commands = {}
    for name, (setting, attention) in runs.items():
        cmd = fit_command(setting, attention, args, out / name, args.steps)
        if attention != "exact" and backends:
            key = f"{attention.split('-')[1]}-{'causal' if setting == 'uni' else 'bid'}"
            cmd += ["--model.config.favor_backend", backends[key]]
        commands[name] = cmd
    t0 = time.time()
    status = run_parallel(commands, out / "logs", timeout=args.minutes * 60 + 90)
    (out / "train_status.json").write_text(json.dumps(
        {"runs": status, "wall_s": round(time.time() - t0, 1), "backends": backends}, indent=2))


def eval_phase(args: argparse.Namespace, out: Path, runs: dict[str, tuple[str, str]]) -> dict:
    import torch

    status = json.loads((out / "train_status.json").read_text())
    summary: dict = {"model": MODEL, "steps": args.steps, "gpu": torch.cuda.get_device_name(0)
                     if torch.cuda.is_available() else "cpu", "train": status, "runs": {}}
    test_fasta = write_test_fasta(args.cache, out, 40 if args.smoke else 1000)
    # Test split through Lightning's test loop (the run's own data setting: single or concat
    # windows); the OOD FASTA through `evaluate` (single proteins). All runs at once.
    jobs = {}
    for name, (setting, attention) in runs.items():
        ckpt = best_checkpoint(out / name)
        test_cmd = fit_command(setting, attention, args, out / name / "test", args.steps)
        test_cmd[test_cmd.index("fit")] = "test"
        drop = {"--trainer.max_steps", "--trainer.max_time", "--trainer.val_check_interval",
                "--checkpoint.every_n_train_steps", "--trainer.callbacks.log_every_n_steps"}
        cleaned, i = [], 0
        while i < len(test_cmd):
            if test_cmd[i] in drop:
                i += 2
                continue
            if test_cmd[i].startswith("--trainer.callbacks+="):
                i += 1
                continue
            cleaned.append(test_cmd[i])
            i += 1
        jobs[f"{name}.test"] = cleaned + ["--ckpt_path", str(ckpt), "--trainer.limit_test_batches", "200"]
        max_len = "64" if args.smoke else "1024"
        jobs[f"{name}.ood"] = [sys.executable, "-m", "protein_lm", "evaluate", "--checkpoint", str(ckpt),
                               "--fasta", args.ood, "--json", str(out / name / "eval_ood.json"),
                               "--batch-size", "32", "--max-length", max_len, "--quiet",
                               *(["--max-sequences", "32"] if args.smoke else [])]
    if "bid_exact" in runs:  # backward compatibility: exact weights -> Performer, scored at once
        converted = out / "exact-to-performer-softmax.pt"
        cli("convert", "--checkpoint", str(best_checkpoint(out / "bid_exact")), "--attention",
            "performer-softmax", "--out", str(converted), log=out / "logs" / "transfer.log")
        jobs["transfer.step0"] = [sys.executable, "-m", "protein_lm", "evaluate", "--checkpoint", str(converted),
                                  "--fasta", str(test_fasta), "--json", str(out / "transfer_step0_test.json"),
                                  "--batch-size", "32", "--quiet"]
        targs = argparse.Namespace(**{**vars(args), "minutes": args.transfer_minutes})
        ft = fit_command("bid", "performer-softmax", targs, out / "transfer", args.transfer_steps)
        ft += ["--model.init_weights", str(converted), "--model.warmup_steps", "20", "--model.lr", "3e-4",
               "--trainer.val_check_interval", "25", "--checkpoint.every_n_train_steps", "100"]
        jobs["transfer.finetune"] = ft
    if "bid_performer-softmax" in runs:
        exported = out / "performer-softmax-bid-swissprot2014.pt"
        cli("export", "--checkpoint", str(best_checkpoint(out / "bid_performer-softmax")), "--out",
            str(exported), log=out / "logs" / "export.log")
        jobs["analyze"] = [sys.executable, "-m", "protein_lm", "analyze", "--checkpoint", str(exported),
                           "--fasta", str(test_fasta), "--max-sequences", "8" if args.smoke else "800",
                           "--out", str(out / "analysis")]
        summary["exported"] = str(exported)
    summary["eval_jobs"] = run_parallel(jobs, out / "logs", timeout=args.eval_timeout)
    for name, (setting, attention) in runs.items():
        metrics = last_metrics(out / name)
        test = last_metrics(out / name / "test")
        ood_file = out / name / "eval_ood.json"
        summary["runs"][name] = {
            "setting": setting, "attention": attention, "checkpoint": str(best_checkpoint(out / name)),
            "train": {k: v for k, v in metrics.items() if k.startswith(("perf/", "val/", "train/", "step"))},
            "test": {k.split("/")[1]: v for k, v in test.items() if k.startswith("test/")},
            "ood": json.loads(ood_file.read_text()) if ood_file.exists() else {},
        }
    if "bid_exact" in runs:
        js0, js1 = out / "transfer_step0_test.json", out / "transfer_final_test.json"
        if (out / "transfer" / "checkpoints" / "last.ckpt").exists():
            cli("evaluate", "--checkpoint", str(out / "transfer" / "checkpoints" / "last.ckpt"), "--fasta",
                str(test_fasta), "--json", str(js1), "--batch-size", "32", "--quiet", log=out / "logs" / "transfer.log")
        summary["transfer"] = {
            "step0_test": json.loads(js0.read_text()) if js0.exists() else None,
            "final_test": json.loads(js1.read_text()) if js1.exists() else None,
            "curve": last_metrics_series(out / "transfer", ("val/accuracy", "val/perplexity")),
        }
    if (out / "analysis" / "summary.json").exists():
        summary["analysis"] = json.loads((out / "analysis" / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def last_metrics_series(run_dir: Path, keys: tuple[str, ...]) -> list[dict]:
    """(step, metric...) rows of a run's CSV log where any of ``keys`` was logged."""
    import csv

    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if any(row.get(k) for k in keys):
                    rows.append({"step": int(float(row["step"])), **{k: float(row[k]) for k in keys if row.get(k)}})
    return rows


def print_table(summary: dict) -> None:
    print(f"{'run':<26}{'steps':>7}{'test acc':>10}{'test ppl':>10}{'ood acc':>9}{'ood ppl':>9}{'tok/s':>10}{'GB':>6}")
    for name, e in summary["runs"].items():
        tr, te, od = e["train"], e["test"], e["ood"]
        print(f"{name:<26}{int(tr.get('step', -1)):>7}{te.get('accuracy', float('nan')):>10.4f}"
              f"{te.get('perplexity', float('nan')):>10.3f}{od.get('accuracy', float('nan')):>9.4f}"
              f"{od.get('perplexity', float('nan')):>9.3f}{tr.get('perf/tokens_per_sec', 0):>10.0f}"
              f"{tr.get('perf/peak_memory_gb', 0):>6.1f}")
    if summary.get("transfer"):
        t = summary["transfer"]
        print("transfer exact->performer: step0", (t["step0_test"] or {}).get("accuracy"),
              "final", (t["final_test"] or {}).get("accuracy"))
    if summary.get("analysis"):
        a = summary["analysis"]
        print("analysis:", {k: a.get(k) for k in ("blosum62_pearson", "blosum62_spearman", "rank_DE", "rank_FY")})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("train", "eval", "all"), default="all")
    p.add_argument("--settings", nargs="+", default=["bid", "uni", "concat"], choices=("bid", "uni", "concat"))
    p.add_argument("--cache", required=True, help="prepared token cache of the corpus")
    p.add_argument("--ood", required=True, help="CATH S40 out-of-distribution FASTA")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps of every run (equal budget)")
    p.add_argument("--minutes", type=int, default=7, help="safety limit per run (trainer.max_time)")
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--transfer-minutes", type=int, default=3, help="safety limit of the fine-tuning run")
    p.add_argument("--eval-timeout", type=float, default=None, help="kill evaluation jobs after this many s")
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes: checks the pipeline, not the science")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {f"{s}_{a}": (s, a) for s in args.settings for a in ATTENTIONS}
    if args.phase in ("train", "all"):
        train_phase(args, out, runs)
    if args.phase in ("eval", "all"):
        print_table(eval_phase(args, out, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
