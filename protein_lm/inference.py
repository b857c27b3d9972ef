"""Running a trained model over named proteins: windows, length-sorted padded batches.

Shared by ``embed``, ``score`` and ``probe``, which all ask the same thing of the model: run
many short token rows (a protein, a window of a long one, or a masked copy of either) in
batches, and read results back per protein. Their records come from
:func:`protein_lm.data.readers.read_proteins`.

Windows: a model sees ``max_length`` tokens including ``<cls>`` and ``<eos>``, so at most
``max_length - 2`` residues. A longer protein is cut into windows of that many residues that
overlap by ``overlap`` residues, each framed as ``<cls> window <eos>``; the last window ends at
the protein's end (so it may overlap its neighbour by more). Rotary models would run on longer
inputs, but they were trained on windows and are at their best inside one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from protein_lm.data.tokenizer import CLS_ID, EOS_ID, PAD_ID
from protein_lm.errors import UserError


def residues_per_window(max_length: int) -> int:
    """Residues that fit a ``max_length``-token model input next to ``<cls>`` and ``<eos>``."""
    if max_length < 3:
        raise UserError(f"max_length {max_length} leaves no room for residues next to <cls> and <eos>")
    return max_length - 2


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """0-based residue offsets of the windows that cover a protein of ``length`` residues.

    Consecutive windows start ``window - overlap`` residues apart; the last one is moved back to
    end exactly at the protein's end. A protein that fits gets one window at 0.
    """
    if not 0 <= overlap < window:
        raise UserError(f"window overlap must be in 0..{window - 1} residues, got {overlap}")
    if length <= window:
        return [0]
    return [*range(0, length - window, window - overlap), length - window]


def frame(residues: np.ndarray) -> np.ndarray:
    """``<cls> residues <eos>`` as int64 ids."""
    return np.concatenate(([CLS_ID], residues.astype(np.int64), [EOS_ID]))


def padded_batch(rows: Sequence[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, Lmax) ids padded with ``<pad>`` and the (B, Lmax) padding mask (True at padding)."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), PAD_ID, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    ids_t = torch.from_numpy(ids).to(device)
    return ids_t, ids_t.eq(PAD_ID)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of ``batch_size``, longest first, so little of each batch is padding."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when asked for and supported (CUDA), else full precision."""
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress(total: int, unit: str, enabled: bool):
    """A tqdm bar on stderr (silent when disabled, e.g. ``--quiet``)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
