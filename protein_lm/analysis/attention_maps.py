"""Attention extraction for analysis: per layer and head, in row blocks, for batches of proteins.

``ProteinLM.attention_maps`` returns one layer's full ``(B, H, L, L)`` maps. For a sequence of a few
thousand residues that is ``H * L^2 * 4`` bytes per layer (8 heads, L = 4,000: 512 MB), and the
analysis only needs sums over those maps. :func:`iter_attention_blocks` therefore asks each layer's
attention sublayer for its attention in blocks of query rows, ``(B, H, rows, L)``, sized so that a
block holds at most ``max_block_elements`` numbers (``SelfAttention.attention_blocks``: queries and
keys projected once, each block from the attention module's ``attention_probs(q, k, mask, rows)``,
see :mod:`protein_lm.attention.registry`). Performer layers give their *implied* attention (so
``attention @ V`` is the layer's output), exact layers the softmax probabilities; causal masks and
padding (padded keys get 0) are the modules' own.

An attention sublayer without ``attention_blocks`` (an extension) is read through
``model.attention_maps`` and sliced into row blocks: same result, full-map memory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from protein_lm.analysis.similarity import SimilarityAccumulator
from protein_lm.analysis.substitution import SubstitutionAccumulator, score_batch
from protein_lm.analysis.vig import VigAccumulator
from protein_lm.data.tokenizer import PAD_ID, STANDARD_AA_IDS
from protein_lm.inference import frame as frame_residues
from protein_lm.inference import padded_batch

RESIDUE_IDS = tuple(range(4, 31))  # every residue token (standard and X/B/U/Z/O/./-), no specials
DEFAULT_BLOCK_ELEMENTS = 1 << 24  # 16 M numbers = 64 MB of float32 per block
DEFAULT_BATCH_TOKENS = 8192  # framed, padded tokens per analysis batch


def frame(tokens: np.ndarray | Iterable[int]) -> Tensor:
    """Residue token ids -> ``(1, L + 2)`` LongTensor ``<cls> residues <eos>`` (how the models are trained)."""
    return torch.from_numpy(frame_residues(np.asarray(tokens)))[None]


def _blockwise(model) -> bool:
    """True when every attention sublayer yields its attention in row blocks (``attention_blocks``)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "embed_tokens"):
        return False
    return all(
        callable(getattr(getattr(block, "attn", None), "attention_blocks", None)) and hasattr(block, "norm1")
        for block in blocks
    )


