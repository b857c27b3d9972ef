"""End-to-end training throughput of `protein-lm fit`: real (non-padding) tokens/s and GPU load.

Each run is the real command (`python -m protein_lm fit ...`, data loader, logging and optimiser
included) on a prepared token cache, for ``--steps`` optimiser steps without validation or
checkpoints. Tokens/s is the ``perf/tokens_per_sec`` the run logs itself (non-padding tokens, after
its warm-up), the median over the logged windows after the first; GPU utilisation is sampled from
``nvidia-smi`` every 0.2 s while the run trains. ``--profile`` adds a torch.profiler window of 10
steady-state steps (:class:`StepProfiler`): GPU kernel time against wall time, the ops that cost
the most host and GPU time, and host-device synchronisations per step.

The model is the one the shipped checkpoint was trained with (6 layers, d 384, 6 heads x 64,
d_ff 1536, m 256), L 1024, 65,536-token batches. Runs are named ``ATTENTION-MODE[-compile]``:
ATTENTION ``exact`` or ``performer``, MODE ``padded`` (single mode, token-budget batches) or
``packed``.

    python -m bench.fit_throughput --cache cache/swissprot2014 --out results/fit_throughput.json
    python -m bench.fit_throughput --cache DIR --runs exact-padded performer-padded --profile
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"exact": "configs/protein_bid_exact.yaml", "performer": "configs/protein_bid_performer_softmax.yaml"}
MODEL = [
    "--model.config.depth", "6", "--model.config.dim", "384", "--model.config.heads", "6",
    "--model.config.ff_dim", "1536", "--model.config.dropout", "0.0", "--model.warmup_steps", "50",
]
DEFAULT_RUNS = ["exact-padded", "performer-padded", "exact-packed", "performer-packed"]


def command(run: str, cache: str, steps: int, tokens: int, workers: int, root: Path, profile: bool,
            log_every: int = 25) -> list[str]:
    """The `protein-lm fit` command line of one named run."""
    parts = run.split("-")
    attention, mode, extra = parts[0], parts[1], parts[2:]
    if attention not in CONFIGS or mode not in ("padded", "packed") or set(extra) - {"compile"}:
        raise SystemExit(f"unknown run {run!r}: ATTENTION-MODE[-compile], ATTENTION in {sorted(CONFIGS)}, "
                         "MODE padded|packed")
    cmd = [
        sys.executable, "-m", "protein_lm", "fit", "--config", str(REPO / CONFIGS[attention]), *MODEL,
        "--data.data_dir", cache, "--data.mode", "single" if mode == "padded" else "packed",
        "--data.tokens_per_batch", str(tokens), "--data.num_workers", str(workers),
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.val_check_interval", str(steps + 1), "--trainer.log_every_n_steps", str(log_every),
        "--checkpoint.every_n_train_steps", "0", "--checkpoint.save_last", "false",
        "--checkpoint.save_top_k", "0", "--wandb", "false", "--output_dir", str(root / run),
        "--trainer.callbacks+=protein_lm.monitoring.ThroughputMonitor",
        "--trainer.callbacks.log_every_n_steps", str(log_every), "--trainer.callbacks.warmup_steps", "10",
    ]
    if "compile" in extra:
        cmd += ["--model.compile", "default"]
    if profile:  # a steady-state torch.profiler window (StepProfiler), read back by main()
        cmd += ["--trainer.callbacks+=bench.fit_throughput.StepProfiler", "--trainer.callbacks.out",
                str(root / run / "profile.json"), "--trainer.callbacks.start_step", str(min(100, steps // 2)),
                "--trainer.callbacks.steps", "10"]
    return cmd


class StepProfiler(Callback):
    """torch.profiler over ``steps`` optimiser steps from ``start_step`` (steady state, after warm-up).

    Writes ``out`` (JSON): wall time per step, GPU kernel time per step (the busy fraction), the ops
    with the most host time and with the most GPU time, and the host-device synchronisations
    (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / device-to-host copies) per step.
    """

    def __init__(self, out: str, start_step: int = 100, steps: int = 10) -> None:
        self.out, self.start_step, self.steps = out, start_step, steps
        self._prof = None
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start_step and self._prof is None:
            import torch
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.__enter__()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prof is None or trainer.global_step != self.start_step + self.steps:
            return
        import torch

        torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        events = self._prof.key_averages()
        cuda = [e for e in events if e.self_device_time_total > 0]
        # Busy time from the kernels themselves: operator rows also carry their kernels' device time.
        kernels = [e for e in self._prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(e.device_time for e in kernels)
        syncs = {e.key: e.count for e in events
                 if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense")
                 or "DtoH" in e.key}
        top = lambda rows, key: [  # noqa: E731
            {"op": e.key[:90], "calls": e.count, "ms_per_step": round(getattr(e, key) / 1e3 / self.steps, 3)}
            for e in sorted(rows, key=lambda e: -getattr(e, key))[:25]
        ]
        doc = {"steps": self.steps, "wall_ms_per_step": 1e3 * wall / self.steps,
               "gpu_kernel_ms_per_step": kernel_us / 1e3 / self.steps,
               "gpu_busy_fraction": kernel_us / 1e6 / wall,
               "syncs": {k: v / self.steps for k, v in syncs.items()},
               "top_host": top(list(events), "self_cpu_time_total"),
               "top_gpu": top([e for e in cuda if not e.key.startswith(("aten::", "Optimizer", "_Favor", "##"))],
                              "self_device_time_total")}
        Path(self.out).write_text(json.dumps(doc, indent=1))
        self._prof = None


class GpuSampler(threading.Thread):
    """``nvidia-smi`` utilisation (%) every ``period`` seconds until stopped."""

    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._done = period, [], threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, check=False).stdout.split()
            except FileNotFoundError:  # no NVIDIA driver here: no samples
                return
            if out and out[0].isdigit():
                self.samples.append(int(out[0]))
            self._done.wait(self.period)

    def stop(self) -> list[int]:
        self._done.set()
        self.join()
        return self.samples


def read_throughput(run_dir: Path) -> dict:
    """Median tokens/s over the logged windows (the first dropped) and real tokens per step."""
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("perf/tokens_per_sec")]
    if len(rows) < 3:
        return {"error": f"only {len(rows)} throughput windows logged in {run_dir}"}
    rates = [float(r["perf/tokens_per_sec"]) for r in rows[1:]]
    steps = [int(float(r["step"])) for r in rows]
    seen = [float(r["perf/tokens_seen"]) for r in rows]
    per_step = (seen[-1] - seen[0]) / max(steps[-1] - steps[0], 1)
    rate = statistics.median(rates)
    return {"real_tokens_per_s": rate, "real_tokens_per_step": per_step, "steps_per_s": rate / per_step,
            "windows": len(rates), "peak_memory_gb": max(float(r.get("perf/peak_memory_gb") or 0) for r in rows)}


def child_env() -> dict[str, str]:
    """The environment of a fit run: no wandb, unbuffered. The run starts in REPO, so it imports
    :class:`StepProfiler` as ``bench.fit_throughput.StepProfiler`` from there."""
    return dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a `protein-lm prepare` token cache")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=25, help="steps per throughput window")
    p.add_argument("--profile", action="store_true", help="a torch.profiler window of 10 steady-state steps")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    env = child_env()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            cmd = command(run, args.cache, args.steps, args.tokens_per_batch, args.workers, Path(tmp), args.profile,
                          args.log_every)
            sampler = GpuSampler()
            sampler.start()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO)
            wall = time.perf_counter() - t0
            util = sampler.stop()
            row = {"run": run, "wall_s": round(wall, 1), "command": " ".join(cmd[2:])}
            if proc.returncode:
                row["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"
            else:
                row.update(read_throughput(Path(tmp) / run))
                # idle samples count (host-bound stalls are what this shows); start-up and compile
                # are left out by dropping the samples before the GPU first got busy and after it
                # last was
                busy = [i for i, u in enumerate(util) if u > 0]
                window = util[busy[0] : busy[-1] + 1] if busy else []
                row["gpu_util_median"] = statistics.median(window) if window else None
                row["gpu_util_mean"] = round(statistics.fmean(window), 1) if window else None
                prof = Path(tmp) / run / "profile.json"
                if prof.exists():
                    row["profile"] = json.loads(prof.read_text())
            results.append(row)
            print(json.dumps(row), flush=True)
    info = {"gpu": _gpu_name(), "steps": args.steps, "tokens_per_batch": args.tokens_per_batch,
            "workers": args.workers, "model": "6 x d 384, 6 heads, d_ff 1536, m 256, L 1024, BID MLM",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=1))
    print(f"\n{info['gpu']}  protein-lm fit, {args.steps} steps, {args.tokens_per_batch} tokens/batch")
    print(f"{'run':24s}{'real tok/s':>12s}{'steps/s':>9s}{'real/step':>11s}{'GPU util':>9s}{'busy(prof)':>11s}")
    for r in results:
        if "error" in r:
            print(f"{r['run']:24s}  error: {r['error'][:80]}")
            continue
        print(f"{r['run']:24s}{r['real_tokens_per_s'] / 1e3:>11.0f}k{r['steps_per_s']:>9.2f}"
              f"{r['real_tokens_per_step']:>11.0f}{r['gpu_util_median'] or 0:>8.0f}%"
              + (f"{r['profile']['gpu_busy_fraction']:>10.0%}" if "profile" in r else ""))


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=False).stdout.strip()
    except FileNotFoundError:
        out = ""
    return out or "no GPU"


if __name__ == "__main__":
    main()
