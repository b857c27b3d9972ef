"""FAVOR+ approximation study (Choromanski et al. 2021, Sec. 4.1 / Fig. 3-4 style), CPU, float64.

How well do random features approximate exact softmax attention as the number of features m grows,
for orthogonal vs iid projections and positive (FAVOR+) vs trigonometric (sin/cos, "FAVOR" of the
first Performer version) features?

Setup: queries and keys ~ N(0, sigma^2 I_d), values ~ N(0, I_d), L = 512 tokens, one head, float64.
For each (d, sigma, m, method, seed) a fresh projection (and fresh inputs per seed) is drawn and
three errors are recorded against exact softmax attention with scale 1/sqrt(d):

* ``attn_mse``: mean squared error of the row-normalised attention matrix (the paper's metric);
* ``out_rel_err``: ||A_hat V - A V||_F / ||A V||_F, the error of the attention output;
* ``kernel_relerr_small`` / ``kernel_relerr_large``: root-mean-square relative error
  |K_hat - K| / K of the unnormalised kernel exp(q.k/sqrt(d)) over the 10% of (q, k) pairs with the
  smallest / largest exact value (where the paper says positive features beat trigonometric ones).

Feature counts are matched: "m" is the feature dimension, so trigonometric features use m/2
frequencies (sin and cos of each), positive features m projections.

    python -m bench.experiments.approximation            # ~1 minute on 2 CPU cores

Writes results/approximation.json and results/approximation.png; prints a table last.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from protein_lm.attention import draw_projection, softmax_features

RESULTS = Path(__file__).resolve().parents[2] / "results"
DIMS = (16, 64)
SIGMAS = (0.5, 1.0)
FEATURES = (16, 32, 64, 128, 256, 512)
METHODS = ("positive-orthogonal", "positive-iid", "trig-orthogonal", "trig-iid")
SEEDS = 8
LENGTH = 512
METRICS = ("attn_mse", "out_rel_err", "kernel_relerr_small", "kernel_relerr_large")


def trig_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``exp(|x'|^2/2) [sin(W x'), cos(W x')] / sqrt(m)``; ``E[phi(q).phi(k)] = exp(q.k/sqrt(d))``."""
    xs = x * x.shape[-1] ** -0.25
    u = xs @ w.T
    scale = torch.exp(0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])
    return scale * torch.cat([torch.sin(u), torch.cos(u)], dim=-1)


def make_inputs(d: int, sigma: float, seed: int) -> dict[str, torch.Tensor]:
    """Inputs and everything exact about them (shared by all methods and feature counts)."""
    g = torch.Generator().manual_seed(1000 * seed + d + int(100 * sigma))
    q = sigma * torch.randn(LENGTH, d, generator=g, dtype=torch.float64)
    k = sigma * torch.randn(LENGTH, d, generator=g, dtype=torch.float64)
    v = torch.randn(LENGTH, d, generator=g, dtype=torch.float64)
    logits = q @ k.T / math.sqrt(d)
    attn = torch.softmax(logits, dim=-1)
    order = torch.argsort(logits.flatten())
    tenth = len(order) // 10
    return {
        "q": q,
        "k": k,
        "v": v,
        "kern": torch.exp(logits),
        "attn": attn,
        "out": attn @ v,
        "small": order[:tenth],
        "large": order[-tenth:],
    }