def _rows_per_block(batch: int, heads: int, length: int, max_block_elements: int) -> int:
    return max(1, min(length, max_block_elements // max(1, batch * heads * length)))


@torch.no_grad()
def iter_attention_blocks(
    model,
    input_ids: Tensor,
    padding_mask: Tensor | None = None,
    layers: Iterable[int] | None = None,
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(layer, row_start, attention (B, H, rows, L))`` for the requested layers, in row blocks.

    Rows ``row_start : row_start + rows`` of the layer's attention map; over all blocks of a layer
    the rows cover ``0 .. L-1`` once. Uses the model's current mode (call ``model.eval()`` first).

    Args:
        model: a :class:`protein_lm.model.ProteinLM`.
        input_ids: ``(B, L)`` token ids on the model's device.
        padding_mask: ``(B, L)`` bool, True at padding (default: ``<pad>`` ids).
        layers: layer indices (negative from the end); default all.
        max_block_elements: at most this many numbers per yielded block (memory bound).
    """
    depth = len(model.blocks)
    wanted = set(range(depth)) if layers is None else {int(i) % depth for i in layers}
    if not wanted:
        return
    if padding_mask is None:
        pad = input_ids.eq(PAD_ID)
        padding_mask = pad if bool(pad.any()) else None
    else:
        padding_mask = padding_mask.bool()
    batch, length = input_ids.shape
    if not _blockwise(model):
        for layer, maps in model.attention_maps(input_ids, padding_mask, layers=sorted(wanted)):
            rows = _rows_per_block(batch, maps.shape[1], length, max_block_elements)
            for start in range(0, length, rows):
                yield layer, start, maps[:, :, start : start + rows, :length]
        return
    last = max(wanted)
    x = model.embed_tokens(input_ids)
    for i, block in enumerate(model.blocks):
        if i in wanted:
            rows = _rows_per_block(batch, model.config.heads, length, max_block_elements)
            for start, attn in block.attn.attention_blocks(block.norm1(x), padding_mask, rows):
                yield i, start, attn
        if i == last:
            return
        x = block(x, padding_mask)


def attention_map(
    model,
    input_ids: Tensor,
    layers: Iterable[int] | None = None,
    residues_only: bool = True,
) -> np.ndarray:
    """Full attention maps of ONE sequence, ``(num_layers, H, L, L)`` float32 numpy, for plotting.

    Args:
        model: the model (eval mode).
        input_ids: ``(1, L)`` framed token ids (see :func:`frame`).
        layers: which layers (default all), in increasing order in the output.
        residues_only: drop the ``<cls>``/``<eos>`` rows and columns, leaving the residues.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("attention_map takes one sequence (batch size 1)")
    depth = len(model.blocks)
    wanted = sorted(set(range(depth)) if layers is None else {int(i) % depth for i in layers})
    length = input_ids.shape[1]
    out = None
    for layer, start, block in iter_attention_blocks(model, input_ids, layers=wanted):
        if out is None:
            out = np.zeros((len(wanted), block.shape[1], length, length), dtype=np.float32)
        rows = block.shape[2]
        out[wanted.index(layer), :, start : start + rows] = block[0].float().cpu().numpy()
    assert out is not None
    if residues_only:
        keep = np.isin(input_ids[0].cpu().numpy(), RESIDUE_IDS)
        idx = np.flatnonzero(keep)
        out = out[:, :, idx][:, :, :, idx]
    return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def length_batches(
    sequences: Sequence[tuple[str, np.ndarray]], max_tokens: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Group proteins of similar length, longest first, into batches of at most ``max_tokens``
    framed, padded tokens (a protein longer than that goes alone). Sorting keeps padding small."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][1]))
    batch: list[tuple[str, np.ndarray]] = []
    width = 0
    for i in order:
        length = len(sequences[i][1]) + 2
        width = max(width, length)
        if batch and (len(batch) + 1) * width > max_tokens:
            yield batch
            batch, width = [], length
        batch.append(sequences[i])
    if batch:
        yield batch


def frame_batch(token_lists: Sequence[np.ndarray]) -> Tensor:
    """Residue token ids of several proteins -> ``(B, L_max + 2)`` framed ids, ``<pad>`` after ``<eos>``."""
    return padded_batch([frame_residues(np.asarray(t)) for t in token_lists], torch.device("cpu"))[0]


def accumulate_similarity(
    model,
    sequences: Iterable[tuple[str, np.ndarray]],
    accumulator: SimilarityAccumulator | None = None,
    exclude_self: bool = True,
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress: bool = False,
    vig: VigAccumulator | None = None,
    substitution: SubstitutionAccumulator | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seed: int = 0,
    label: str = "analyze",
) -> SimilarityAccumulator:
    """Sum attention statistics over proteins, for every layer and head, in length-sorted batches.

    Always sums the log-odds attention mass and its uniform-attention baseline (``accumulator``);
    with ``vig`` also Vig et al.'s key-type sums (self-edges kept, as they do), and with
    ``substitution`` the masked-LM predictions (one extra forward pass per batch, masks drawn from
    ``seed`` so that every model scored with the same seed sees the same masked positions).
    Padding never changes a protein's contribution, so the result does not depend on ``batch_tokens``.

    Args:
        model: a ProteinLM in eval mode (any device; inputs are moved to it).
        sequences: ``(id, residue token ids)`` pairs (no special tokens; cropped by the caller).
        accumulator: add to this one (default: a new one sized for the model).
        exclude_self: drop each position's attention to itself from the log-odds mass.
        max_block_elements: memory bound per attention block.
        progress: print progress (with an ETA) to stderr.
        vig: Vig et al.'s accumulator to fill too.
        substitution: masked-LM readout accumulator to fill too.
        batch_tokens: framed, padded tokens per batch.
        seed: seeds the masked positions of the substitution readout.
        label: prefix of the progress lines.
    """
    cfg = model.config
    sequences = list(sequences)
    acc = accumulator or SimilarityAccumulator(cfg.depth, cfg.heads)
    device = _model_device(model)
    generator = np.random.default_rng(seed)
    all_residues = sum(len(t) for _, t in sequences)
    done_sequences = done_residues = 0
    shown_tenth = -1
    t0 = time.time()
    for batch in length_batches(sequences, batch_tokens):
        ids = frame_batch([t for _, t in batch]).to(device)
        pad = ids.eq(PAD_ID)
        padding_mask = pad if bool(pad.any()) else None
        for layer, start, block in iter_attention_blocks(
            model, ids, padding_mask, max_block_elements=max_block_elements
        ):
            rows = block.shape[2]
            query_ids = ids[:, start : start + rows]
            acc.add(layer, block, query_ids, ids, query_offset=start if exclude_self else None)
            if vig is not None:
                vig.add(layer, block, query_ids, ids)
        acc.add_baseline(ids, causal=bool(cfg.causal), exclude_self=exclude_self, padding_mask=pad)
        if substitution is not None:
            score_batch(model, ids, padding_mask, substitution, generator)
        standard = sum(int(np.isin(np.asarray(t), STANDARD_AA_IDS).sum()) for _, t in batch)
        acc.finish_sequence(len(batch), residues=standard)
        done_sequences += len(batch)
        done_residues += sum(len(t) for _, t in batch)
        tenth = 10 * done_residues // max(1, all_residues)
        if progress and (sys.stderr.isatty() or tenth != shown_tenth):  # logs: about 10 lines a pass
            shown_tenth = tenth
            _progress(label, done_sequences, len(sequences), done_residues, all_residues, time.time() - t0)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return acc


def _progress(label: str, n: int, total: int, residues: int, all_residues: int, seconds: float) -> None:
    eta = seconds * (all_residues - residues) / residues if residues else float("nan")
    print(
        f"{label}: {n}/{total} proteins, {residues:,}/{all_residues:,} residues, {seconds:.1f} s, "
        f"ETA {eta:.0f} s",
        end="\r" if sys.stderr.isatty() else "\n",
        file=sys.stderr,
        flush=True,
    )
