"""Multi-GPU training: DDP and FSDP on 1, 2 and 4 GPUs, and the largest model each strategy trains.

Every run is ``protein-lm fit`` of a shipped config plus ``configs/strategy_{ddp,fsdp}.yaml``,
one run after the other (no GPU is shared). Two phases:

* ``scaling``: for each model preset (``--presets``; 150m and 400m by default, head dim 64,
  m = 256 features) and setting (``--settings``: ``l1024`` = BID Performer-softmax on single
  proteins, L = 1024, configs/protein_bid_performer_softmax.yaml, 16 proteins per GPU; ``l8192`` =
  proteins concatenated into 8192-token windows, configs/concat_performer_softmax.yaml, 2 windows
  per GPU), train ``--steps`` optimiser steps on one GPU without a strategy (``single``), with
  DDP on 2 and 4 GPUs and with FSDP on 1, 2 and 4 GPUs (``--gpus``), the same batch per GPU
  (weak scaling). Throughput is :class:`StepTimer`'s: every rank's real (non-padding) tokens
  after ``--warmup-steps``, summed across ranks, per second of training (data loading and
  optimiser included, start-up excluded; no validation). Scaling efficiency = tok/s(N) /
  (N x tok/s of the 1-GPU run of the same strategy; ``single`` for DDP). Peak memory per GPU
  (allocated and reserved). One run per strategy keeps its checkpoint, which ``protein-lm
  evaluate`` then scores (the FSDP one is the gathered full checkpoint).
* ``capacity``: on all ``--gpus``, at 1 protein of L = 1024 per GPU, the largest model of a
  ladder (d 4096, 64 heads, d_ff 16384, 8 to 96 layers: 1.6 to 19 B parameters) that trains
  ``--capacity-steps`` steps, per strategy, by bisection (a rung that fails, out of memory
  or otherwise, counts as too large; the log says which). Every rank builds the model in host
  memory before it is sharded, so rungs that cannot fit the host's RAM are skipped, not run.

    python -m bench.ddp_scaling --cache CACHE --out DIR                 # both phases on the GPUs present
    python -m bench.ddp_scaling --cache CACHE --out DIR --phase scaling --presets 150m --settings l1024
    python -m bench.ddp_scaling --cache CACHE --out DIR --phase capacity --strategies fsdp
    python -m bench.ddp_scaling --cache CACHE --out DIR --dry-run       # CPU processes (gloo), tiny sizes

Results accumulate in DIR: each run writes ``DIR/runs/<name>/result.json`` and a later call skips
runs that have one (``--force`` reruns them), so the phases can be spread over several calls. Every
call rewrites ``DIR/summary.json`` from all the runs in DIR (machine, presets with parameter counts,
runs, the scaling rows, the capacity per strategy, the two targets) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parents[1]

HEAD_DIM, FEATURES = 64, 256
PRESETS = {  # ModelConfig fields
    "d256-6l": {"dim": 256, "depth": 6, "heads": 4, "ff_dim": 1024},  # the earlier 2-GPU measurement's model
    "150m": {"dim": 1024, "depth": 12, "heads": 16, "ff_dim": 4096},
    "400m": {"dim": 1024, "depth": 32, "heads": 16, "ff_dim": 4096},
}
LADDER_DEPTHS = (8, 16, 24, 32, 40, 48, 64, 80, 96)
LADDER = {f"d4096-{d}l": {"dim": 4096, "depth": d, "heads": 64, "ff_dim": 16384} for d in LADDER_DEPTHS}
SETTINGS = {  # config, tokens per row, rows per GPU
    "l1024": {"config": "configs/protein_bid_performer_softmax.yaml", "max_length": 1024, "batch_size": 16},
    "l8192": {"config": "configs/concat_performer_softmax.yaml", "max_length": 8192, "batch_size": 2},
}
DRY = {  # --dry-run: CPU processes, sizes that train in seconds
    "presets": {"tiny": {"dim": 32, "depth": 2, "heads": 2, "ff_dim": 64, "num_features": 16}},
    "ladder": {"tiny-2l": {"dim": 32, "depth": 2, "heads": 2, "ff_dim": 64, "num_features": 16}},  # one try each
    "settings": {"l1024": {"max_length": 64, "batch_size": 2}, "l8192": {"max_length": 128, "batch_size": 2}},
}
STRATEGY_GPUS = {"single": (1,), "ddp": (2, 4, 8), "fsdp": (1, 2, 4, 8)}
TARGET_EFFICIENCY = 0.9


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
        cuda = device.type == "cuda"
        peak = [torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30] \
            if cuda else [float("nan")] * 2
        peaks = trainer.strategy.all_gather(torch.tensor(peak, dtype=torch.float64, device=device)).reshape(-1, 2)
        elapsed = (self._t1 - self._t0) if self._t0 is not None and self._t1 is not None else float("nan")
        times = trainer.strategy.all_gather(torch.tensor([elapsed], dtype=torch.float64, device=device))
        if trainer.global_rank != 0:
            return
        seconds = max(times.reshape(-1).tolist())  # ranks agree to within a step (each step syncs them)
        steps = self._steps[1] - self._steps[0]
        real, padded = (int(x) for x in tokens.reshape(-1).tolist())

        def rate(n: int) -> float | None:
            return n / seconds if steps > 0 and seconds > 0 else None

        def gb(column: int) -> list[float | None]:
            return [None if math.isnan(x) else round(x, 3) for x in peaks[:, column].tolist()]

        result = {
            "world_size": trainer.world_size, "warmup_steps": self.warmup_steps,
            "timed_steps": steps, "first_step": self._steps[0], "last_step": self._steps[1],
            "seconds": seconds if steps > 0 else None,
            "global_tokens": real, "global_padded_tokens": padded,
            "tokens_per_sec": rate(real), "padded_tokens_per_sec": rate(padded),
            "step_ms": 1e3 * seconds / steps if steps > 0 else None,
            "peak_gb_per_rank": gb(0), "peak_reserved_gb_per_rank": gb(1),
        }
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class Run:
    """One ``protein-lm fit``: a model on a setting with a strategy on ``gpus`` devices."""

    phase: str  # "scaling" or "capacity"
    model: str  # a preset or ladder name
    setting: str
    strategy: str  # "single", "ddp" or "fsdp"
    gpus: int
    keep_checkpoint: bool = False

    @property
    def name(self) -> str:
        return f"{self.phase}-{self.model}-{self.setting}-{self.strategy}-{self.gpus}gpu"


def model_params(fields: dict) -> int:
    """Parameters of a ProteinLM with these ModelConfig fields (built on the meta device: no memory)."""
    from protein_lm.model import ModelConfig, ProteinLM

    with torch.device("meta"):
        return ProteinLM(ModelConfig(**{"num_features": FEATURES, **fields})).num_parameters()


def fit_command(run: Run, model: dict, setting: dict, args: argparse.Namespace, out: Path) -> list[str]:
    """The command line of ``run`` (``out``: its directory)."""
    steps = args.capacity_steps if run.phase == "capacity" else args.steps
    warmup = min(args.warmup_steps, max(1, steps // 2)) if run.phase == "scaling" else 1
    batch = 1 if run.phase == "capacity" else setting["batch_size"]
    cmd = [sys.executable, "-m", "protein_lm", "fit", "--config", setting["config"]]
    if run.strategy != "single":
        cmd += ["--config", f"configs/strategy_{run.strategy}.yaml"]
    cmd += ["--output_dir", str(out), "--wandb", "false", "--data.data_dir", args.cache,
            "--data.num_workers", str(args.num_workers), "--data.max_length", str(setting["max_length"]),
            "--data.batch_size", str(batch), "--trainer.devices", str(run.gpus),
            "--trainer.max_steps", str(steps), "--model.max_steps", str(steps),
            "--model.warmup_steps", str(max(1, steps // 5)),
            "--trainer.max_time", f"00:00:{args.minutes:02d}:00",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "10",
            "--trainer.callbacks+=bench.ddp_scaling.StepTimer", "--trainer.callbacks.out", str(out / "step_timer.json"),
            "--trainer.callbacks.warmup_steps", str(warmup)]
    for key, value in {"num_features": FEATURES, **model}.items():
        cmd += [f"--model.config.{key}", str(value)]
    if run.keep_checkpoint:
        cmd += ["--checkpoint.every_n_train_steps", str(steps)]
    else:  # the 150 M-19 B models' checkpoints would cost minutes and disk: none
        cmd += ["--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false"]
    if args.dry_run:
        cmd += ["--trainer.accelerator", "cpu", "--data.max_eval_sequences", "16"]
    elif args.favor_backend:
        cmd += ["--model.config.favor_backend", args.favor_backend]
    return cmd


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int | str, float]:
    """Run ``cmd`` in its own process group, output to ``log``; kill the whole group (the ranks
    Lightning started too) after ``timeout`` s. Returns (exit code or "timeout", wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    return rc, round(time.time() - t0, 1)


def classify(rc: int | str, log_text: str, timer: dict) -> str:
    """``ok``, ``oom`` (CUDA out of memory on any rank), ``timeout`` or ``error``."""
    if rc == 0 and timer.get("timed_steps"):
        return "ok"
    if "out of memory" in log_text.lower() or "OutOfMemoryError" in log_text:
        return "oom"  # before "timeout": the other ranks may hang in a collective after one OOMs
    return "timeout" if rc == "timeout" else "error"


def execute(run: Run, model: dict, setting: dict, args: argparse.Namespace) -> dict:
    """Run (or reuse the recorded result of) ``run``; returns its result dict."""
    out = Path(args.out) / "runs" / run.name
    result_file = out / "result.json"
    if result_file.exists() and not args.force:
        return json.loads(result_file.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an earlier attempt's files: the run must start fresh
    cmd = fit_command(run, model, setting, args, out)
    timeout = args.capacity_timeout if run.phase == "capacity" else args.run_timeout
    print(f"[bench] {run.name} ...", flush=True)
    rc, wall = run_logged(cmd, out / "fit.log", timeout)
    timer_file = out / "step_timer.json"
    timer = json.loads(timer_file.read_text()) if timer_file.exists() else {}
    log_text = (out / "fit.log").read_text(errors="replace")
    result = {**asdict(run), "name": run.name, "model_fields": model, "params": model_params(model),
              "returncode": rc, "wall_s": wall, "status": classify(rc, log_text, timer), "timer": timer}
    if result["status"] == "ok" and run.keep_checkpoint:
        result["checkpoint"] = check_checkpoint(out, args)
    print(f"[bench] {run.name}: {result['status']} in {wall} s", flush=True)
    result_file.write_text(json.dumps(result, indent=2))
    return result


def check_checkpoint(out: Path, args: argparse.Namespace) -> dict:
    """The run's last checkpoint loads into a plain model and ``protein-lm evaluate`` scores it."""
    ckpt = out / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "protein_lm", "evaluate", "--checkpoint", str(ckpt), "--fasta",
           args.eval_fasta or args.cache, "--max-sequences", "16" if args.dry_run else "256",
           "--json", str(out / "evaluate.json"), "--quiet", *(["--device", "cpu"] if args.dry_run else [])]
    rc, wall = run_logged(cmd, out / "evaluate.log", args.run_timeout)
    scores = json.loads((out / "evaluate.json").read_text()) if (out / "evaluate.json").exists() else {}
    check = {"path": str(ckpt), "is_file": ckpt.is_file(), "evaluate_returncode": rc, "evaluate_s": wall,
             **{k: scores.get(k) for k in ("loss", "accuracy", "perplexity", "num_tokens")}}
    if not args.keep_checkpoints and ckpt.exists():  # gigabytes each; the numbers are what is kept
        import shutil

        shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    return check


def largest_that_trains(count: int, attempt: Callable[[int], str]) -> tuple[int | None, dict[int, str]]:
    """Bisection over rungs ``0..count-1`` ordered by size, assuming a rung trains if a larger one does.

    Returns the index of the largest rung whose ``attempt`` was ``"ok"`` (None if none was) and
    every outcome tried. Any other outcome counts as "too large".
    """
    lo, hi, tried = -1, count, {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried[mid] = attempt(mid)
        lo, hi = (mid, hi) if tried[mid] == "ok" else (lo, mid)
    return (lo if lo >= 0 else None), tried


def host_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------ phases


def scaling_runs(args: argparse.Namespace, presets: dict) -> list[Run]:
    runs, kept = [], set()
    for preset in args.presets:
        for setting in args.settings:
            for strategy in ("single", *args.strategies):  # single: the 1-GPU baseline of DDP
                for gpus in STRATEGY_GPUS[strategy]:
                    if gpus not in args.gpus:
                        continue
                    # one checkpoint per strategy, at the most GPUs: it is loaded and evaluated
                    keep = strategy not in kept and gpus == max(g for g in STRATEGY_GPUS[strategy] if g in args.gpus)
                    kept |= {strategy} if keep else set()
                    runs.append(Run("scaling", preset, setting, strategy, gpus, keep_checkpoint=keep))
    return runs


def capacity_phase(args: argparse.Namespace, ladder: dict, setting: dict) -> dict:
    gpus = max(args.gpus)
    names = list(ladder)
    ram = host_memory_bytes()
    found = {}
    for strategy in args.strategies:
        if strategy == "ddp" and gpus == 1:
            continue

        def attempt(i: int, strategy: str = strategy) -> str:
            # every rank holds the fp32 model in host memory before it moves or is sharded
            need = 4 * model_params(ladder[names[i]]) * gpus * 1.25
            if ram is not None and not args.dry_run and need > ram:
                return "skipped: host RAM"
            return execute(Run("capacity", names[i], "l1024", strategy, gpus), ladder[names[i]], setting, args)["status"]

        best, tried = largest_that_trains(len(names), attempt)
        found[strategy] = {
            "gpus": gpus, "largest": names[best] if best is not None else None,
            "largest_params": model_params(ladder[names[best]]) if best is not None else None,
            "tried": {names[i]: outcome for i, outcome in sorted(tried.items())},
            "smallest_failed": next((names[i] for i, o in sorted(tried.items()) if o != "ok"), None),
            "ladder_top_reached": best == len(names) - 1,  # then the largest is a lower bound
        }
    return found


def scaling_rows(results: list[dict]) -> list[dict]:
    """One row per scaling run with its efficiency against the 1-GPU run of its series."""
    by_key = {(r["model"], r["setting"], r["strategy"], r["gpus"]): r for r in results}
    rows = []
    for r in results:
        rate = r["timer"].get("tokens_per_sec") if r["status"] == "ok" else None
        base_strategy = "single" if r["strategy"] == "ddp" else r["strategy"]
        base = by_key.get((r["model"], r["setting"], base_strategy, 1))
        single = by_key.get((r["model"], r["setting"], "single", 1))

        peaks = [x for x in r["timer"].get("peak_gb_per_rank") or [] if x is not None]
        rows.append({"model": r["model"], "params": r["params"], "setting": r["setting"], "strategy": r["strategy"],
                     "gpus": r["gpus"], "status": r["status"], "tokens_per_sec": rate,
                     "step_ms": r["timer"].get("step_ms"), "efficiency": _efficiency(rate, r["gpus"], base),
                     "efficiency_vs_single": _efficiency(rate, r["gpus"], single), "peak_gb_max": max(peaks) if peaks else None,
                     "peak_gb_per_rank": r["timer"].get("peak_gb_per_rank"),
                     "checkpoint": r.get("checkpoint")})
    order = {"single": 0, "ddp": 1, "fsdp": 2}
    return sorted(rows, key=lambda x: (x["model"], x["setting"], order[x["strategy"]], x["gpus"]))


def _efficiency(rate: float | None, gpus: int, base: dict | None) -> float | None:
    """tok/s on ``gpus`` GPUs over ``gpus`` times the 1-GPU run ``base``'s (None when either is missing)."""
    base_rate = base["timer"].get("tokens_per_sec") if base and base["status"] == "ok" else None
    return rate / (gpus * base_rate) if rate and base_rate else None


def targets(rows: list[dict], capacity: dict) -> dict:
    """The issue's two targets: DDP scaling efficiency >= 90% from 1 to 4 GPUs for every model of
    >= 150 M parameters (the lowest over models and settings; measured at the most GPUs run), and
    FSDP training a larger ladder rung than DDP on the same GPUs."""
    ddp = [r for r in rows if r["strategy"] == "ddp" and r["params"] >= 150e6 and r["efficiency"] is not None]
    gpus = max((r["gpus"] for r in ddp), default=None)
    eff = min((r["efficiency"] for r in ddp if r["gpus"] == gpus), default=None)
    cap_ddp, cap_fsdp = capacity.get("ddp", {}), capacity.get("fsdp", {})
    bigger = None
    if cap_ddp.get("gpus") and cap_ddp.get("gpus") == cap_fsdp.get("gpus") and cap_fsdp.get("largest_params"):
        bigger = cap_fsdp["largest_params"] > (cap_ddp.get("largest_params") or 0)
    return {
        "ddp_efficiency_150m_plus": eff, "ddp_efficiency_gpus": gpus, "ddp_efficiency_target": TARGET_EFFICIENCY,
        "ddp_efficiency_met": None if eff is None or gpus != 4 else eff >= TARGET_EFFICIENCY,
        "fsdp_trains_a_model_ddp_cannot": bigger,
    }


def machine(args: argparse.Namespace) -> dict:
    import pytorch_lightning

    from bench.machine import cpu_name

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "host_memory_gb": round((host_memory_bytes() or 0) / 2**30, 1),
            "torch": torch.__version__, "lightning": pytorch_lightning.__version__, "dry_run": args.dry_run}
    if torch.cuda.is_available() and not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def summarize(args: argparse.Namespace, presets: dict, ladder: dict, capacity: dict) -> dict:
    results = [json.loads(p.read_text()) for p in sorted((Path(args.out) / "runs").glob("*/result.json"))]
    rows = scaling_rows([r for r in results if r["phase"] == "scaling"])
    old = Path(args.out) / "summary.json"
    if old.exists():  # keep what earlier calls found for strategies this call did not search
        capacity = {**json.loads(old.read_text()).get("capacity", {}), **capacity}
    return {
        "what": "protein-lm fit throughput per strategy and GPU count (same batch per GPU), and the largest "
                "model each strategy trains at 1 protein of L 1024 per GPU",
        "machine": machine(args), "steps": args.steps, "warmup_steps": args.warmup_steps,
        "presets": {k: {**v, "params": model_params(v)} for k, v in presets.items()},
        "ladder": {k: {**v, "params": model_params(v)} for k, v in ladder.items()},
        "scaling": rows, "capacity": capacity, "targets": targets(rows, capacity),
        "runs": {r["name"]: r for r in results},
    }


def print_tables(summary: dict) -> None:
    from bench.tables import fmt_number

    m = summary["machine"]
    print(f"\nmachine: {m.get('gpu_count', 0)} x {m.get('gpu', 'CPU processes (dry run)')}, {m['cpu']}, "
          f"torch {m['torch']}, lightning {m['lightning']}")
    print(f"{'model':<10}{'params':>8}{'setting':>8}{'strategy':>9}{'GPUs':>5}{'tok/s':>12}{'step ms':>9}"
          f"{'eff.':>7}{'vs 1 GPU':>9}{'peak GB/GPU':>13}  status")
    for r in summary["scaling"]:
        print(f"{r['model']:<10}{r['params'] / 1e6:>7.0f}M{r['setting']:>8}{r['strategy']:>9}{r['gpus']:>5}"
              f"{fmt_number(r['tokens_per_sec'], ',.0f'):>12}{fmt_number(r['step_ms'], '.1f'):>9}"
              f"{fmt_number(r['efficiency'], '.2f'):>7}{fmt_number(r['efficiency_vs_single'], '.2f'):>9}"
              f"{fmt_number(r['peak_gb_max'], '.1f'):>13}  {r['status']}")
    for strategy, c in summary["capacity"].items():
        size = f"{c['largest']} ({c['largest_params'] / 1e9:.2f} B)" if c["largest"] else "none"
        size += " = the ladder's top, larger not tried" if c.get("ladder_top_reached") else ""
        print(f"capacity {strategy} on {c['gpus']} GPUs, batch 1, L 1024: largest that trains {size}; "
              f"tried {c['tried']}")
    t = summary["targets"]
    print(f"targets: DDP efficiency on {t['ddp_efficiency_gpus']} GPUs (models >= 150 M) "
          f"{fmt_number(t['ddp_efficiency_150m_plus'], '.3f')} (target {t['ddp_efficiency_target']} on 4: "
          f"{t['ddp_efficiency_met']}); FSDP trains a model DDP cannot: {t['fsdp_trains_a_model_ddp_cannot']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="prepared token cache (or FASTA) to train on")
    p.add_argument("--out", required=True, help="results directory (summary.json, runs/)")
    p.add_argument("--phase", choices=("scaling", "capacity", "all"), default="all")
    p.add_argument("--presets", nargs="+", default=["150m", "400m"], help=f"of {', '.join(PRESETS)}")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=("ddp", "fsdp"))
    p.add_argument("--gpus", default="1,2,4", help="GPU counts, comma-separated (those present are used)")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps of a scaling run")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps before the throughput clock starts")
    p.add_argument("--batch-l1024", type=int, default=None, help="proteins per GPU at L 1024 (default 16)")
    p.add_argument("--batch-l8192", type=int, default=None, help="windows per GPU at L 8192 (default 2)")
    p.add_argument("--capacity-steps", type=int, default=4)
    p.add_argument("--minutes", type=int, default=6, help="trainer.max_time of every run")
    p.add_argument("--run-timeout", type=float, default=480, help="kill a scaling run after this many s")
    p.add_argument("--capacity-timeout", type=float, default=540, help="kill a capacity run after this many s")
    p.add_argument("--num-workers", type=int, default=4, help="data.num_workers per rank")
    p.add_argument("--eval-fasta", default=None, help="what the kept checkpoints are evaluated on (default: --cache)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the evaluated checkpoints")
    p.add_argument("--force", action="store_true", help="rerun runs that already have a result")
    p.add_argument("--dry-run", action="store_true", help="CPU processes (gloo), tiny sizes: checks the pipeline")
    args = p.parse_args(argv)
    args.gpus = sorted({int(g) for g in str(args.gpus).split(",") if g.strip()})
    args.favor_backend = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    presets, ladder = dict(PRESETS), dict(LADDER)
    settings = {k: dict(v) for k, v in SETTINGS.items()}
    if args.batch_l1024:
        settings["l1024"]["batch_size"] = args.batch_l1024
    if args.batch_l8192:
        settings["l8192"]["batch_size"] = args.batch_l8192
    if args.dry_run:
        presets, ladder = DRY["presets"], DRY["ladder"]
        args.presets = [p for p in args.presets if p in presets] or list(presets)
        for name, shape in DRY["settings"].items():
            settings[name].update(shape)
        args.num_workers = 0
        args.gpus = [g for g in args.gpus if g <= 2]
        args.steps, args.warmup_steps = min(args.steps, 6), min(args.warmup_steps, 2)
        args.capacity_steps = min(args.capacity_steps, 2)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:
        unknown = [p for p in args.presets if p not in presets]
        if unknown:
            print(f"[bench] unknown presets {unknown}; known: {', '.join(presets)}", file=sys.stderr)
            return 2
        present = torch.cuda.device_count()
        args.gpus = [g for g in args.gpus if g <= present]
        if not args.gpus:
            print(f"[bench] no GPU (found {present}); --dry-run checks the pipeline on CPU", file=sys.stderr)
            return 2
        from bench.machine import check_triton_backend

        args.favor_backend = check_triton_backend()["softmax-bid"]
    # Children inherit this: NVLink multicast stays off (machine rule), wandb off, and each rank's
    # share of the cores (every rank builds the model on the CPU first: a 19 B model is 77 GB).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(args.gpus))))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.phase in ("scaling", "all"):
        for run in scaling_runs(args, presets):
            execute(run, presets[run.model], settings[run.setting], args)
    capacity = capacity_phase(args, ladder, settings["l1024"]) if args.phase in ("capacity", "all") else {}
    summary = summarize(args, presets, ladder, capacity)
    summary["wall_s_this_call"] = round(time.time() - t0, 1)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print_tables(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
