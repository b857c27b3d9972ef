"""DataModule throughput: MLM (and causal) batches per second from one process.

Target: at least 10 M tokens/s of MLM batches per DataLoader worker, so the input pipeline
never starves a GPU. Measured with ``num_workers=0`` — the batch is built in the main process, which
is exactly the work one worker does per batch — on the shipped Swiss-Prot sample.

Results in ``results/datamodule.json`` (``num_workers=0``, the per-worker figure) and
``datamodule_workers4.json`` (4 workers: end-to-end through the DataLoader's inter-process
transfer) were measured on the CPU of the H100 host (16 cores) that feeds the GPU.

Usage::

    python -m bench.datamodule [--fasta data/swissprot_sample.fasta.gz] [--seconds 3] [--out results/datamodule.json]

"tokens/s" counts every position of the ``B x L`` batch (what the GPU processes); "residues/s"
counts non-padding positions only (in concat mode they are the same).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import cpu_name
from protein_lm.data.datamodule import ProteinDataModule

REPO = Path(__file__).resolve().parents[1]

CASES = [
    # name, mode, objective, max_length, batch_size, tokens_per_batch
    ("single-mlm L=1024 B=32", "single", "mlm", 1024, 32, None),
    ("concat-mlm L=8192 B=4", "concat", "mlm", 8192, 4, None),
    ("single-mlm L=1024 budget=32768", "single", "mlm", 1024, 1, 32768),
    ("single-causal L=1024 B=32", "single", "causal", 1024, 32, None),
    ("concat-causal L=8192 B=4", "concat", "causal", 8192, 4, None),
]
TARGET = 10e6


def measure(
    fasta: str, cache_root: str, mode: str, objective: str, L: int, B: int, tpb, seconds: float, workers: int
):
    t0 = time.perf_counter()
    dm = ProteinDataModule(
        fasta,
        mode=mode,
        objective=objective,
        max_length=L,
        batch_size=B,
        tokens_per_batch=tpb,
        cache_root=cache_root,
        num_workers=workers,
        seed=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up epoch (page cache, allocator)
        break
    tokens = residues = batches = rows = 0
    epoch = 0
    start = time.perf_counter()
    while True:
        loader.sampler.set_epoch(epoch)
        for b in loader:
            tokens += b["input_ids"].numel()
            residues += int((~b["padding_mask"]).sum())
            batches += 1
            rows += b["input_ids"].shape[0]
        epoch += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    # shut persistent workers down before the next case forks new ones
    del loader
    gc.collect()
    return {
        "setup_s": round(setup_s, 3),
        "epochs": epoch,
        "batches": batches,
        "seconds": round(elapsed, 3),
        "tokens_per_s": tokens / elapsed,
        "residues_per_s": residues / elapsed,
        "batches_per_s": batches / elapsed,
        "mean_batch_rows": round(rows / batches, 2),
        "mean_batch_width": round(tokens / rows, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fasta", default=str(REPO / "data" / "swissprot_sample.fasta.gz"))
    p.add_argument("--seconds", type=float, default=3.0, help="minimum measuring time per case")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = per-worker figure)")
    p.add_argument("--out", default=str(REPO / "results" / "datamodule.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as cache_root:
        for name, mode, objective, L, B, tpb in CASES:
            r = measure(args.fasta, cache_root, mode, objective, L, B, tpb, args.seconds, args.workers)
            r.update(
                name=name, mode=mode, objective=objective, max_length=L, batch_size=B, tokens_per_batch=tpb
            )
            results.append(r)
    out = {
        "benchmark": "datamodule",
        "command": "python -m bench.datamodule " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "fasta": os.path.relpath(args.fasta, REPO),
        "num_workers": args.workers,
        "target_tokens_per_s_per_worker": TARGET,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(f"DataModule throughput, num_workers={args.workers}, {out['machine']['cpu']} ({args.fasta})")
    print(f"{'case':34s} {'tokens/s':>12s} {'residues/s':>12s} {'batches/s':>10s} {'setup s':>8s}  target")
    for r in results:
        ok = "ok" if r["objective"] != "mlm" or r["tokens_per_s"] >= TARGET else "BELOW"
        print(
            f"{r['name']:34s} {r['tokens_per_s'] / 1e6:10.1f} M {r['residues_per_s'] / 1e6:10.1f} M "
            f"{r['batches_per_s']:10.1f} {r['setup_s']:8.2f}  {ok if r['objective'] == 'mlm' else '-'}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
