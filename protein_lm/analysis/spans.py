"""Learned adaptive attention spans per layer and head: read them, plot them, save them.

After training with ``span.enabled: true`` the interesting question is *which heads kept which
context* (Sukhbaatar et al. 2019, fig. 3: a few long heads, most short). :func:`head_spans` reads the
spans of every adaptive-span layer of a model or checkpoint:

* static spans (one learned ``z`` per head): ``S * clamp(span_fraction, 0, 1)``, exactly what the
  model uses; no input needed;
* dynamic spans (``span.dynamic: true``, ``z_t = S * sigmoid(v^T x_t + b)`` per token): they depend on
  the input, so a batch of inputs is required and the reported value is the per-head mean over its
  real (non-padding) tokens; :func:`head_spans` refuses to guess without one.

:func:`plot_spans` draws grouped bars (layers on the x axis, one bar per head, the max span ``S`` as a
dashed line) or a layers x heads heatmap; :func:`save_figure` / :func:`write_json` write atomically.
``protein-lm spans`` (:mod:`protein_lm.commands.spans`) runs the chain on a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from protein_lm.attention.modules.span import adaptive_span_modules
from protein_lm.data.tokenizer import CLS_ID, EOS_ID, PAD_ID
from protein_lm.errors import UserError
from protein_lm.outputs import write_atomically

_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass
class SpanReport:
    """Spans in tokens, ``spans[r][h]`` for row ``r`` (block ``layers[r]``) and head ``h``."""

    spans: np.ndarray  # (layers, heads) float64
    layers: list[int]
    max_span: float
    ramp: float
    dynamic: bool
    num_tokens: int | None = None  # dynamic: real tokens averaged over
    source: str | None = None  # checkpoint path, if read from one
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``spans`` rounded to 1e-4 tokens)."""
        return {
            "spans": [[round(float(z), 4) for z in row] for row in self.spans],
            "layers": list(self.layers),
            "heads": int(self.spans.shape[1]) if self.spans.size else 0,
            "max_span": self.max_span,
            "ramp": self.ramp,
            "dynamic": self.dynamic,
            "statistic": "mean over real tokens of the given inputs"
            if self.dynamic
            else "learned per-head span",
            "num_tokens": self.num_tokens,
            "mean": round(float(self.spans.mean()), 4),
            "max": round(float(self.spans.max()), 4),
            "checkpoint": self.source,
            **self.extra,
        }


