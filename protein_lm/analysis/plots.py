"""Figures for the attention analysis, benchmarks and training logs (matplotlib Agg + seaborn).

Every function writes (or returns) a figure with titles, axis labels and colour bars, and uses the
fixed residue order ``ARNDCQEGHILKMFPSTWYV`` unless told otherwise. The clustered heatmaps order both
matrices with ONE average-linkage ordering computed on the model's matrix (implemented here in numpy,
so scipy is not needed), so the two panels are directly comparable.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # scripts and CI write files headless; notebooks keep their inline backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from protein_lm.analysis.blosum import blosum62_log2_odds, off_diagonal, pair_labels  # noqa: E402
from protein_lm.data.tokenizer import STANDARD_AA  # noqa: E402

DIVERGING = "RdBu_r"


# ----------------------------------------------------------------------------- clustering
def average_linkage_order(matrix: np.ndarray) -> list[int]:
    """Leaf order of average-linkage (UPGMA) clustering of the rows of ``matrix`` (Euclidean).

    Same method and metric as ``seaborn.clustermap``'s default, without scipy. NaN/inf entries are
    replaced by the row's finite minimum so that a missing pair does not break the clustering.
    At each merge the cluster whose first leaf comes first in the input stays on the left, so the order
    is deterministic.
    """
    x = np.array(matrix, dtype=np.float64)
    n = x.shape[0]
    if n <= 2:
        return list(range(n))
    finite = np.isfinite(x)
    fill = np.nanmin(np.where(finite, x, np.nan)) if finite.any() else 0.0
    x = np.where(finite, x, fill)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    d = {(i, j): dist[i, j] for i in range(n) for j in range(i + 1, n)}
    next_id = n
    while len(clusters) > 1:
        (a, b), _ = min(d.items(), key=lambda kv: (kv[1], kv[0]))
        la, lb = clusters.pop(a), clusters.pop(b)
        merged = la + lb if min(la) < min(lb) else lb + la
        for c in list(clusters):
            lc = clusters[c]
            avg = dist[np.ix_(merged, lc)].mean()
            d[(min(c, next_id), max(c, next_id))] = avg
        d = {k: v for k, v in d.items() if a not in k and b not in k}
        clusters[next_id] = merged
        next_id += 1
    return next(iter(clusters.values()))


# ----------------------------------------------------------------------------- heatmaps
def _heatmap(ax, matrix: np.ndarray, labels: Sequence[str], title: str, cbar_label: str, vmax: float) -> None:
    shown = np.where(np.isfinite(matrix), matrix, np.nan)
    sns.heatmap(
        shown,
        ax=ax,
        cmap=DIVERGING,
        center=0.0,
        vmin=-vmax,
        vmax=vmax,
        square=True,
        xticklabels=list(labels),
        yticklabels=list(labels),
        linewidths=0.3,
        linecolor="white",
        cbar_kws={"label": cbar_label, "shrink": 0.75, "extend": "both"},
    )
    ax.set_title(title, fontsize=12)
    ax.set_xlabel("key residue")
    ax.set_ylabel("query residue")
    ax.tick_params(axis="both", labelsize=10, length=0)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=0)


def _robust_vmax(*matrices: np.ndarray) -> float:
    """Colour limit from the off-diagonal values, so that the (larger) diagonal does not wash them out."""
    vals = np.concatenate([np.abs(off_diagonal(m)) for m in matrices])
    vals = vals[np.isfinite(vals)]
    return float(np.percentile(vals, 99)) if vals.size else 1.0


def plot_similarity_vs_blosum(
    similarity: np.ndarray,
    title: str = "Attention similarity",
    clustered: bool = False,
    scores: dict | None = None,
) -> plt.Figure:
    """Model similarity (log2 odds) beside BLOSUM62/2 (log2 odds), in fixed or clustered order.

    Args:
        similarity: (20, 20) in ``STANDARD_AA`` order.
        title: left panel title (e.g. "layer 3, head 5").
        clustered: order both panels by average linkage of the *model's* matrix.
        scores: optional ``{"pearson", "spearman"}`` shown in the figure title.
    """
    blosum = blosum62_log2_odds()
    order = average_linkage_order(similarity) if clustered else list(range(20))
    labels = [STANDARD_AA[i] for i in order]
    sim = similarity[np.ix_(order, order)]
    ref = blosum[np.ix_(order, order)]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.6))
    _heatmap(axes[0], sim, labels, title, "log2 odds (observed / expected)", max(_robust_vmax(sim), 1e-6))
    _heatmap(axes[1], ref, labels, "BLOSUM62 / 2", "log2 odds", _robust_vmax(ref))
    suptitle = "Amino-acid similarity from attention vs BLOSUM62"
    suptitle += " — clustered by the model's matrix (average linkage)" if clustered else " — fixed order"
    if scores:
        suptitle += f"\nPearson r = {scores['pearson']:.3f}, Spearman ρ = {scores['spearman']:.3f} (190 off-diagonal pairs)"
    fig.suptitle(suptitle, fontsize=13)
    fig.tight_layout()
    return fig


def standardise_off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """z-scores of a (20, 20) matrix's off-diagonal values (diagonal NaN), so matrices of different
    units (a correlation, BLOSUM's half bits) share one colour scale."""
    m = np.array(matrix, dtype=np.float64)
    np.fill_diagonal(m, np.nan)
    vals = m[np.isfinite(m)]
    if vals.size < 2 or vals.std() == 0:
        return m
    return (m - vals.mean()) / vals.std()


def plot_readout_vs_blosum(matrix: np.ndarray, title: str, subtitle: str = "") -> plt.Figure:
    """A 20×20 readout beside BLOSUM62: one colour scale (off-diagonal z-scores), one residue order.

    The order is average-linkage clustering of BLOSUM62, so its blocks (acidic D E, basic K R, aromatic
    F W Y, aliphatic I L M V, ...) sit together and the model's matrix is read against them.
    """
    blosum = blosum62_log2_odds()
    order = average_linkage_order(blosum)
    labels = [STANDARD_AA[i] for i in order]
    left = standardise_off_diagonal(matrix)[np.ix_(order, order)]
    right = standardise_off_diagonal(blosum)[np.ix_(order, order)]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.8))
    _heatmap(axes[0], left, labels, title, "z-score of off-diagonal values", 2.5)
    _heatmap(axes[1], right, labels, "BLOSUM62", "z-score of off-diagonal values", 2.5)
    for ax in axes:
        ax.set_xlabel("residue type")
        ax.set_ylabel("residue type")
    suptitle = "Amino-acid similarity vs BLOSUM62 (same order: clustered BLOSUM62; same colour scale)"
    fig.suptitle(suptitle + (f"\n{subtitle}" if subtitle else ""), fontsize=12)
    fig.tight_layout()
    return fig