def one_run(x: dict[str, torch.Tensor], m: int, method: str, seed: int) -> dict[str, float]:
    q, k, v, kern, attn, out = x["q"], x["k"], x["v"], x["kern"], x["attn"], x["out"]
    d = q.shape[-1]
    gw = torch.Generator().manual_seed(7919 * seed + 31 * m + d + (0 if "orth" in method else 17))
    orthogonal = method.endswith("orthogonal")
    if method.startswith("positive"):
        w = draw_projection(m, d, orthogonal, generator=gw, dtype=torch.float64)
        pq = softmax_features(q[None, None], w, is_query=True, stabilize=False)[0, 0]
        pk = softmax_features(k[None, None], w, is_query=False, stabilize=False)[0, 0]
    else:
        w = draw_projection(m // 2, d, orthogonal, generator=gw, dtype=torch.float64)
        pq, pk = trig_features(q, w), trig_features(k, w)
    kern_hat = pq @ pk.T
    attn_hat = kern_hat / kern_hat.sum(-1, keepdim=True)
    out_hat = attn_hat @ v
    rel = ((kern_hat - kern) / kern).flatten()
    return {
        "attn_mse": (attn_hat - attn).square().mean().item(),
        "out_rel_err": ((out_hat - out).norm() / out.norm()).item(),
        "kernel_relerr_small": rel[x["small"]].square().mean().sqrt().item(),
        "kernel_relerr_large": rel[x["large"]].square().mean().sqrt().item(),
    }


def _finite_mean(xs: list[float]) -> tuple[float, float, int]:
    ok = [x for x in xs if math.isfinite(x)]
    if not ok:
        return math.nan, math.nan, 0
    mean = sum(ok) / len(ok)
    std = math.sqrt(sum((x - mean) ** 2 for x in ok) / max(1, len(ok) - 1))
    return mean, std, len(ok)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (
        ("attn_mse", "attention-matrix MSE"),
        ("out_rel_err", "output relative error"),
        ("kernel_relerr_small", "kernel rel. error,\nsmallest 10% of exp(q.k/sqrt d)"),
    )
    cols = [(d, s) for d in DIMS for s in SIGMAS]
    styles = {
        "positive-orthogonal": ("tab:blue", "-", "o"),
        "positive-iid": ("tab:blue", "--", "s"),
        "trig-orthogonal": ("tab:red", "-", "o"),
        "trig-iid": ("tab:red", "--", "s"),
    }
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.2 * len(cols), 3.3 * len(rows)), squeeze=False)
    for i, (metric, label) in enumerate(rows):
        for j, (d, sigma) in enumerate(cols):
            ax = axes[i][j]
            for method in METHODS:
                pts = [r for r in summary if r["d"] == d and r["sigma"] == sigma and r["method"] == method]
                pts.sort(key=lambda r: r["m"])
                xs = [r["m"] for r in pts if math.isfinite(r[metric]["mean"])]
                ys = [r[metric]["mean"] for r in pts if math.isfinite(r[metric]["mean"])]
                es = [r[metric]["std"] for r in pts if math.isfinite(r[metric]["mean"])]
                lo = [max(y - e, y * 0.05) for y, e in zip(ys, es, strict=True)]
                color, ls, mk = styles[method]
                ax.plot(xs, ys, color=color, linestyle=ls, marker=mk, markersize=4, label=method)
                ax.fill_between(xs, lo, [y + e for y, e in zip(ys, es, strict=True)], color=color, alpha=0.08)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                ax.set_title(f"d = {d}, q,k ~ N(0, {sigma}^2 I)")
            if i == len(rows) - 1:
                ax.set_xlabel("number of random features m")
            if j == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"FAVOR+ vs exact softmax attention, L = {LENGTH}, mean ± std over {SEEDS} seeds (float64, CPU)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # small ops: threading only adds barrier latency (badly so on a busy host)
    raw = []
    for d in DIMS:
        for sigma in SIGMAS:
            for seed in range(SEEDS):
                x = make_inputs(d, sigma, seed)
                for m in FEATURES:
                    for method in METHODS:
                        rec = {"d": d, "sigma": sigma, "m": m, "method": method, "seed": seed}
                        raw.append(rec | one_run(x, m, method, seed))
    summary = []
    for d in DIMS:
        for sigma in SIGMAS:
            for m in FEATURES:
                for method in METHODS:
                    rs = [
                        r for r in raw if (r["d"], r["sigma"], r["m"], r["method"]) == (d, sigma, m, method)
                    ]
                    rec = {"d": d, "sigma": sigma, "m": m, "method": method}
                    for metric in METRICS:
                        mean, std, n = _finite_mean([r[metric] for r in rs])
                        rec[metric] = {"mean": mean, "std": std, "finite_runs": n}
                    summary.append(rec)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (1 torch thread)",
        "torch": torch.__version__,
        "dtype": "float64",
        "length": LENGTH,
        "seeds": SEEDS,
        "command": "python -m bench.experiments.approximation",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (RESULTS / "approximation.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    plot(summary, RESULTS / "approximation.png")

    print(f"{meta['machine']}, torch {meta['torch']}, {meta['seconds']} s; mean over {SEEDS} seeds")
    for metric in ("attn_mse", "kernel_relerr_small"):
        print(f"\n{metric}")
        print(f"{'d':>3} {'sigma':>5} {'m':>4} " + " ".join(f"{m:>20}" for m in METHODS))
        for d in DIMS:
            for sigma in SIGMAS:
                for m in FEATURES:
                    vals = [
                        next(
                            r
                            for r in summary
                            if (r["d"], r["sigma"], r["m"], r["method"]) == (d, sigma, m, me)
                        )
                        for me in METHODS
                    ]
                    print(
                        f"{d:>3} {sigma:>5} {m:>4} " + " ".join(f"{v[metric]['mean']:>20.3e}" for v in vals)
                    )
    print(f"\nwrote {RESULTS / 'approximation.json'} and {RESULTS / 'approximation.png'}")


if __name__ == "__main__":
    main()
