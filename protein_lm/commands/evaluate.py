"""``protein-lm evaluate``: accuracy and perplexity of a checkpoint on any FASTA file.

The FASTA goes through the same validation and token cache as training data
(``ensure_cache``) and is scored with the checkpoint's own objective:

* ``mlm``: 15 % of residues masked (80/10/10) with masks that are a pure function of
  ``--seed`` and the position, so two runs give identical numbers; scored at masked positions;
* ``causal``: next-token prediction at every real position.

Metrics are the paper's (see docs/training.md): ``loss`` = mean cross-entropy in nats over
the scored tokens, ``perplexity`` = exp(loss), ``accuracy`` = arg-max accuracy, all
token-weighted over the whole file. Sequences longer than ``max_length - 2`` residues are
scored as consecutive windows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from protein_lm.checkpoint import load_model
from protein_lm.devices import resolve_device
from protein_lm.errors import UserError
from protein_lm.lit_module import IGNORE_INDEX, TokenMetrics, token_statistics
from protein_lm.outputs import check_output_file, write_atomically

# Rows per batch at most, however short the records: per-row state (FAVOR's key-value sums,
# M x D per head and layer) grows with rows, not tokens.
MAX_ROWS = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt or exported weights file")
    parser.add_argument("--fasta", required=True, help="FASTA(.gz) file (or a token cache directory)")
    parser.add_argument("--max-sequences", type=int, default=None, help="score only the first N sequences")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per window incl. <cls>/<eos> (default: the model's max_length)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MLM masks (default 0)")
    parser.add_argument("--quiet", action="store_true", help="print only the JSON")


def evaluate(
    checkpoint: str | Path,
    fasta: str | Path,
    max_sequences: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    max_length: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``fasta`` with ``checkpoint``; returns the JSON-able result dict."""
    from protein_lm.data.datamodule import ProteinDataModule

    if max_sequences is not None and max_sequences < 1:
        raise UserError(f"--max-sequences must be >= 1, got {max_sequences}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 3:
        raise UserError(f"--max-length must be >= 3 (<cls>, one residue, <eos>), got {max_length}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if not Path(fasta).exists():
        raise UserError(f"--fasta {fasta}: no such file or directory")
    dev = resolve_device(device)
    model, info = load_model(checkpoint, map_location="cpu")
    model.to(dev).eval()
    objective = info["objective"]
    length = int(max_length or model.config.max_length)
    if model.config.position == "learned" and length > model.config.max_length:
        raise UserError(f"--max-length {length}: this model has learned positions for {model.config.max_length} "
                        "tokens at most")
    dm = ProteinDataModule(
        data_dir=str(fasta), mode="single", max_length=length, objective=objective,
        batch_size=batch_size, seed=seed, pin_memory=False,
    )
    # Batches hold batch_size full windows' worth of tokens: a long protein's windows go
    # batch_size at a time, and thousands of short records share one batch instead of a few each.
    loader = dm.evaluation_dataloader(
        str(fasta), max_sequences=max_sequences, tokens_per_batch=batch_size * length, max_rows=MAX_ROWS,
    )
    metrics = TokenMetrics()
    start = time.perf_counter()
    report = _Progress(len(loader), progress)
    use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            ids, pad, labels = batch["input_ids"], batch["padding_mask"], batch["labels"]
            # Rows are scored independently, and a row without a scored position (a short record
            # none of whose residues was masked) adds nothing to any metric: it is not run at all.
            scored = labels.ne(IGNORE_INDEX).any(dim=1)
            report(i + 1, int(ids.numel()))
            if not bool(scored.any()):
                continue
            if not bool(scored.all()):
                ids, pad, labels = ids[scored], pad[scored], labels[scored]
            rows, row_pad, inverse = distinct_rows(ids, pad)
            # A batch without padding (a long protein's full windows) runs unmasked: the same numbers,
            # without masking copies of every feature tensor (checked on the host, before the copy).
            row_pad = row_pad.to(dev) if bool(row_pad.any()) else None
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(rows.to(dev), row_pad).logits[inverse.to(dev)]
            loss_sum, correct, count = token_statistics(logits, labels.to(dev))
            metrics.update(loss_sum.cpu(), correct.cpu(), count.cpu())
    report.close()
    values = metrics.compute()
    if int(values["num_tokens"]) == 0:
        raise UserError(
            f"{fasta}: no tokens to score"
            + (" (no residue was selected for masking: score more or longer sequences)" if objective == "mlm" else "")
        )
    if not math.isfinite(float(values["loss"])):  # finite weights can still overflow; JSON has no NaN
        raise UserError(f"{checkpoint}: the model's loss on {fasta} is not finite ({float(values['loss'])}); "
                        "the checkpoint is unusable for scoring")
    return {
        "checkpoint": str(checkpoint),
        "fasta": str(fasta),
        "objective": objective,
        "attention": model.config.attention,
        "loss": float(values["loss"]),
        "accuracy": float(values["accuracy"]),
        "perplexity": float(values["perplexity"]),
        "num_tokens": int(values["num_tokens"]),
        "max_sequences": max_sequences,
        "max_length": length,
        "seed": seed,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 3),
    }


def distinct_rows(ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct rows of ``ids`` (B, L) with their padding masks, and ``inverse`` with
    ``rows[inverse] == ids``.

    Rows are scored independently, so identical rows (equal token ids, masks included) give identical
    logits and each is run once: short records repeat a lot (300,000 one-residue records make at most
    33 distinct ``<cls> X <eos>`` rows), long ones almost never, and finding them costs a sort.
    """
    rows, inverse = torch.unique(ids, dim=0, return_inverse=True)
    if rows.shape[0] == ids.shape[0]:
        return ids, pad, torch.arange(ids.shape[0])
    first = torch.full((rows.shape[0],), ids.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(ids.shape[0]), reduce="amin")
    return rows, pad[first], inverse


class _Progress:
    """``batches done/total, tokens read, rate`` on stderr: redrawn on a terminal, a line every 10 s
    in a log; nothing for runs that end within 2 s."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = self.start - 10.0  # the first line comes after 2 s, also in a log
        self.tokens, self.done, self.shown = 0, 0, False

    def __call__(self, done: int, tokens: int) -> None:
        self.done, self.tokens = done, self.tokens + tokens
        now = time.monotonic()
        if self.enabled and now - self.start >= 2.0 and now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.tokens / max(now - self.start, 1e-9)
        line = (f"evaluate: {self.done:,}/{self.total:,} batches ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{self.tokens:,} tokens, {rate:,.0f} tokens/s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self._show(time.monotonic())
            if self.tty:
                print(file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")  # before the scoring, not after it
    result = evaluate(
        args.checkpoint, args.fasta, args.max_sequences, args.batch_size, args.device,
        args.max_length, args.seed, progress=not args.quiet,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_atomically(args.json, lambda tmp: tmp.write_text(text + "\n"), "--json")
    return 0