def plot_per_layer(curves: dict[str, Sequence[float]], title: str) -> plt.Figure:
    """Pearson r with BLOSUM62 of a per-layer statistic, one line per model (e.g. trained, random seeds)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        random = name.startswith("random")
        ax.plot(
            np.arange(len(values)),
            values,
            marker="o",
            color="0.6" if random else "tab:blue",
            lw=1.2 if random else 2.2,
            label=name,
        )
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("Pearson r with BLOSUM62 (190 pairs)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def plot_head_correlations(
    pearson: np.ndarray,
    spearman: np.ndarray,
    best_similarity: np.ndarray,
    best: tuple[int, int],
) -> plt.Figure:
    """Per-head Pearson / Spearman with BLOSUM62 (layers × heads grids) and the best head's scatter.

    Top row: one cell per (layer, head), the best head boxed. Bottom: the best head's similarity of the
    190 off-diagonal pairs against their BLOSUM62 score, with a few textbook pairs labelled.
    """
    layers, heads = pearson.shape
    cell = 0.62
    grid_w, grid_h = max(heads * cell, 3.0) + 1.6, max(layers * cell, 1.5) + 1.3
    fig = plt.figure(figsize=(max(2 * grid_w, 11.0), grid_h + 5.6))
    outer = fig.add_gridspec(2, 2, height_ratios=[grid_h, 5.0], hspace=0.45, wspace=0.25)
    annotate = heads <= 16
    for col, values, name in ((0, pearson, "Pearson r"), (1, spearman, "Spearman ρ")):
        ax = fig.add_subplot(outer[0, col])
        sns.heatmap(
            values,
            ax=ax,
            cmap=DIVERGING,
            center=0.0,
            vmin=-1,
            vmax=1,
            annot=annotate,
            fmt=".2f",
            annot_kws={"fontsize": 8},
            xticklabels=list(range(heads)),
            yticklabels=list(range(layers)),
            cbar_kws={"label": name},
        )
        ax.add_patch(plt.Rectangle((best[1], best[0]), 1, 1, fill=False, edgecolor="black", lw=2.5))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{name} with BLOSUM62, per head (box: best head)", fontsize=11)
        ax.tick_params(axis="y", rotation=0)
    ax = fig.add_subplot(outer[1, :])
    sim = off_diagonal(best_similarity)
    ref = off_diagonal(blosum62_log2_odds() * 2)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, ref.shape)
    ax.scatter(ref + jitter, sim, s=16, alpha=0.6, color="tab:blue", edgecolor="none", label="residue pair")
    labels = pair_labels()
    offsets = {"D-E": (8, 6), "R-K": (8, -12), "F-Y": (-34, 6), "I-V": (-30, -12), "W-Y": (8, -4)}
    for pair, offset in offsets.items():
        k = labels.index(pair)
        if np.isfinite(sim[k]):
            ax.scatter([ref[k] + jitter[k]], [sim[k]], s=36, color="tab:red")
            ax.annotate(
                pair,
                (ref[k] + jitter[k], sim[k]),
                fontsize=10,
                color="tab:red",
                weight="bold",
                xytext=offset,
                textcoords="offset points",
            )
    ax.set_xlabel("BLOSUM62 score (half bits; points jittered horizontally)")
    ax.set_ylabel("attention similarity (log2 odds)")
    ax.set_title(
        f"Best head (layer {best[0]}, head {best[1]}): the 190 off-diagonal residue pairs", fontsize=11
    )
    ax.grid(alpha=0.3)
    return fig


def _nice_step(length: int, max_ticks: int = 7) -> int:
    """Tick spacing from 1, 2, 5, 10, 20, 25, 50, ... giving at most ``max_ticks`` ticks."""
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000):
        if length / base <= max_ticks:
            return base
    return int(10 ** math.ceil(math.log10(length / max_ticks)))


def plot_attention_grid(
    maps: np.ndarray,
    sequence: str,
    title: str = "",
    layers: Sequence[int] | None = None,
) -> plt.Figure:
    """Attention maps of one protein as a layers × heads grid (like the Performer paper's BPT1_BOVIN).

    Args:
        maps: (num_layers, num_heads, L, L) attention of the residues only (specials removed).
        sequence: the L residues, used as tick labels when short enough.
        title: figure title (e.g. the protein id).
        layers: the layer indices of ``maps`` rows, for labels (default 0..n-1).
    """
    n_layers, n_heads, L, _ = maps.shape
    layers = list(range(n_layers)) if layers is None else list(layers)
    cell = 2.1 if L <= 150 else 2.6
    fig, axes = plt.subplots(
        n_layers, n_heads, figsize=(cell * n_heads + 1.2, cell * n_layers + 0.9), squeeze=False
    )
    vmax = float(np.quantile(maps, 0.995)) if maps.size else 1.0
    image = None
    step = _nice_step(L)
    for l in range(n_layers):
        for h in range(n_heads):
            ax = axes[l, h]
            image = ax.imshow(maps[l, h], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"head {h}", fontsize=10)
            if h == 0:
                ax.set_ylabel(f"layer {layers[l]}", fontsize=10)
            if L <= 40:  # short peptides: the residue letters themselves
                if l == n_layers - 1:
                    ax.set_xticks(range(L), list(sequence), fontsize=5)
                if h == 0:
                    ax.set_yticks(range(L), list(sequence), fontsize=5)
            else:
                if l == n_layers - 1:
                    ax.set_xticks(range(0, L, step))
                    ax.tick_params(axis="x", labelsize=7)
                if h == 0:
                    ax.set_yticks(range(0, L, step))
                    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{title}  (L = {L}; rows: query residue, columns: key residue)".strip(), fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.92, 0.97))
    cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(image, cax=cax, label="attention probability")
    return fig


# ----------------------------------------------------------------------------- training / benchmarks
def plot_learning_curves(metrics_csv: str | Path) -> plt.Figure:
    """Loss-like columns (``train/loss``, ``val/loss``, ``*ppl*``) of a Lightning CSVLogger ``metrics.csv``."""
    import pandas as pd

    df = pd.read_csv(metrics_csv)
    x = "step" if "step" in df.columns else df.columns[0]
    cols = [c for c in df.columns if c not in (x, "epoch") and ("loss" in c or "ppl" in c or "acc" in c)]
    if not cols:
        cols = [c for c in df.columns if c not in (x, "epoch")]
    groups = {"loss": [c for c in cols if "loss" in c], "other": [c for c in cols if "loss" not in c]}
    groups = {k: v for k, v in groups.items() if v}
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.2), squeeze=False)
    for ax, (name, names) in zip(axes[0], groups.items(), strict=True):
        for c in names:
            part = df[[x, c]].dropna()
            ax.plot(part[x], part[c], marker="o" if len(part) < 30 else None, ms=3, label=c)
        ax.set_xlabel(x)
        ax.set_ylabel("loss (nats / token)" if name == "loss" else "value")
        ax.set_title("Loss" if name == "loss" else "Other logged metrics", fontsize=12)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def load_benchmark(path: str | Path) -> tuple[list[dict], dict]:
    """``(rows, info)`` of a ``bench/`` JSON.

    Accepts ``{"info": {...}, "results": [...]}`` (``bench/attention.py``), ``{"rows"|"runs": [...]}``
    or a bare list of row dicts.
    """
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return data, {}
    info = data.get("info") or data.get("meta") or {}
    for key in ("results", "rows", "runs", "measurements"):
        if isinstance(data.get(key), list):
            return data[key], info
    raise ValueError(f"{path}: no list of rows under 'results', 'rows', 'runs' or 'measurements'")


def _first_key(rows: list[dict], *names: str) -> str | None:
    return next((n for n in names if any(n in r for r in rows)), None)


def plot_benchmark(rows: list[dict], title: str = "") -> plt.Figure:
    """Time and peak memory vs sequence length, log–log, one line per method (Performer paper Fig. 3 style).

    Reads the fields of ``bench/attention.py`` (``method`` like ``"favor-triton/bid"``, ``L``, ``ms``,
    ``peak_extra_GB``; rows with ``error`` such as OOM have no numbers and leave a gap) and common
    alternatives (``length``/``seq_len``, ``attention``/``variant``, ``time_ms``, ``peak_mem_mb``...).
    A ``/bid`` or ``/causal`` suffix of the method is drawn as solid / dashed lines of one colour.
    """
    lx = _first_key(rows, "L", "length", "seq_len", "sequence_length")
    var = _first_key(rows, "method", "attention", "variant", "name", "impl", "kernel")
    tk = _first_key(rows, "ms", "time_ms", "fwd_bwd_ms", "median_ms", "time_s", "total_s")
    mk = _first_key(
        rows,
        "peak_extra_GB",
        "peak_mem_gb",
        "memory_gb",
        "peak_mem_mb",
        "memory_mb",
        "peak_memory_mb",
        "peak_rss_mb",
    )
    if lx is None or tk is None:
        keys = sorted({k for r in rows for k in r})
        raise ValueError(f"benchmark rows need a length and a time field; got keys {keys}")
    panels = [(tk, "forward + backward time (s)" if tk.endswith("_s") else "forward + backward time (ms)")]
    if mk is not None:
        panels.append((mk, "peak memory (GB)" if mk.lower().endswith("gb") else "peak memory (MB)"))
    names = list(dict.fromkeys(str(r.get(var, "attention")) for r in rows if lx in r))
    bases = list(dict.fromkeys(n.split("/")[0] for n in names))
    colours = dict(zip(bases, sns.color_palette("tab10", len(bases)), strict=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels, strict=True):
        for name in names:
            by_length: dict = {}
            for r in rows:
                if str(r.get(var, "attention")) == name and r.get(col) is not None and lx in r:
                    by_length.setdefault(r[lx], []).append(float(r[col]))
            pts = [(x, float(np.median(v))) for x, v in sorted(by_length.items())]  # repeats: median
            if not pts:
                continue
            base, _, tag = name.partition("/")
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                ms=4,
                color=colours[base],
                ls="--" if tag == "causal" else "-",
                label=name,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label + ", log scale")
        ax.set_title(("Time" if col == tk else "Peak memory") + " vs sequence length", fontsize=12)
        ax.grid(alpha=0.3, which="both")
        ax.legend(
            fontsize=8,
            title="solid: bidirectional, dashed: causal" if any("/" in n for n in names) else None,
            title_fontsize=8,
        )
    failed = sorted({f"{r.get(var)} L={r.get(lx)}" for r in rows if "error" in r and lx in r})
    if failed:
        fig.text(
            0.01,
            0.005,
            f"no number (OOM or error): {len(failed)} runs, e.g. {', '.join(failed[:3])}",
            fontsize=8,
        )
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.03 if failed else 0, 1, 1))
    return fig


def save(fig: plt.Figure, path: str | Path, dpi: int = 130) -> Path:
    """Save a figure and close it (frees memory in long analyses)."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
