"""Model-level training throughput: tokens/s and peak memory of one optimiser step (fwd+bwd+AdamW).

The benchmark model (6 layers, d 512, 8 heads, d_ff 2048, bf16 autocast) built from
``protein_lm.model.ProteinLM``, Performer (FAVOR+ softmax, Triton backend) vs exact (SDPA with its
default backend choice; the backend that ran is recorded as ``backend_ran``; ``exact-flex``: the
model's packed-row path, FlexAttention, with one segment per row), at
fixed shapes ``L x batch``; the longest lengths optionally with activation checkpointing (each
block recomputed in backward). Needs a CUDA GPU.

    python -m bench.model --out results/model_h100.json
    python -m bench.model --longest --out results/model_longest_h100.json

``--longest`` searches, for each model and checkpointing choice, the longest batch-1 sequence that
trains: it doubles L until a step runs out of GPU memory, or until a step's time, measured or
predicted from the last length (x2 per doubling for Performer, x4 for exact), passes
``--max-step-s``. The JSON is rewritten after every try.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

from bench import exact_baselines

# (attention, L, batch, checkpointing)
DEFAULT_RUNS = [
    ("exact", 1024, 32, False),
    ("exact-flex", 1024, 32, False),
    ("performer-softmax", 1024, 32, False),
    ("exact", 8192, 4, False),
    ("exact-flex", 8192, 4, False),
    ("performer-softmax", 8192, 4, False),
    ("exact", 32768, 1, False),
    ("performer-softmax", 32768, 1, False),
    ("exact", 131072, 1, False),
    ("performer-softmax", 131072, 1, False),
    ("performer-softmax", 262144, 1, False),
    ("performer-softmax", 1048576, 1, True),
]
# with --compile: these also run through ProteinLM.compiled(mode) (what `fit --model.compile MODE`
# uses): "default" (Inductor, one graph per pass) and "reduce-overhead" (the same in CUDA graphs)
COMPILED_RUNS = [
    ("exact", 8192, 4, False, "default"),
    ("performer-softmax", 8192, 4, False, "default"),
    ("exact", 8192, 4, False, "reduce-overhead"),
    ("performer-softmax", 8192, 4, False, "reduce-overhead"),
    ("performer-softmax", 131072, 1, False, "default"),
    ("performer-softmax", 131072, 1, False, "reduce-overhead"),
]


# (attention, checkpointing, first L) of the --longest search
LONGEST_SEARCH = [
    ("performer-softmax", False, 262144),
    ("performer-softmax", True, 1048576),
    ("exact", False, 262144),
    ("exact", True, 524288),
]
# step time per doubling of L: linear attention, quadratic attention
GROWTH = {"exact": 4.0}


def longest(run, attention: str, ckpt: bool, start: int, max_step_s: float, max_len: int) -> list[dict]:
    """Doubles L from ``start`` while ``run(attention, L, ckpt)`` (a result dict with ``step_s``;
    raises when L does not fit in GPU memory) succeeds. Stops on out-of-memory, at ``max_len``, after
    a step slower than ``max_step_s``, or before a length whose predicted step time passes it.
    Returns every try; the last one says why the search stopped (``stop``); the longest success is
    marked ``longest``."""
    tries: list[dict] = []
    length = start
    while True:
        if length > max_len:
            stop = f"L > --max-L {max_len}"
            break
        if tries:
            predicted = tries[-1]["step_s"] * GROWTH.get(attention, 2.0)
            if predicted > max_step_s:
                stop = f"predicted step {predicted:.0f} s > --max-step-s {max_step_s:g}"
                break
        try:
            r = run(attention, length, ckpt)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            stop = f"OOM at L={length}: " + str(e).split("\n")[0][:160]
            break
        tries.append(r)
        length *= 2
        if r["step_s"] > max_step_s:
            stop = f"step {r['step_s']:.0f} s > --max-step-s {max_step_s:g}"
            break
    if tries:
        tries[-1]["longest"] = True
    tries.append({"attention": attention, "checkpointing": ckpt, "L": length, "stop": stop})
    return tries


def _out_of_memory(e: Exception) -> bool:
    """The allocator's error, or a library's failed allocation (e.g. cuBLAS) that says so."""
    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _checkpointed(model):
    """Wrap each block so its activations are recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    for blk in model.blocks:
        fwd = blk.forward

        def wrapped(*a, _f=fwd, **kw):
            return checkpoint(_f, *a, use_reentrant=False, **kw)

        blk.forward = wrapped
    return model


