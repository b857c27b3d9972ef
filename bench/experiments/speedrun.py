"""Time to quality: train one `protein-lm fit` run for a wall-clock budget and record its eval curve.

One run of the project's own fit pipeline (the same LightningCLI, configs, model and data code as
``protein-lm fit``), in this process, stopped when ``--minutes`` of *training* time are spent.
Every ``--eval-every`` optimiser steps (and at step 0 and at the end) one row is recorded:

* ``step``, ``tokens`` (non-padding tokens of the training batches, ``<cls>``/``<eos>`` included),
  ``scored_tokens`` (positions with a loss: masked residues for MLM, all for causal);
* ``train_seconds`` (wall time of training with the evaluations taken out: the budget and the
  ``time_*`` learning-rate schedules run on this clock), ``wall_seconds`` (evaluations included),
  ``eval_seconds`` and the current ``lr``;
* ``test_*`` and ``ood_*`` loss / perplexity / accuracy on two fixed evaluation sets: the first
  ``--test-sequences`` of the data's test split (the content-hash sample of ``max_eval_sequences``)
  and the first ``--ood-sequences`` of ``--ood`` (file order). Both are built once, before training,
  like ``protein-lm evaluate`` builds them: one protein per example in consecutive windows of
  ``--eval-max-length`` tokens, MLM masks (15 %, 80/10/10) that are a pure function of
  ``--eval-seed`` and the position, so every run and every evaluation scores the same positions
  whatever the training config. The model is scored in eval mode under the training precision.

The JSON (``--json``) is rewritten atomically after every row, so a run killed mid-way keeps its
rows; it also holds the command line, the resolved config, GPU name, versions and a summary:
minutes of training to reach ``--target-ppl`` on the OOD set (linear interpolation between rows;
null if never reached), best and final (= at the budget) perplexities.

Unless overridden, the run uses ``--model.schedule time_cosine`` (warm-up over
``model.warmup_steps`` steps, then cosine decay to ``min_lr_ratio`` by the elapsed fraction of the
budget); ``--model.budget_minutes`` is always ``--minutes``. Lightning's own validation is off
(the rows replace it); ``last.ckpt`` is written to ``<output dir>/checkpoints`` at the end.

    python -m bench.experiments.speedrun --config configs/protein_bid_performer_softmax.yaml --minutes 25 \\
        --ood CATH.fasta.gz --json runs/speedrun/perf.json --data.data_dir CACHE --model.lr 1e-3
    python -m bench.experiments.speedrun --plot runs/speedrun/*.json --png runs/speedrun/curves.png

Options this script does not know (``--model.lr 1e-3``, ``--data.tokens_per_batch 65536``, ...)
are passed to the fit CLI as overrides, after the configs. Single device only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from protein_lm.errors import UserError
from protein_lm.lit_module import IGNORE_INDEX, token_statistics
from protein_lm.outputs import check_output_file, write_atomically

PROG = "python -m bench.experiments.speedrun"
EVAL_SETS = ("test", "ood")


# --------------------------------------------------------------------------- summary (pure)


def minutes_to_target(rows: list[dict[str, Any]], target: float, key: str = "ood_ppl") -> float | None:
    """Training minutes at which ``key`` first reaches ``target`` or below, or None.

    Linear interpolation in minutes between the last row above the target and the first at or
    below it (a first row already at the target gives that row's minutes).
    """
    previous = None
    for row in rows:
        value, minutes = row.get(key), row["train_seconds"] / 60.0
        if value is None or not math.isfinite(value):
            previous = None
            continue
        if value <= target:
            if previous is None:
                return minutes
            m0, v0 = previous
            return m0 + (v0 - target) * (minutes - m0) / (v0 - value)
        previous = (minutes, value)
    return None


def summarize(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The headline numbers of one run's rows (empty rows: only the target)."""
    summary: dict[str, Any] = {"target_ood_ppl": target}
    if not rows:
        return summary
    last = rows[-1]
    summary.update(
        steps=last["step"],
        tokens=last["tokens"],
        minutes=last["train_seconds"] / 60.0,
        minutes_to_target=minutes_to_target(rows, target),
    )
    for name in EVAL_SETS:
        values = [r[f"{name}_ppl"] for r in rows if math.isfinite(r[f"{name}_ppl"])]
        summary[f"best_{name}_ppl"] = min(values) if values else None
        summary[f"final_{name}_ppl"] = last[f"{name}_ppl"]
        summary[f"final_{name}_acc"] = last[f"{name}_acc"]
    summary["ood_ppl_at_budget"] = last["ood_ppl"]  # training stops when the budget is spent
    return summary


# --------------------------------------------------------------------------- recording callback


class SpeedrunRecorder(pl.Callback):
    """Evaluates on the fixed sets every ``eval_every`` steps, stops at the budget, writes the JSON.

    Args:
        eval_sets: name -> the fixed list of CPU batches (built once, before training).
        eval_every: optimiser steps between rows.
        budget_seconds: training seconds after which ``trainer.should_stop`` is set.
        write: called with the rows after every row (writes the JSON).
    """

    def __init__(self, eval_sets: dict[str, list[dict[str, torch.Tensor]]], eval_every: int,
                 budget_seconds: float, write) -> None:
        self.eval_sets, self.eval_every, self.budget_seconds, self.write = eval_sets, eval_every, budget_seconds, write
        self.rows: list[dict[str, Any]] = []
        self._tokens: torch.Tensor | None = None  # device-side counters: no sync per step
        self._scored: torch.Tensor | None = None
        self._wall_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if not pl_module.train_clock.started:
            pl_module.train_clock.start()
        self._wall_start = time.perf_counter()
        self._tokens = torch.zeros((), dtype=torch.int64, device=pl_module.device)
        self._scored = torch.zeros((), dtype=torch.int64, device=pl_module.device)
        self._record(trainer, pl_module)  # step 0: the untrained model

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        padding = batch.get("padding_mask")
        self._tokens += batch["input_ids"].numel() if padding is None else (~padding).sum()
        self._scored += batch["labels"].ne(IGNORE_INDEX).sum()
        step = trainer.global_step
        if step % self.eval_every == 0 and step != self.rows[-1]["step"]:
            self._record(trainer, pl_module)
        if pl_module.train_clock.elapsed() >= self.budget_seconds:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.rows or self.rows[-1]["step"] != trainer.global_step:
            self._record(trainer, pl_module)

    def _record(self, trainer, pl_module) -> None:
        clock = pl_module.train_clock
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the queued steps belong to the training time
        clock.pause()
        start = time.perf_counter()
        row: dict[str, Any] = {
            "step": int(trainer.global_step),
            "tokens": int(self._tokens),
            "scored_tokens": int(self._scored),
            "train_seconds": clock.elapsed(),
            "lr": _current_lr(trainer),
        }
        for name, batches in self.eval_sets.items():
            loss, acc, count = evaluate_batches(trainer, pl_module, batches)
            row.update({f"{name}_loss": loss, f"{name}_ppl": math.exp(loss) if math.isfinite(loss) else loss,
                        f"{name}_acc": acc, f"{name}_tokens": count})
        row["eval_seconds"] = time.perf_counter() - start
        row["wall_seconds"] = time.perf_counter() - self._wall_start
        self.rows.append(row)
        self.write(self.rows)
        clock.resume()


def evaluate_batches(trainer, pl_module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
    """Token-weighted ``(loss, accuracy, scored tokens)`` over fixed batches, in eval mode.

    Under the trainer's precision context (bf16 autocast for ``bf16-mixed``), with sums kept on
    the device and read once at the end. ``no_grad`` rather than ``inference_mode``: tensors a
    model caches during an inference-mode forward could not be used by the next training step.
    """
    was_training = pl_module.training
    pl_module.eval()
    device = pl_module.device
    total = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in batches:
                ids = batch["input_ids"].to(device, non_blocking=True)
                pad = batch["padding_mask"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                loss_sum, correct, count = token_statistics(pl_module(ids, pad).logits, labels)
                total += torch.stack([loss_sum.double(), correct.double(), count.double()])
    finally:
        pl_module.train(was_training)
    loss_sum, correct, count = total.tolist()
    if count == 0:
        return math.nan, math.nan, 0
    return loss_sum / count, correct / count, int(count)


def _current_lr(trainer) -> float | None:
    optimizers = trainer.optimizers
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None


# --------------------------------------------------------------------------- the run


def parse_run_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[], help="fit config YAML (repeatable, merged)")
    parser.add_argument("--minutes", type=float, default=None, help="training-time budget in minutes")
    parser.add_argument("--eval-every", type=int, default=200, help="optimiser steps between rows (default 200)")
    parser.add_argument("--ood", default=None, help="out-of-distribution FASTA(.gz) or token cache dir")
    parser.add_argument("--json", default=None, help="where the rows go (rewritten after every row)")
    parser.add_argument("--output-dir", default=None, help="fit output dir (default: next to --json, <stem>_run)")
    parser.add_argument("--test-sequences", type=int, default=2000, help="test-split sequences scored (default 2000)")
    parser.add_argument("--ood-sequences", type=int, default=2000, help="OOD sequences scored (default 2000)")
    parser.add_argument("--eval-max-length", type=int, default=None,
                        help="tokens per evaluation window (default: data.max_length)")
    parser.add_argument("--eval-batch-tokens", type=int, default=65536,
                        help="padded tokens per evaluation batch (default 65536)")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the evaluation masks (default 0)")
    parser.add_argument("--target-ppl", type=float, default=13.5, help="OOD perplexity target (default 13.5)")
    parser.add_argument("--plot", nargs="+", default=None, metavar="RUN.json",
                        help="plot mode: draw these runs' curves and print their table")
    parser.add_argument("--png", default=None, help="plot mode: the PNG to write")
    args, overrides = parser.parse_known_args(argv)
    if args.plot is not None:
        if not args.png:
            raise UserError("--plot needs --png")
        return args, overrides
    missing = [flag for flag, value in (("--config", args.config), ("--minutes", args.minutes),
                                        ("--ood", args.ood), ("--json", args.json)) if not value]
    if missing:
        raise UserError(f"a run needs {', '.join(missing)}")
    if args.minutes <= 0:
        raise UserError(f"--minutes must be > 0, got {args.minutes}")
    for flag, value in (("--eval-every", args.eval_every), ("--test-sequences", args.test_sequences),
                        ("--ood-sequences", args.ood_sequences), ("--eval-batch-tokens", args.eval_batch_tokens)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not Path(args.ood).exists():
        raise UserError(f"--ood {args.ood}: no such file or directory")
    return args, overrides


def fit_argv(args: argparse.Namespace, overrides: list[str], output_dir: Path) -> list[str]:
    """The fit CLI's arguments: configs, the benchmark's settings, the user's overrides, the budget."""
    argv: list[str] = []
    for config in args.config:
        argv += ["--config", config]
    argv += ["--output_dir", str(output_dir), "--wandb", "false",
             "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1",
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
             "--trainer.enable_progress_bar", "false", "--model.schedule", "time_cosine"]
    return [*argv, *overrides, "--model.budget_minutes", str(args.minutes)]


def build_eval_sets(datamodule, ood: str, args: argparse.Namespace, model_max_length: int) -> dict[str, list]:
    """The fixed evaluation batches (CPU tensors): test-split subset and OOD subset, seeded masks."""
    from protein_lm.data.datamodule import ProteinDataModule

    length = args.eval_max_length or int(datamodule.max_length)
    if not 3 <= length <= model_max_length:
        raise UserError(f"--eval-max-length must be in [3, {model_max_length}] (the model's max_length), got {length}")
    import inspect

    accepted = inspect.signature(ProteinDataModule).parameters
    settings = {k: v for k, v in datamodule.hparams.items() if k in accepted}
    settings.update(mode="single", max_length=length, seed=args.eval_seed, num_workers=0, pin_memory=False,
                    batch_size=max(1, args.eval_batch_tokens // length),
                    tokens_per_batch=max(length, args.eval_batch_tokens),
                    max_eval_sequences=args.test_sequences, max_train_sequences=None)
    evaluation = ProteinDataModule(**settings)
    return {
        "test": list(evaluation.test_dataloader()),
        "ood": list(evaluation.evaluation_dataloader(ood, max_sequences=args.ood_sequences)),
    }


def run(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Train, record and return the finished JSON document."""
    from protein_lm.commands.train import build_cli

    json_path = check_output_file(args.json, "--json")
    output_dir = Path(args.output_dir) if args.output_dir else json_path.with_name(json_path.stem + "_run")
    torch.set_float32_matmul_precision("high")
    argv = fit_argv(args, overrides, output_dir)
    cli = build_cli(argv, run=False)
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    datamodule.prepare_data()
    eval_sets = build_eval_sets(datamodule, args.ood, args, int(module.config.max_length))
    meta = {
        "argv": sys.argv[1:],
        "fit_argv": argv,
        "config": json.loads(json.dumps(cli.config.as_dict(), default=str)),
        "minutes": args.minutes,
        "eval_every": args.eval_every,
        "eval_seed": args.eval_seed,
        "eval_max_length": args.eval_max_length or int(datamodule.max_length),
        "eval_sequences": {"test": args.test_sequences, "ood": args.ood_sequences},
        "ood": str(args.ood),
        "precision": str(trainer.precision),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and trainer.num_devices
        and trainer.strategy.root_device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    document: dict[str, Any] = {"meta": meta, "rows": [], "summary": summarize([], args.target_ppl)}

    def write(rows: list[dict[str, Any]]) -> None:
        document["rows"] = rows
        document["summary"] = summarize(rows, args.target_ppl)
        text = json.dumps(document, indent=1, allow_nan=True)
        write_atomically(json_path, lambda tmp: tmp.write_text(text + "\n"), "--json")

    # Lightning's validation is off, so the best-on-val/loss checkpoint callback never sees its metric.
    warnings.filterwarnings("ignore", message=r".*could not find the monitored key.*")
    recorder = SpeedrunRecorder(eval_sets, args.eval_every, 60.0 * args.minutes, write)
    trainer.callbacks.append(recorder)
    trainer.fit(module, datamodule=datamodule)
    return document


# --------------------------------------------------------------------------- tables and plots


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows_table(rows: list[dict[str, Any]], max_rows: int = 12) -> str:
    """One run's rows as a markdown table: at most ``max_rows``, evenly spaced, the last always."""
    if len(rows) > max_rows:
        picks = sorted({round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)})
        rows = [rows[i] for i in picks]
    lines = ["| step | train min | tokens | lr | test ppl | test acc | OOD ppl | OOD acc |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['train_seconds'] / 60:.2f} | {r['tokens']:,} | {_fmt(r['lr'], '.2e')} "
                     f"| {r['test_ppl']:.3f} | {r['test_acc']:.4f} | {r['ood_ppl']:.3f} | {r['ood_acc']:.4f} |")
    return "\n".join(lines)


def runs_table(runs: dict[str, dict[str, Any]]) -> str:
    """Several runs' summaries as a markdown table."""
    lines = ["| run | steps | tokens | minutes | test ppl | test acc | OOD ppl | OOD acc | min to target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, doc in runs.items():
        s = doc["summary"]
        if "steps" not in s:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {s['steps']} | {s['tokens']:,} | {s['minutes']:.2f} | {s['final_test_ppl']:.3f} "
                     f"| {s['final_test_acc']:.4f} | {s['final_ood_ppl']:.3f} | {s['final_ood_acc']:.4f} "
                     f"| {_fmt(s['minutes_to_target'], '.2f')} |")
    return "\n".join(lines)


def plot(paths: list[str], png: str) -> str:
    """Draw test / OOD perplexity against minutes and tokens, one line per run; returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_output_file(png, "--png")
    runs: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            runs[Path(path).stem] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--plot {path}: {err}") from None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for name, doc in runs.items():
        rows = doc["rows"]
        if not rows:
            continue
        minutes = [r["train_seconds"] / 60 for r in rows]
        tokens = [r["tokens"] for r in rows]
        for i, key in enumerate(("ood_ppl", "test_ppl")):
            values = [r[key] for r in rows]
            axes[i, 0].plot(minutes, values, marker=".", label=name)
            axes[i, 1].plot(tokens, values, marker=".", label=name)
    target = next((doc["summary"]["target_ood_ppl"] for doc in runs.values()), None)
    for i, title in enumerate(("CATH OOD perplexity", "test-split perplexity")):
        for j, xlabel in enumerate(("training minutes", "training tokens")):
            ax = axes[i, j]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            if i == 0 and target is not None:
                ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    write_atomically(png, lambda tmp: fig.savefig(tmp, format="png", dpi=120), "--png")
    plt.close(fig)
    return runs_table(runs)


def main(argv: list[str] | None = None) -> int:
    try:
        args, overrides = parse_run_args(list(sys.argv[1:] if argv is None else argv))
        if args.plot is not None:
            print(plot(args.plot, args.png))
            return 0
        document = run(args, overrides)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    s = document["summary"]
    print(rows_table(document["rows"]))
    print(f"\nminutes to OOD ppl {s['target_ood_ppl']}: {_fmt(s.get('minutes_to_target'), '.2f')}; "
          f"OOD ppl at the budget {_fmt(s.get('ood_ppl_at_budget'), '.3f')}; rows in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
