"""Launch-geometry sweep of the fused FAVOR+ Triton kernels (a tuning tool).

For each (kernel, causal) it times forward+backward of ``favor_attention_triton`` at one shape for
every combination of tile rows, rows per walk program and warps, and records the compiler's
register / spill report of each kernel. The fastest setting per case is printed last; defaults in
``favor_triton.py`` should follow it. Needs a CUDA GPU.

    python -m bench.kernel_sweep --out sweep.json            # B*L = 65,536, H 8, d 64, m 256, bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

from bench.shapes import add_shape_args, compile_report, record_launches


def main() -> int:
    import triton.testing

    from protein_lm.attention.kernels import favor_triton as ft
    from protein_lm.attention.kernels.favor_triton import favor_attention_triton

    record_launches(ft)  # before the first launch: compile_report reads the record

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--tiles", type=int, nargs="+", default=[32, 64])
    p.add_argument("--walks", type=int, nargs="+", default=[1, 2, 4], help="tiles per walk program (bid)")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--out", default="")
    args = p.parse_args()
    b, length = max(1, args.tokens // args.length), args.length
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(b, args.heads, length, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    proj = torch.randn(args.features, args.dim, device="cuda")
    do = torch.randn_like(q)
    rows = []
    for kernel, causal in itertools.product(("softmax", "relu"), (False, True)):
        for tile, walk, warps in itertools.product(args.tiles, args.walks, args.warps):
            if causal and walk != args.walks[0]:
                continue  # causal walks are sized by the occupancy rule, not this knob
            os.environ["FAVOR_TRITON_CFG"] = f"{warps},1"
            opts = {"tile": tile, "walk_split": None if causal else walk * tile}

            def step(kernel=kernel, causal=causal, opts=opts):
                out = favor_attention_triton(q, k, v, proj, kernel, causal, **opts)
                torch.autograd.grad(out, (q, k, v), do)

            try:
                ms = triton.testing.do_bench(step, warmup=10, rep=40)
                row = {
                    "kernel": kernel,
                    "causal": causal,
                    "tile": tile,
                    "walk_tiles": walk,
                    "warps": warps,
                    "ms": round(ms, 3),
                    "regs_spills": compile_report(ft),
                }
            except Exception as exc:  # a geometry the compiler rejects (e.g. shared memory): record it
                row = {
                    "kernel": kernel,
                    "causal": causal,
                    "tile": tile,
                    "walk_tiles": walk,
                    "warps": warps,
                    "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.environ.pop("FAVOR_TRITON_CFG", None)
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "shape": {"B": b, "H": args.heads, "L": length, "D": args.dim, "M": args.features, "dtype": "bf16"},
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'case':<16}{'best ms':>9}  setting")
    for kernel, causal in itertools.product(("softmax", "relu"), (False, True)):
        ok = [r for r in rows if r["kernel"] == kernel and r["causal"] == causal and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(
                f"{kernel + ('-causal' if causal else '-bid'):<16}{best['ms']:>9.3f}  tile {best['tile']}"
                f" walk {best['walk_tiles']} warps {best['warps']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