def run_one(attention, length, batch, ckpt, steps, warmup, causal=False, compiled=None):
    """One timed setting; ``compiled``: ``None`` (eager) or a ``torch.compile`` mode."""
    from protein_lm.model import ModelConfig, ProteinLM

    torch.cuda.empty_cache()
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=512,
        depth=6,
        heads=8,
        ff_dim=2048,
        attention="exact" if attention == "exact-flex" else attention,
        num_features=256,
        causal=causal,
        max_length=length,
        favor_backend="triton" if attention.startswith("performer") else "auto",
    )
    model = ProteinLM(cfg).cuda()
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    if ckpt:
        _checkpointed(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = model.compiled(None if compiled == "default" else compiled) if compiled else model
    ids = torch.randint(4, 24, (batch, length), device="cuda")
    labels = torch.randint(4, 24, (batch, length), device="cuda")
    # exact-flex: one segment per row, so the model's packed-row path (FlexAttention) runs full attention
    segments = {"segment_ids": torch.zeros_like(ids, dtype=torch.int32)} if attention == "exact-flex" else {}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(ids, **segments).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # peak counted from before the warm-up: CUDA graphs allocate their memory pool while recording
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 1e9
    out = {
        "attention": attention,
        "L": length,
        "batch": batch,
        "checkpointing": ckpt,
        "causal": causal,
        "compiled": compiled,
        "step_s": dt,
        "tokens_per_s": batch * length / dt,
        "peak_GB": peak,
        "loss": loss.item(),
    }
    if attention == "exact":  # SDPA's default choice inside the model: record which backend ran
        out["backend_ran"] = exact_baselines.sdpa_backend_ran(step)
    if compiled:  # one graph per pass is the goal; breaks cost host time
        counters = torch._dynamo.utils.counters
        out["graphs"] = counters["stats"]["unique_graphs"]
        out["graph_breaks"] = sum(counters["graph_break"].values())
    return out


def _info() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bf16 autocast",
        "model": "6 layers, d 512, 8 heads, d_ff 2048, M 256, rotary",
        "optimizer": "AdamW (fused)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
    }


def _write(args, doc: dict) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))


def main_longest(args) -> None:
    """The longest batch-1 sequence that trains, per model and checkpointing (one step timed)."""

    info, done = _info(), []

    def run(attention, length, ckpt):
        try:
            r = run_one(attention, length, 1, ckpt, steps=1, warmup=1)
        finally:  # a failed try's tensors must not crowd the next one
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        done.append(r)
        _write(args, {"info": info, "results": done})  # kept if a later try crashes
        return r

    results = []
    for attention, ckpt, start in LONGEST_SEARCH:
        results += longest(run, attention, ckpt, start, args.max_step_s, args.max_L)
        print(json.dumps(results[-1]), flush=True)
    _write(args, {"info": info, "results": results})
    print(f"\n{torch.cuda.get_device_name()}  longest batch-1 sequence that trains (one step, bf16)")
    print(f"{'attention':20s}{'ckpt':>6s}{'longest L':>11s}{'tok/s':>10s}{'peak GB':>9s}  stopped")
    for attention, ckpt, _ in LONGEST_SEARCH:
        rows = [r for r in results if r["attention"] == attention and r["checkpointing"] == ckpt]
        best = next((r for r in rows if r.get("longest")), None)
        size = (
            f"{best['L']:>11d}{best['tokens_per_s'] / 1e3:>9.0f}k{best['peak_GB']:>9.1f}"
            if best
            else " " * 29
        )
        print(f"{attention:20s}{str(ckpt):>6s}{size}  {rows[-1]['stop']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-L", type=int, default=1 << 21)
    p.add_argument("--compile", action="store_true", help="also time COMPILED_RUNS (torch.compile modes)")
    p.add_argument("--only-compiled", action="store_true", help="time only COMPILED_RUNS, compiled")
    p.add_argument("--longest", action="store_true", help="only the longest-sequence search (batch 1)")
    p.add_argument("--max-step-s", type=float, default=30.0, help="--longest: the slowest step to try")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.longest:
        return main_longest(args)
    info = _info()
    results = []
    runs = [] if args.only_compiled else [(*r, None) for r in DEFAULT_RUNS]
    if args.compile or args.only_compiled:
        runs += COMPILED_RUNS
    for attention, length, batch, ckpt, compiled in runs:
        if length > args.max_L:
            continue
        try:
            r = run_one(attention, length, batch, ckpt, args.steps, args.warmup, compiled=compiled)
        except torch.cuda.OutOfMemoryError as e:
            r = {
                "attention": attention,
                "L": length,
                "batch": batch,
                "checkpointing": ckpt,
                "compiled": compiled,
                "error": "OOM: " + str(e).split("\n")[0][:120],
            }
        except Exception as e:
            r = {
                "attention": attention,
                "L": length,
                "batch": batch,
                "checkpointing": ckpt,
                "compiled": compiled,
                "error": f"{type(e).__name__}: {str(e)[:200]}",
            }
        torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)
    _write(args, {"info": info, "results": results})
    print(f"\n{info['gpu']}  training step (fwd+bwd+AdamW), bf16")
    print(
        f"{'attention':20s}{'L':>9s}{'batch':>6s}{'ckpt':>6s}{'compiled':>17s}{'tok/s':>12s}{'peak GB':>9s}"
    )
    for r in results:
        tps = f"{r['tokens_per_s'] / 1e3:.0f}k" if "tokens_per_s" in r else r["error"][:10]
        pk = f"{r['peak_GB']:.1f}" if "peak_GB" in r else "-"
        print(
            f"{r['attention']:20s}{r['L']:>9d}{r['batch']:>6d}{str(r['checkpointing']):>6s}"
            f"{r.get('compiled') or 'eager':>17s}{tps:>12s}{pk:>9s}  {r.get('backend_ran', '')}"
        )


if __name__ == "__main__":
    main()