def batch_sequences(sequences: Sequence[np.ndarray | Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Residue token ids -> ``<cls> residues <eos>`` rows padded to one batch.

    Returns:
        ``input_ids (B, L)`` long and ``padding_mask (B, L)`` bool (True at padding).
    """
    rows = [[CLS_ID, *(int(t) for t in s), EOS_ID] for s in sequences]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = torch.arange(length)[None, :] >= torch.tensor([len(r) for r in rows])[:, None]
    return ids, mask


def _layer_index(name: str, fallback: int) -> int:
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else fallback


def head_spans(
    model: nn.Module | str | os.PathLike,
    batches: Sequence[tuple[Tensor, Tensor | None]] | None = None,
) -> SpanReport:
    """Per-layer, per-head spans (tokens) of a model or checkpoint.

    Args:
        model: a :class:`protein_lm.model.ProteinLM` (or any module holding ``AdaptiveSpan``
            modules), or a checkpoint path (Lightning ``.ckpt`` or exported weights).
        batches: dynamic spans only: ``(input_ids (B, L), padding_mask (B, L) or None)`` batches;
            the report gives each head's mean span over all their real tokens (token-weighted).
            Ignored for static spans.

    Returns:
        :class:`SpanReport`, rows in block order.

    Raises:
        UserError: unreadable checkpoint; a model without adaptive span; dynamic spans without
            ``batches``.
    """
    source = None
    if isinstance(model, (str, os.PathLike)):
        from protein_lm.checkpoint import load_model

        source = str(model)
        model, _ = load_model(model, map_location="cpu")
    named = list(adaptive_span_modules(model))
    if not named:
        where = f"{source}: " if source else ""
        raise UserError(
            f"{where}the model has no adaptive attention span (trained without span.enabled: true); "
            "there are no spans to show"
        )
    mods = [m for _, m in named]
    layers = [_layer_index(name, i) for i, (name, _) in enumerate(named)]
    dynamic = any(m.dynamic for m in mods)
    num_tokens = None
    if not dynamic:
        spans = torch.stack([m.current_spans().double() for m in mods])
    else:
        if not batches:
            raise UserError(
                "dynamic spans depend on the input: give a batch of inputs (protein-lm spans --fasta FILE)"
            )
        spans, num_tokens = _mean_dynamic_spans(model, mods, batches)
    return SpanReport(
        spans=spans.numpy(),
        layers=layers,
        max_span=float(max(m.max_span for m in mods)),
        ramp=float(max(m.ramp for m in mods)),
        dynamic=dynamic,
        num_tokens=num_tokens,
        source=source,
    )


@torch.no_grad()
def _mean_dynamic_spans(model: nn.Module, mods: list, batches) -> tuple[Tensor, int]:
    """Token-weighted mean over all batches of each layer's per-head mean span (float64, CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(len(mods), mods[0].num_heads, dtype=torch.float64)
    count = 0
    try:
        for input_ids, padding_mask in batches:
            mask = None if padding_mask is None else padding_mask.to(device)
            model(input_ids.to(device), mask)
            n = mods[0].last_num_tokens  # every layer sees the same real tokens
            total += n * torch.stack([m.current_spans().double() for m in mods])
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError("no real tokens in the given inputs: cannot average dynamic spans")
    return total / count, count


def plot_spans(report: SpanReport, kind: str = "bars", title: str | None = None):
    """Figure of the spans: ``bars`` (grouped per layer, dashed line at ``S``) or ``heatmap``.

    Returns:
        a matplotlib Figure (save with :func:`save_figure`).
    """
    from protein_lm.analysis.plots import plt, sns  # plots selects the headless backend outside notebooks

    spans = np.asarray(report.spans, dtype=np.float64)
    n_layers, n_heads = spans.shape
    what = f"mean over {report.num_tokens} tokens" if report.dynamic else "learned"
    title = (
        title or f"Adaptive attention span per head ({what}; S = {report.max_span:g}, R = {report.ramp:g})"
    )
    if kind == "heatmap":
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * n_heads + 2.0), max(2.5, 0.55 * n_layers + 1.5)))
        sns.heatmap(
            spans,
            ax=ax,
            vmin=0.0,
            vmax=report.max_span,
            cmap="viridis",
            annot=n_heads <= 16,
            fmt=".0f" if report.max_span >= 100 else ".1f",
            xticklabels=list(range(n_heads)),
            yticklabels=report.layers,
            cbar_kws={"label": f"span (tokens; max S = {report.max_span:g})"},
        )
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.tick_params(axis="y", rotation=0)
    elif kind == "bars":
        fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * n_layers * n_heads + 0.4 * n_layers + 2.0), 4.0))
        width = 0.8 / n_heads
        colors = sns.color_palette("husl", n_heads)
        x = np.arange(n_layers)
        for h in range(n_heads):
            ax.bar(x - 0.4 + (h + 0.5) * width, spans[:, h], width, color=colors[h], label=f"head {h}")
        ax.axhline(report.max_span, color="black", ls="--", lw=1.2, label=f"max span S = {report.max_span:g}")
        ax.set_xticks(x, [str(i) for i in report.layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("span z (tokens)")
        ax.set_ylim(0, report.max_span * 1.08)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(n_heads + 1, 5), loc="upper left", bbox_to_anchor=(0, -0.15))
    else:
        raise ValueError(f"kind must be 'bars' or 'heatmap', got {kind!r}")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | os.PathLike, flag: str = "--out", dpi: int = 130) -> Path:
    """Save ``fig`` atomically (temp file then rename; format from the suffix, default PNG) and close it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return write_atomically(
            path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"), flag
        )
    except ValueError as err:  # matplotlib: unsupported format
        raise UserError(f"{flag} {path}: {err}") from None
    finally:
        plt.close(fig)


def write_json(report: SpanReport, path: str | os.PathLike, flag: str = "--json") -> Path:
    """Write :meth:`SpanReport.to_dict` as JSON, atomically."""
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text), flag)
