"""Per-kernel time and compiler report of the fused FAVOR+ Triton kernels (a tuning tool).

Runs forward+backward of ``favor_attention_triton`` for each (kernel, causal) at one shape, times every
GPU kernel it launches with ``torch.profiler`` (CUDA time per launch, averaged over ``--reps`` steps)
and records each Triton kernel's registers / spilled values. Prints a table last, writes JSON.
Needs a CUDA GPU.

    python -m bench.profile_kernels --out prof.json               # B*L = 65,536, H 8, d 64, m 256, bf16
    python -m bench.profile_kernels --cases softmax-bid --reps 3  # one case (e.g. under ncu)
    python -m bench.profile_kernels --impl old_favor_triton.py    # another version of the module, side by side
    python -m bench.profile_kernels --splits 256 512              # also with these rows per program
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
from pathlib import Path

import torch

from bench.shapes import add_shape_args, compile_report, record_launches

CASES = ("softmax-bid", "relu-bid", "softmax-causal", "relu-causal")


def load_impl(path: str):
    """The kernels module: the installed one, or a copy of it at ``path`` (an older version)."""
    if not path:
        from protein_lm.attention.kernels import favor_triton

        return favor_triton
    # The kernels register their torch ops under one fixed name; a second copy takes its own.
    source = Path(path).read_text().replace('_OP = "favor_triton"', '_OP = "favor_triton_impl"')
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(source, path, "exec"), mod.__dict__)
    return mod


def profile_case(
    ft,
    case: str,
    length: int,
    tokens: int,
    heads: int,
    dim: int,
    feats: int,
    reps: int,
    split: int | None = None,
    tile: int = 64,
    slice_m: int | None = None,
    logit_precision: str | None = None,
    deterministic: bool = False,
) -> dict:
    record_launches(ft).clear()
    kernel, mode = case.split("-")
    causal = mode == "causal"
    b = max(1, tokens // length)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(b, heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        for _ in range(3)
    )
    proj = torch.randn(feats, dim, device="cuda", generator=g)
    do = torch.randn(b, heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        opts = {"tile": tile, "slice_m": slice_m}
        if logit_precision:  # only modules that have the knob (not the older copies)
            opts["logit_precision"] = logit_precision
        if deterministic:
            opts["deterministic"] = True
        if split:
            opts["walk_split" if causal else "state_split"] = split
        out = ft.favor_attention_triton(q, k, v, proj, kernel, causal, None, 1e-6, **opts)
        out.backward(do)
        for t in (q, k, v):
            t.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time / 1000.0 / reps  # ms per step
    report = compile_report(ft)
    return {
        "case": case,
        "split": split,
        "tile": tile,
        "slice_m": slice_m,
        "logit_precision": logit_precision or "default",
        "deterministic": deterministic,
        "cfg": os.environ.get("FAVOR_TRITON_CFG", "default"),
        "L": length,
        "B": b,
        "kernels_ms": dict(per),
        "total_ms": sum(per.values()),
        "regs_spills": report,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--impl", default="", help="path of another favor_triton.py to profile instead")
    p.add_argument(
        "--splits", type=int, nargs="*", default=[], help="rows per program to try besides the default"
    )
    p.add_argument(
        "--cfgs", nargs="*", default=[], help='launch configs "warps,stages" (FAVOR_TRITON_CFG) to try'
    )
    p.add_argument("--geoms", nargs="*", default=[], help='"tile,slice_m,warps" geometries to try')
    p.add_argument(
        "--logit-precisions", nargs="*", default=[], help='also profile these ("bf16", "split", "tf32")'
    )
    p.add_argument("--deterministic", action="store_true", help="also profile deterministic=True")
    p.add_argument("--out", default="")
    a = p.parse_args()
    ft = load_impl(a.impl)
    shape = (a.length, a.tokens, a.heads, a.dim, a.features, a.reps)
    res = []
    runs = [(cfg, 64, None) for cfg in a.cfgs or [None]]
    for g in a.geoms:
        tile, bm, warps = (int(x) for x in g.split(","))
        runs.append((f"{warps},1", tile, bm))
    for cfg, tile, bm in runs:
        if cfg:
            os.environ["FAVOR_TRITON_CFG"] = cfg
        for c in a.cases:
            variants = [(s, None, False) for s in [None, *a.splits]]
            variants += [(None, lp, False) for lp in a.logit_precisions]
            variants += [(None, None, True)] if a.deterministic else []
            for s, lp, det in variants:
                try:
                    kw = dict(split=s, tile=tile, slice_m=bm, logit_precision=lp, deterministic=det)
                    res.append(profile_case(ft, c, *shape, **kw))
                except Exception as err:  # e.g. a config that needs more shared memory than the GPU has
                    res.append(
                        {"case": c, "split": s, "cfg": cfg, "error": f"{type(err).__name__}: {err}"[:300]}
                    )
                    print(c, s, cfg, res[-1]["error"], flush=True)
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {"gpu": torch.cuda.get_device_name(), "impl": a.impl or "installed", "results": res}, indent=1
            )
        )
    for r in res:
        if "error" in r:
            continue
        print(
            f"\n{r['case']} split={r['split'] or 'default'} logits={r['logit_precision']} det={r['deterministic']} cfg={r['cfg']}  L={r['L']} B={r['B']}  total {r['total_ms']:.3f} ms"
        )
        for name, ms in sorted(r["kernels_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {ms:8.3f} ms  {name[:70]}")
        for name, (regs, sp) in r["regs_spills"].items():
            print(f"  {name:22s} regs {regs:4d} spills {sp:5d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
