"""DDP scaling of training throughput: the same run on 1 GPU and on 2 GPUs (issue 6).

The BID Performer-softmax run of ``bench/swissprot_runs.py`` (same config, model, optimiser,
per-GPU batch of 32 proteins at L = 1024, FAVOR+ backend checked the same way) trains a fixed
number of steps with ``--trainer.devices 1``, then with ``--trainer.devices 2 --trainer.strategy
ddp`` — one run after the other, so neither shares a GPU. With the same per-GPU batch, the 2-GPU
run processes twice the tokens per step (weak scaling). Validation runs once, at the last step.

    python bench/ddp_scaling.py --cache .gpu/sp45m --ood .gpu/cath_s40_lt50id.fasta.gz --out DIR
    python bench/ddp_scaling.py --cache CACHE --ood OOD.fasta --out DIR --smoke   # CPU, gloo, 2 processes

Throughput is measured by :class:`StepTimer` (added to each run as a callback): after
``--warmup-steps`` optimiser steps it synchronises the device and starts a clock, counts the
non-padding input tokens of **every rank** (summed across ranks with an all-reduce at the end),
and stops the clock at the end of the last
training batch, before the final validation. So the figure is global steady-state training
tokens/s, data loading and optimiser included, start-up and validation excluded. For comparison
the summary also carries ``protein_lm.monitoring.ThroughputMonitor``'s figure (median of its
50-step windows; it also sums every rank's real tokens, since this session — the campaign-D
numbers in docs/results.md were measured while it still counted rank 0's tokens × world size,
which equals the global count only on average, as ranks pad differently).

Also reported: peak GPU memory of every rank (``torch.cuda.max_memory_allocated``), the final
validation loss / accuracy of each run, the scaling efficiency tok/s(2) / (2 · tok/s(1)), and a
check that the DDP run's checkpoint loads (``protein_lm.checkpoint.load_model``) and scores the
CATH OOD set with ``protein-lm evaluate``. Writes ``DIR/summary.json``; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from pytorch_lightning import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not


class StepTimer(Callback):
    """Global steady-state training throughput and per-rank peak memory, written as JSON by rank 0.

    Args:
        out: JSON file to write at the end of training.
        warmup_steps: optimiser steps before the clock starts (CUDA context, Triton compilation,
            allocator growth, data-loader start-up).
    """

    def __init__(self, out: str, warmup_steps: int = 50) -> None:
        self.out, self.warmup_steps = out, warmup_steps
        self._t0: float | None = None
        self._t1: float | None = None
        self._steps = (0, 0)  # (first, last) global step of the timed window
        self._tokens: torch.Tensor | None = None  # [real, padded] tokens of this rank, on device

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimiser steps done, this one included
        if step < self.warmup_steps:
            return
        if pl_module.device.type == "cuda":  # the model syncs every step anyway (finite-loss check)
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._t0 is None:  # the clock starts after this step: its tokens are not counted
            self._t0, self._steps = now, (step, step)
            self._tokens = torch.zeros(2, dtype=torch.int64, device=pl_module.device)
            return
        mask = batch.get("padding_mask")
        numel = batch["input_ids"].numel()
        real = numel - mask.sum() if mask is not None else torch.tensor(numel, device=pl_module.device)
        self._tokens[0] += real  # device-side add: no extra host sync
        self._tokens[1] += numel
        self._t1, self._steps = now, (self._steps[0], step)

    def on_train_end(self, trainer, pl_module) -> None:
        device = pl_module.device
        tokens = self._tokens if self._tokens is not None else torch.zeros(2, dtype=torch.int64, device=device)
        tokens = trainer.strategy.reduce(tokens.clone(), reduce_op="sum")  # every rank's tokens
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        peaks = trainer.strategy.all_gather(torch.tensor([peak], dtype=torch.float64, device=device))
        elapsed = (self._t1 - self._t0) if self._t0 is not None and self._t1 is not None else float("nan")
        times = trainer.strategy.all_gather(torch.tensor([elapsed], dtype=torch.float64, device=device))
        if trainer.global_rank != 0:
            return
        seconds = max(times.reshape(-1).tolist())  # ranks agree to within a step (DDP syncs each step)
        steps = self._steps[1] - self._steps[0]
        real, padded = (int(x) for x in tokens.reshape(-1).tolist())
        def rate(n: int) -> float | None:
            return n / seconds if steps > 0 and seconds > 0 else None

        result = {
            "world_size": trainer.world_size, "warmup_steps": self.warmup_steps,
            "timed_steps": steps, "first_step": self._steps[0], "last_step": self._steps[1],
            "seconds": seconds if steps > 0 else None,
            "global_tokens": real, "global_padded_tokens": padded,
            "tokens_per_sec": rate(real), "padded_tokens_per_sec": rate(padded),
            "step_ms": 1e3 * seconds / steps if steps > 0 else None,
            "peak_gb_per_rank": [None if math.isnan(x) else round(x, 3) for x in peaks.reshape(-1).tolist()],
        }
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps(result, indent=2))


def run_command(devices: int, args: argparse.Namespace, out: Path, backend: str | None) -> list[str]:
    """`protein-lm fit` of the BID Performer-softmax run on ``devices`` GPUs (CPU processes with --smoke)."""
    from bench.swissprot_runs import fit_command

    cmd = fit_command("bid", "performer-softmax", args, out, args.steps)
    steps = str(args.steps)
    if args.smoke:  # ThroughputMonitor (the callback fit_command added last) must log within a few steps
        cmd += ["--trainer.callbacks.log_every_n_steps", "2", "--trainer.callbacks.warmup_steps", "1",
                "--trainer.log_every_n_steps", "1"]
    cmd += ["--trainer.devices", str(devices), "--trainer.val_check_interval", steps,
            "--checkpoint.every_n_train_steps", steps, "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks+=bench.ddp_scaling.StepTimer", "--trainer.callbacks.out",
            str(out / "step_timer.json"), "--trainer.callbacks.warmup_steps", str(args.warmup_steps)]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    if backend:
        cmd += ["--model.config.favor_backend", backend]
    if args.smoke:
        cmd += ["--model.warmup_steps", "1", "--trainer.limit_val_batches", "2"]
    return cmd


def monitor_rate(run_dir: Path) -> float | None:
    """Median of ThroughputMonitor's windows (global real tokens per second)."""
    from bench.swissprot_runs import last_metrics_series

    values = [r["perf/tokens_per_sec"] for r in last_metrics_series(run_dir, ("perf/tokens_per_sec",))
              if "perf/tokens_per_sec" in r]
    return statistics.median(values) if values else None


