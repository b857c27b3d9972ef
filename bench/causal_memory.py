"""Causal FAVOR+ forward+backward on CPU: wall time and peak memory vs sequence length and chunk size.

Each measurement runs in a fresh subprocess so that ``ru_maxrss`` (peak resident set size) is that
run's own peak; the baseline RSS of an idle process that imported torch and built the inputs is
reported separately so the attention's own footprint can be read off.

    python -m bench.causal_memory                 # the issue's target: L=32768, B=1, H=4, D=64, M=256
    python -m bench.causal_memory --sweep         # + chunk-size sweep and L scaling

Writes results/causal_memory.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _child(
    length: int, chunk: int, heads: int, dim: int, features: int, kernel: str, inputs_only: bool
) -> dict:
    import torch

    from protein_lm.attention import FavorAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, requires_grad=True) for _ in range(3))
    attn = FavorAttention(dim, features, kernel=kernel, causal=True, seed=0, chunk_size=chunk)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if inputs_only:
        return {"peak_rss_mb": rss0}
    # warm-up on a short sequence (allocator, kernels), then the timed full run
    attn(q[:, :, :1024], k[:, :, :1024], v[:, :, :1024]).sum().backward()
    q.grad = k.grad = v.grad = None
    t0 = time.perf_counter()
    out = attn(q, k, v)
    t1 = time.perf_counter()
    out.square().sum().backward()
    t2 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ok = bool(torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v)))
    return {
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "baseline_rss_mb": rss0,
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "finite": ok,
    }


def run_one(
    length: int,
    chunk: int,
    heads: int = 4,
    dim: int = 64,
    features: int = 256,
    kernel: str = "softmax",
    inputs_only: bool = False,
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.causal_memory",
        "--child",
        str(length),
        str(chunk),
        str(heads),
        str(dim),
        str(features),
        kernel,
        str(int(inputs_only)),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec.update(length=length, chunk=chunk, batch=1, heads=heads, dim=dim, features=features, kernel=kernel)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also sweep chunk sizes and sequence lengths")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        length, chunk, heads, dim, features, kernel, inputs_only = args.child
        print(
            json.dumps(
                _child(
                    int(length),
                    int(chunk),
                    int(heads),
                    int(dim),
                    int(features),
                    kernel,
                    bool(int(inputs_only)),
                )
            )
        )
        return

    import torch

    from protein_lm.attention.causal import DEFAULT_CHUNK

    runs = []
    if args.sweep:
        for chunk in (32, 64, 128, 256, 512):
            runs.append(run_one(8192, chunk))
        for length in (4096, 8192, 16384, 65536):
            runs.append(run_one(length, DEFAULT_CHUNK))
    runs.append(run_one(32768, DEFAULT_CHUNK))
    runs.append(run_one(32768, DEFAULT_CHUNK, kernel="relu"))
    idle = run_one(32768, DEFAULT_CHUNK, inputs_only=True)["peak_rss_mb"]
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores ({cpu_name()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "what": "one forward + backward of causal FavorAttention, B=1; peak_rss_mb is the whole process "
        "(python + torch + inputs + attention); idle_rss_mb is the same process before attention",
        "idle_rss_mb": idle,
        "load_average_1_5_15_min_at_end": load_average(),
        "command": "python -m bench.causal_memory" + (" --sweep" if args.sweep else ""),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "causal_memory.json"
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    print(
        f"machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; idle RSS {idle:.0f} MB"
    )
    print(
        f"{'kernel':>8} {'L':>7} {'chunk':>5} {'fwd s':>7} {'bwd s':>7} {'total s':>8} {'peak MB':>8} finite"
    )
    for r in runs:
        print(
            f"{r['kernel']:>8} {r['length']:>7} {r['chunk']:>5} {r['forward_s']:7.2f} {r['backward_s']:7.2f} "
            f"{r['total_s']:8.2f} {r['peak_rss_mb']:8.0f} {r['finite']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
