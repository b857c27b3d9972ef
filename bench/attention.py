"""Attention-op benchmark: FAVOR+ (ours: Triton and PyTorch paths) vs exact attention vs performer-pytorch.

Exact attention is timed as a user gets it: SDPA with its default backend choice (the backend that
ran is read off the kernel names and recorded as ``backend_ran``), each SDPA backend forced, and
compiled FlexAttention (bench/exact_baselines.py). Ratios in the docs are against the fastest exact.

Forward+backward of the attention op alone at fixed B*L tokens (default 65,536), 8 heads, d=64,
m=256 features, bf16, for L = 1k...64k: median time (``triton.testing.do_bench``) and peak extra
memory (peak allocated during one fwd+bwd minus what the inputs and output gradient hold).
Writes JSON (and prints a table last). Needs a CUDA GPU.

    python -m bench.attention --out results/attention_h100.json
    python -m bench.attention --plot results/attention_h100.json   # log-log figure (CPU ok)

performer-pytorch is optional (``pip install performer-pytorch``); methods that are not
importable are skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

from bench import exact_baselines

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


# ------------------------------------------------------------------------------------------ methods
def _ours_triton(kernel, causal, **opts):
    from protein_lm.attention.kernels.favor_triton import favor_attention_triton

    def fn(q, k, v, proj):
        return favor_attention_triton(q, k, v, proj, kernel, causal, None, 1e-6, **opts)

    return fn


def packed_segments(b: int, length: int, seed: int = 0) -> torch.Tensor:
    """``(B, L)`` int32 segment ids of rows filled with protein-like lengths (log-normal, median 300,
    capped at L); the last protein of a row is cut to fill it, so rows hold no padding tail."""
    gen = torch.Generator().manual_seed(seed)
    seg = torch.empty(b, length, dtype=torch.int32)
    for row in range(b):
        pos, sid = 0, 0
        while pos < length:
            n = int(torch.empty(1).log_normal_(5.7, 0.6, generator=gen).clamp(2, length).item())
            n = min(n, length - pos)
            seg[row, pos : pos + n] = sid
            pos, sid = pos + n, sid + 1
    return seg


def _ours_triton_packed(kernel, causal):
    from protein_lm.attention.kernels.favor_triton import favor_attention_triton

    cache = {}

    def fn(q, k, v, proj):
        key = (q.shape[0], q.shape[2])
        if key not in cache:
            cache[key] = packed_segments(*key).to(q.device)
        return favor_attention_triton(q, k, v, proj, kernel, causal, None, 1e-6, segment_ids=cache[key])

    return fn


def _flex_packed(causal):
    cache = {}

    def fn(q, k, v, proj):
        key = (q.shape[0], q.shape[2])
        if key not in cache:
            cache[key] = exact_baselines.flex_documents(packed_segments(*key).to(q.device), causal)[0]
        return cache[key](q, k, v, proj)

    return fn


def _ours_torch(kernel, causal):
    from protein_lm.attention.favor import favor_bidirectional, favor_causal, favor_features

    def fn(q, k, v, proj):
        pq, pk = favor_features(q, k, proj, kernel)
        out = favor_causal(pq, pk, v) if causal else favor_bidirectional(pq, pk, v)
        return out.to(v.dtype)

    return fn


def _ours_compiled(kernel, causal):
    return torch.compile(_ours_torch(kernel, causal), dynamic=False)


def _performer_pytorch(kernel, causal):
    try:
        import distutils.version  # noqa: F401  (performer-pytorch imports it; gone in Python 3.12)
    except Exception:
        import types

        from packaging.version import Version

        mod = types.ModuleType("distutils.version")
        mod.LooseVersion = lambda s: Version(str(s).split("+")[0])
        sys.modules.setdefault("distutils", types.ModuleType("distutils"))
        sys.modules["distutils.version"] = mod
    from performer_pytorch.performer_pytorch import FastAttention

    cache = {}

    def fn(q, k, v, proj):
        key = (q.device, q.shape[-1])
        if key not in cache:
            att = FastAttention(
                q.shape[-1], nb_features=proj.shape[0], causal=causal, generalized_attention=kernel == "relu"
            ).to(q.device)
            cache[key] = att
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return cache[key](q, k, v)

    return fn


def methods(args):
    out = {}
    for causal in (False, True):
        tag = "causal" if causal else "bid"
        # exact: SDPA's default backend choice (what a user gets; the backend that ran is recorded),
        # each backend forced for comparison, and compiled FlexAttention
        out[f"sdpa_default/{tag}"] = lambda c=causal: exact_baselines.sdpa_default(c)
        for backend in ("cudnn", "flash", "efficient"):
            out[f"sdpa_{backend}_forced/{tag}"] = lambda b_=backend, c=causal: exact_baselines.sdpa_forced(b_, c)
        out[f"flex/{tag}"] = lambda c=causal: exact_baselines.flex(c)
        # packed rows (proteins of median length 300, attention inside each): exact with a document
        # mask vs our segment-aware kernels, at the same tokens
        out[f"flex_packed/{tag}"] = lambda c=causal: _flex_packed(c)
        out[f"ours_triton_softmax_packed/{tag}"] = lambda c=causal: _ours_triton_packed("softmax", c)
        for kernel in ("softmax", "relu"):
            out[f"ours_triton_{kernel}/{tag}"] = lambda k_=kernel, c=causal: _ours_triton(k_, c)
        # opt-in variants: one bf16 product for the logits; causal without atomics (reproducible)
        out[f"ours_triton_softmax_bf16logits/{tag}"] = lambda c=causal: _ours_triton(
            "softmax", c, logit_precision="bf16"
        )
        if causal:
            out["ours_triton_softmax_deterministic/causal"] = lambda: _ours_triton(
                "softmax", True, deterministic=True
            )
        out[f"ours_torch_softmax/{tag}"] = lambda c=causal: _ours_torch("softmax", c)
        if args.performer:
            out[f"performer_pytorch_softmax/{tag}"] = lambda c=causal: _performer_pytorch("softmax", c)
    return out


# ------------------------------------------------------------------------------------------ measure
def measure(fn, b, h, length, d, m, dtype, warmup, rep, record_backend=False):
    from triton.testing import do_bench

    dev = "cuda"
    torch.cuda.empty_cache()
    q, k, v = (torch.randn(b, h, length, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    proj = torch.randn(m, d, device=dev)
    grad = torch.randn(b, h, length, d, device=dev, dtype=dtype)

    def step():
        out = fn(q, k, v, proj)
        out.backward(grad)

    step()  # compile / warm
    torch.cuda.synchronize()
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # the three input gradients are outputs, not scratch: report them apart
    grads_bytes = 3 * q.numel() * q.element_size()
    ms = do_bench(step, warmup=warmup, rep=rep, grad_to_none=[q, k, v], return_mode="median")
    backend = exact_baselines.sdpa_backend_ran(step) if record_backend else None
    return ms, peak / 1e9, (peak - grads_bytes) / 1e9, backend


def ceilings():
    """Measured copy bandwidth (bytes read+written) and bf16 matmul rate on this GPU."""
    from triton.testing import do_bench

    x = torch.randn(2**28, device="cuda", dtype=torch.float16)  # 512 MB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    bw = 2 * x.numel() * 2 / ms / 1e9  # TB/s
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms2 = do_bench(lambda: a @ bm, warmup=25, rep=200, return_mode="median")
    tf = 2 * 8192**3 / ms2 / 1e9
    return {"copy_TBps": bw, "bf16_matmul_TFLOPs": tf}


def floor_ms(tokens, h, d, m, ceil):
    """FLOP and byte floor of FAVOR+ fwd+bwd (bid): 12 products of (tokens*h) x D x M, bf16 tensors."""
    flop = 12 * 2 * tokens * h * d * m
    # read q,k,v (fwd), write o; read q,k,v,o,do (bwd), write dq,dk,dv: 12 tensors of bf16
    bytes_ = 12 * tokens * h * d * 2
    return {
        "gflop": flop / 1e9,
        "gbytes": bytes_ / 1e9,
        "compute_ms": flop / (ceil["bf16_matmul_TFLOPs"] * 1e12) * 1e3,
        "memory_ms": bytes_ / (ceil["copy_TBps"] * 1e12) * 1e3,
    }


def run(args):
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    import triton

    info = {
        "gpu": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "tokens": args.tokens,
        "heads": args.heads,
        "dim_head": args.dim,
        "features": args.features,
        "dtype": "bfloat16",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    info["ceilings"] = ceilings()
    info["floor"] = floor_ms(args.tokens, args.heads, args.dim, args.features, info["ceilings"])
    print(json.dumps(info), flush=True)
    results = []
    meths = methods(args)
    if args.only:
        meths = {k: v for k, v in meths.items() if any(s in k for s in args.only.split(","))}
    for name, make in meths.items():
        try:
            fn = make()
        except Exception as e:  # not installed
            results.append({"method": name, "error": f"{type(e).__name__}: {e}"})
            print(name, "unavailable:", e, flush=True)
            continue
        for length in args.lengths:
            if "performer" in name and "causal" in name and length > args.performer_causal_max:
                continue
            if "flex" in name:
                # a fresh compile per shape: past torch.compile's recompile limit, flex_attention
                # silently runs its unfused reference (it materialises the scores)
                torch._dynamo.reset()
            b = max(1, args.tokens // length)
            row = {"method": name, "L": length, "B": b}
            try:
                ms, peak, scratch, backend = measure(
                    fn, b, args.heads, length, args.dim, args.features, torch.bfloat16, args.warmup, args.rep,
                    record_backend=name.startswith("sdpa"),
                )
                row.update(ms=ms, peak_extra_GB=peak, scratch_GB=scratch)
                if backend:
                    row["backend_ran"] = backend
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = "OOM: " + str(e).split("\n")[0][:120]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), flush=True)
    doc = {"info": info, "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print_table(doc)
    return doc


def print_table(doc):
    res = [r for r in doc["results"] if "L" in r]
    names = list(dict.fromkeys(r["method"] for r in res))
    lengths = sorted({r["L"] for r in res})
    print(f"\n{doc['info']['gpu']}  fwd+bwd ms (peak extra GB)  B*L={doc['info']['tokens']}")
    print("method".ljust(40) + "".join(f"{n:>22}" for n in lengths))
    for n in names:
        cells = []
        for length in lengths:
            r = next((r for r in res if r["method"] == n and r["L"] == length), None)
            if r is None:
                cells.append("-")
            elif "ms" in r:
                mem = f" ({r['peak_extra_GB']:.2f})" if "peak_extra_GB" in r else ""
                ran = f" {r['backend_ran']}" if n.startswith("sdpa_default") and "backend_ran" in r else ""
                cells.append(f"{r['ms']:.2f}{mem}{ran}")
            else:
                cells.append("OOM" if r["error"].startswith("OOM") else "err")
        print(n.ljust(40) + "".join(f"{c:>22}" for c in cells))
    for tag in ("bid", "causal"):
        print(f"speed-up of ours_triton_softmax/{tag} over the fastest exact (which):")
        for length in lengths:
            best = fastest_exact(res, tag, length)
            ours = next((r for r in res if r["method"] == f"ours_triton_softmax/{tag}" and r["L"] == length), None)
            if best and ours and "ms" in ours:
                print(f"  L={length:>6}: {best['ms'] / ours['ms']:.2f}x ({best['method']}, {best['ms']:.2f} ms)")
        for length in lengths:
            flex_p = next((r for r in res if r["method"] == f"flex_packed/{tag}" and r["L"] == length), None)
            ours_p = next((r for r in res if r["method"] == f"ours_triton_softmax_packed/{tag}" and r["L"] == length),
                          None)
            if flex_p and ours_p and "ms" in flex_p and "ms" in ours_p:
                print(f"  packed rows, L={length:>6}: {flex_p['ms'] / ours_p['ms']:.2f}x over flex_packed "
                      f"({flex_p['ms']:.2f} ms vs {ours_p['ms']:.2f} ms)")


def fastest_exact(results, tag, length):
    """The quickest exact-attention row (any SDPA backend or FlexAttention) at one shape."""
    rows = [
        r
        for r in results
        if r["L"] == length and "ms" in r and r["method"].endswith("/" + tag)
        and r["method"].split("/")[0].startswith(("sdpa", "flex"))
        and "_packed" not in r["method"]
    ]
    return min(rows, key=lambda r: r["ms"], default=None)


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(path).read_text())
    res = [r for r in doc["results"] if "ms" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, tag in zip(axes, ("bid", "causal"), strict=False):
        for n in dict.fromkeys(r["method"] for r in res):
            if not n.endswith("/" + tag):
                continue
            rows = sorted((r for r in res if r["method"] == n), key=lambda r: r["L"])
            ax.plot([r["L"] for r in rows], [r["ms"] for r in rows], marker="o", label=n.split("/")[0])
        fl = doc["info"]["floor"]
        ax.axhline(max(fl["compute_ms"], fl["memory_ms"]), color="k", ls=":", lw=1, label="floor (bid)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (B*L fixed)")
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.set_title(f"{'bidirectional' if tag == 'bid' else 'causal'}: {doc['info']['gpu']}, bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    print("wrote", out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--only", default="", help="comma-separated substrings of method names")
    p.add_argument("--performer", action="store_true", help="include performer-pytorch")
    p.add_argument("--performer-causal-max", type=int, default=65536)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="", help="only draw the figure of an existing JSON")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    run(args)


if __name__ == "__main__":
    main()