def collect(run_dir: Path) -> dict:
    from bench.swissprot_runs import best_checkpoint, last_metrics
    from protein_lm.checkpoint import load_model

    metrics = last_metrics(run_dir)
    timer_file, ood_file = run_dir / "step_timer.json", run_dir / "eval_ood.json"
    entry: dict = {
        "timer": json.loads(timer_file.read_text()) if timer_file.exists() else {},
        "monitor_tokens_per_sec": monitor_rate(run_dir),
        "val": {k.split("/", 1)[1]: v for k, v in metrics.items()
                if k in ("val/loss", "val/accuracy", "val/perplexity", "val/num_tokens")},
        "ood": json.loads(ood_file.read_text()) if ood_file.exists() else {},
    }
    ckpt = best_checkpoint(run_dir)
    entry["checkpoint"] = str(ckpt)
    try:  # the checkpoint loads into a plain model (DDP saves unwrapped weights)
        model, info = load_model(ckpt)
        entry["checkpoint_loads"] = True
        entry["checkpoint_step"] = info["global_step"]
        entry["params"] = sum(p.numel() for p in model.parameters())
    except Exception as exc:  # reported, not raised: the summary says what failed
        entry["checkpoint_loads"] = False
        entry["checkpoint_error"] = f"{type(exc).__name__}: {exc}"
    return entry


