"""GPU results on Swiss-Prot (issue 6): equal-budget runs of Performer-softmax, Performer-ReLU and
exact attention, evaluated on the test split and the CATH out-of-distribution set.

One *group* per call, all runs of the group trained concurrently on one GPU (small models do not
fill an H100, so running them side by side gives each more steps in the same wall time; the
tokens/s they log are therefore shared-GPU numbers — clean single-run throughput comes from
``bench/model.py``). Every run uses the shipped config of its setting plus the overrides below,
the same optimiser, batch tokens and step budget; ``--minutes`` is only a safety net.

    python bench/swissprot_runs.py --group single --cache CACHE --ood CATH.fasta.gz --out DIR
    python bench/swissprot_runs.py --group concat --cache CACHE --ood CATH.fasta.gz --out DIR

Groups:
  single  BID (masked LM) and UNI (causal LM), one protein per example, L = 1024, batch 32, 3 x 2 runs;
          then: OOD + test evaluation, export of the BID Performer-softmax model, ``analyze`` over
          800 test proteins, and the exact -> Performer weight-transfer experiment.
  concat  BID on sequences concatenated into 8192-token windows, batch 4, 3 runs; OOD + test.

Writes ``DIR/summary.json`` (every number in docs/results.md comes from it), each run's CSV log,
checkpoints and evaluation JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

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


def run_parallel(commands: dict[str, list[str]], logs: Path) -> dict[str, dict]:
    """Start every command at once; wait; return exit code and wall time of each."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, t0 = {}, time.time()
    for name, cmd in commands.items():
        log = open(logs / f"{name}.log", "w")
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    results = {}
    for name, (proc, log) in procs.items():
        rc = proc.wait()
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
    from protein_lm.cache import TokenCache
    from protein_lm.datamodule import ProteinDataModule
    from protein_lm.tokenizer import TOKENS

    dm = ProteinDataModule(cache, mode="single", max_length=1024)
    dm.setup("test")
    idx = dm.split_indices("test")[:max_sequences]
    tc = TokenCache(cache)
    path = out / "test_split.fasta"
    with open(path, "w") as f:
        for i in idx:
            f.write(f">{tc.record_id(int(i))}\n{''.join(TOKENS[t] for t in tc.sequence(int(i)))}\n")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", choices=("single", "concat"), required=True)
    p.add_argument("--cache", required=True, help="prepared token cache of the corpus")
    p.add_argument("--ood", required=True, help="CATH S40 out-of-distribution FASTA")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps of every run (equal budget)")
    p.add_argument("--minutes", type=int, default=5, help="safety limit per run (max_time)")
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes: checks the pipeline, not the science")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ("bid", "uni") if args.group == "single" else ("concat",)
    runs = {f"{s}_{a}": (s, a) for s in settings for a in ATTENTIONS}
    summary: dict = {"group": args.group, "model": MODEL, "steps": args.steps, "runs": {}}
    import torch

    summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

    t0 = time.time()
    status = run_parallel({n: fit_command(s, a, args, out / n, args.steps) for n, (s, a) in runs.items()},
                          out / "logs")
    summary["train_wall_s"] = round(time.time() - t0, 1)

    test_fasta = write_test_fasta(args.cache, out, 40 if args.smoke else 2000)
    for name, (setting, attention) in runs.items():
        run_dir = out / name
        entry = {"setting": setting, "attention": attention, **status[name]}
        metrics = last_metrics(run_dir)
        entry["train"] = {k: v for k, v in metrics.items() if k.startswith(("perf/", "val/", "train/", "step"))}
        ckpt = best_checkpoint(run_dir)
        entry["checkpoint"] = str(ckpt)
        log = out / "logs" / f"{name}.eval.log"
        max_len = "64" if args.smoke else ("8192" if setting == "concat" else "1024")
        for split, fasta in (("test", str(test_fasta)), ("ood", args.ood)):
            js = run_dir / f"eval_{split}.json"
            rc = cli("evaluate", "--checkpoint", str(ckpt), "--fasta", fasta, "--json", str(js),
                     "--batch-size", "16", "--max-length", max_len, "--quiet", log=log)
            entry[split] = json.loads(js.read_text()) if rc == 0 and js.exists() else {"error": rc}
        summary["runs"][name] = entry
        print(f"[runs] {name}: test {entry['test'].get('accuracy')} / ood {entry['ood'].get('accuracy')}", flush=True)

    if args.group == "single":
        best = out / "bid_performer-softmax"
        exported = out / "performer-softmax-bid-swissprot2014.pt"
        cli("export", "--checkpoint", str(best_checkpoint(best)), "--out", str(exported), log=out / "logs" / "export.log")
        summary["exported"] = str(exported)
        cli("analyze", "--checkpoint", str(exported), "--fasta", str(test_fasta), "--max-sequences", "8" if args.smoke else "800",
            "--out", str(out / "analysis"), log=out / "logs" / "analyze.log")
        # Backward compatibility (Performer paper): exact BID weights -> Performer, evaluate, fine-tune.
        converted = out / "exact-to-performer-softmax.pt"
        cli("convert", "--checkpoint", str(best_checkpoint(out / "bid_exact")), "--attention", "performer-softmax",
            "--out", str(converted), log=out / "logs" / "transfer.log")
        js = out / "transfer_step0_test.json"
        cli("evaluate", "--checkpoint", str(converted), "--fasta", str(test_fasta), "--json", str(js),
            "--batch-size", "16", "--quiet", log=out / "logs" / "transfer.log")
        transfer = {"step0_test": json.loads(js.read_text()) if js.exists() else None}
        targs = argparse.Namespace(**{**vars(args), "minutes": 3})
        cmd = fit_command("bid", "performer-softmax", targs, out / "transfer", args.transfer_steps)
        cmd += ["--model.init_weights", str(converted), "--model.warmup_steps", "20", "--model.lr", "3e-4",
                "--trainer.val_check_interval", "25", "--checkpoint.every_n_train_steps", "100"]
        transfer["finetune"] = run_parallel({"transfer": cmd}, out / "logs")["transfer"]
        js = out / "transfer_final_test.json"
        cli("evaluate", "--checkpoint", str(out / "transfer" / "checkpoints" / "last.ckpt"), "--fasta",
            str(test_fasta), "--json", str(js), "--batch-size", "16", "--quiet", log=out / "logs" / "transfer.log")
        transfer["final_test"] = json.loads(js.read_text()) if js.exists() else None
        summary["transfer"] = transfer

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{'run':<28}{'steps':>7}{'test acc':>10}{'test ppl':>10}{'ood acc':>9}{'ood ppl':>9}{'tok/s':>10}{'GB':>6}")
    for name, e in summary["runs"].items():
        tr = e["train"]
        print(f"{name:<28}{int(tr.get('step', -1)):>7}{e['test'].get('accuracy', float('nan')):>10.4f}"
              f"{e['test'].get('perplexity', float('nan')):>10.3f}{e['ood'].get('accuracy', float('nan')):>9.4f}"
              f"{e['ood'].get('perplexity', float('nan')):>9.3f}{tr.get('perf/tokens_per_sec', 0):>10.0f}"
              f"{tr.get('perf/peak_memory_gb', 0):>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