def main() -> int:
    from bench.swissprot_runs import MODEL, best_checkpoint, check_triton_backend, run_parallel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="prepared token cache of the corpus")
    p.add_argument("--ood", required=True, help="CATH S40 out-of-distribution FASTA")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps of each run")
    p.add_argument("--warmup-steps", type=int, default=100, help="steps before the throughput clock starts")
    p.add_argument("--minutes", type=int, default=2, help="safety limit per run (trainer.max_time)")
    p.add_argument("--devices", type=int, default=2, help="GPUs of the DDP run")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 processes, tiny shapes")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.warmup_steps = min(args.warmup_steps, max(1, args.steps // 3))
    elif torch.cuda.device_count() < args.devices:
        print(f"[ddp] needs {args.devices} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    # DDP children inherit this environment: NVLink multicast stays off (machine rule), threads bounded.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    backend = None if args.smoke else check_triton_backend()["softmax-bid"]
    names = {1: "devices1", args.devices: f"devices{args.devices}"}
    jobs: dict[str, dict] = {}
    for n, name in names.items():  # one after the other: no GPU is shared
        jobs.update(run_parallel({name: run_command(n, args, out / name, backend)}, out / "logs",
                                 timeout=args.minutes * 60 + 120))
    evals = {f"{name}.ood": [sys.executable, "-m", "protein_lm", "evaluate", "--checkpoint",
                             str(best_checkpoint(out / name)), "--fasta", args.ood,
                             "--json", str(out / name / "eval_ood.json"), "--batch-size", "32", "--quiet",
                             "--max-length", "64" if args.smoke else "1024",
                             *(["--max-sequences", "16", "--device", "cpu"] if args.smoke else [])]
             for name in names.values()}
    eval_status = run_parallel(evals, out / "logs", timeout=300)

    summary: dict = {
        "what": "BID Performer-softmax, same per-GPU batch, 1 GPU vs DDP (weak scaling)",
        "model": MODEL, "steps": args.steps, "warmup_steps": args.warmup_steps, "smoke": args.smoke,
        "favor_backend": backend,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu",
        "train_jobs": jobs, "eval_jobs": eval_status,
        "runs": {name: collect(out / name) for name in names.values()},
    }
    one, many = (summary["runs"][names[n]]["timer"].get("tokens_per_sec") for n in (1, args.devices))
    if one and many:
        summary["speedup"] = many / one
        summary["scaling_efficiency"] = many / (args.devices * one)
    m1, m2 = (summary["runs"][names[n]]["monitor_tokens_per_sec"] for n in (1, args.devices))
    if m1 and m2:
        summary["monitor_scaling_efficiency"] = m2 / (args.devices * m1)
    summary["wall_s"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return 0


def print_table(summary: dict) -> None:
    from bench.swissprot_runs import fmt_number

    print(f"{'run':<10}{'steps':>6}{'tok/s (timer)':>15}{'tok/s (monitor)':>17}{'step ms':>9}"
          f"{'peak GB/rank':>16}{'val loss':>10}{'val acc':>9}{'OOD acc':>9}{'OOD ppl':>9}{'ckpt':>6}")
    for name, e in summary["runs"].items():
        t, v, o = e["timer"], e["val"], e["ood"]
        peaks = "/".join(fmt_number(x, ".2f") for x in t.get("peak_gb_per_rank") or []) or "-"
        print(f"{name:<10}{fmt_number(e.get('checkpoint_step'), 'd'):>6}{fmt_number(t.get('tokens_per_sec'), ',.0f'):>15}"
              f"{fmt_number(e['monitor_tokens_per_sec'], ',.0f'):>17}{fmt_number(t.get('step_ms'), '.1f'):>9}{peaks:>16}"
              f"{fmt_number(v.get('loss'), '.4f'):>10}{fmt_number(v.get('accuracy'), '.4f'):>9}"
              f"{fmt_number(o.get('accuracy'), '.4f'):>9}{fmt_number(o.get('perplexity'), '.3f'):>9}"
              f"{'ok' if e.get('checkpoint_loads') else 'FAIL':>6}")
    print(f"speedup {fmt_number(summary.get('speedup'), '.3f')}x, scaling efficiency tok/s(N)/(N*tok/s(1)) = "
          f"{fmt_number(summary.get('scaling_efficiency'), '.3f')} (monitor: "
          f"{fmt_number(summary.get('monitor_scaling_efficiency'), '.3f')})")


if __name__ == "__main__":
    sys.exit(main())
