"""``mode: packed``: whole proteins packed into rows of exactly ``max_length`` tokens.

Each example is framed exactly as in single mode (``<cls> residues <eos>``, the same random crop of a
too-long protein in training, the same fixed windows in evaluation) and then placed, whole, into a row
of ``max_length`` tokens next to other examples; the row's unused tail is padding. Every row has the
same length, so every batch but at most one has the same shape (static shapes: CUDA graphs,
``torch.compile`` without recompiles). The model keeps the proteins of a row apart through the
batch's ``segment_ids`` and ``positions`` (attention never crosses a segment, positions restart at 0).

Rows (:func:`pack_rows`) come from best-fit decreasing over the whole split: examples in order of
decreasing token length, each put into the open row whose free space fits it most tightly (a new row
when none fits). Ties between equal lengths are broken at random per epoch (training), so which
proteins share a row changes every epoch while the row *shapes*, and therefore the number of rows and
of batches, depend only on the multiset of lengths: the epoch length is the same every epoch, as
Lightning (which reads ``len()`` once) needs. The rows are then shuffled per epoch and cut into
batches. A per-epoch shuffled window of proteins would move more proteins between rows but makes the
row count vary from epoch to epoch; with attention confined to segments which proteins share a *row*
does not change the model's outputs at all, only which share a *batch*, and rows are shuffled into
batches every epoch.

Rows per batch: ``tokens_per_batch // max_length`` when ``tokens_per_batch`` is given, else
``batch_size``; the last batch of an epoch holds the remaining rows (possibly fewer).

Everything is a pure function of ``(seed, epoch)`` (plan) and of ``(seed, epoch, example id,
position)`` (crop, masks), as in single mode: a token's MLM decision is the one it gets in its own
single-mode row, so a packed batch's loss equals the padded loss over the same examples.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from protein_lm.data.collate import (
    STREAM_ORDER,
    STREAM_TIEBREAK,
    causal_labels,
    hash_u32_at,
    mlm_mask_hashed,
)
from protein_lm.data.tokenizer import CLS_ID, EOS_ID, PAD_ID

_EMPTY = -1  # fills a batch's (rows, examples per row) index array


def pack_rows(sizes: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit packing of items into rows of ``capacity``, placing them in ``order``.

    Args:
        sizes: ``(N,)`` item sizes, each in ``[1, capacity]``.
        order: the placement order (a permutation of ``range(N)``; decreasing size gives best-fit
            decreasing: at most 11/9 of the fewest rows possible plus a constant, Johnson 1973).
        capacity: row size.

    Returns:
        Rows as lists of item indices (in placement order); every item is in exactly one row and no
        row's sizes sum to more than ``capacity``. The result depends on ``sizes[order]`` only
        (which item sits at each place of the order does not change the rows' shapes).
    """
    rows: list[list[int]] = []
    # Rows by free space: free_rows[c] is a stack of the rows with exactly c tokens free and
    # `free` the sorted list of the c with a non-empty stack. A lookup is one bisect over at most
    # `capacity` values, whatever the number of rows.
    free_rows: dict[int, list[int]] = {}
    free: list[int] = []
    smallest = int(sizes.min()) if len(sizes) else 1
    for item in order.tolist():
        size = int(sizes[item])
        at = bisect.bisect_left(free, size)
        if at == len(free):  # nothing fits: open a row
            row, left = len(rows), capacity - size
            rows.append([item])
        else:
            space = free[at]
            stack = free_rows[space]
            row = stack.pop()
            if not stack:
                del free_rows[space], free[at]
            rows[row].append(item)
            left = space - size
        if left >= smallest:  # a row with less free space than the smallest item is full
            stack = free_rows.get(left)
            if stack is None:
                free_rows[left] = stack = []
                bisect.insort(free, left)
            stack.append(row)
    return rows


def rows_to_batches(rows: list[list[int]], rows_per_batch: int) -> list[np.ndarray]:
    """Consecutive groups of ``rows_per_batch`` rows as ``(rows, max examples per row)`` int64
    arrays of example indices, ``-1`` after a row's last example."""
    batches = []
    for i in range(0, len(rows), rows_per_batch):
        group = rows[i : i + rows_per_batch]
        out = np.full((len(group), max(map(len, group))), _EMPTY, dtype=np.int64)
        for r, row in enumerate(group):
            out[r, : len(row)] = row
        batches.append(out)
    return batches


class PackedPlan:
    """Which examples form which row and which rows which batch, per epoch (pure in ``(seed, epoch)``).

    ``plan(epoch)`` is a list of ``(rows, K)`` int64 arrays of example indices (``-1`` = no example);
    the sampler hands each to :meth:`PackedProteinDataset.__getitem__`.

    Args:
        token_lengths: ``(N,)`` tokens of each framed example (``<= max_length``).
        max_length: row length.
        rows_per_batch: rows of a batch (the last batch of an epoch may have fewer).
        shuffle: training (random ties and row order per epoch) or evaluation (fixed).
        seed: the data seed.
    """

    def __init__(self, token_lengths: np.ndarray, *, max_length: int, rows_per_batch: int, shuffle: bool,
                 seed: int):
        self.token_lengths = np.asarray(token_lengths, dtype=np.int64)
        if len(self.token_lengths) and int(self.token_lengths.max()) > max_length:
            raise ValueError(f"an example of {int(self.token_lengths.max())} tokens exceeds max_length {max_length}")
        self.max_length, self.rows_per_batch, self.shuffle, self.seed = max_length, rows_per_batch, shuffle, seed
        self._cache: tuple[int, list[np.ndarray]] | None = None
        self._num_rows: int | None = None

    def rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows in batch order (before cutting into batches)."""
        n = len(self.token_lengths)
        if self.shuffle:
            tie = np.random.default_rng([self.seed, epoch, STREAM_TIEBREAK]).random(n)
        else:
            tie = np.arange(n)
        order = np.lexsort((tie, -self.token_lengths))  # longest first, ties at random (training)
        rows = pack_rows(self.token_lengths, order, self.max_length)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, STREAM_ORDER]).permutation(len(rows))
            rows = [rows[i] for i in perm.tolist()]
        return rows

    def __call__(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and (self._cache[0] == epoch or not self.shuffle):
            return self._cache[1]
        rows = self.rows(epoch)
        self._num_rows = len(rows)
        batches = rows_to_batches(rows, self.rows_per_batch)
        self._cache = (epoch, batches)
        return batches

    @property
    def num_rows(self) -> int:
        """Rows per epoch (the same in every epoch)."""
        if self._num_rows is None:
            self(0)
        assert self._num_rows is not None
        return self._num_rows

    def padding_fraction(self) -> float:
        """Share of the epoch's row tokens that are padding (the same in every epoch)."""
        total = self.num_rows * self.max_length
        return 1.0 - float(self.token_lengths.sum()) / total if total else 0.0


def packed_layout(token_lengths: np.ndarray, row_of: np.ndarray, num_rows: int, length: int) -> dict[str, np.ndarray]:
    """Where each example of a batch sits: per-token example index, segment id and position.

    Args:
        token_lengths: ``(N,)`` tokens of each example, examples in row-major order (row by row,
            in order within a row).
        row_of: ``(N,)`` the row of each example (non-decreasing).
        num_rows: rows R.
        length: row length L.

    Returns:
        ``token_example`` ``(R, L)`` int64 (the example of each token, ``-1`` at padding),
        ``segment_ids`` ``(R, L)`` int32 (``0, 1, ...`` per example of the row, then one more id for
        the padding tail), ``positions`` ``(R, L)`` int32 (position inside the example, or inside the
        padding tail), ``padding`` ``(R, L)`` bool and ``offsets`` ``(N,)`` (each example's first
        token in the flattened ``(R * L,)`` batch).
    """
    n = len(token_lengths)
    per_row = np.bincount(row_of, minlength=num_rows)  # (R,) examples per row
    used = np.bincount(row_of, weights=token_lengths, minlength=num_rows).astype(np.int64)  # (R,)
    first = np.cumsum(per_row) - per_row  # (R,) index of each row's first example
    before = np.cumsum(token_lengths) - token_lengths  # (N,) tokens of the batch before each example
    start = before - before[first[row_of]] if n else before  # (N,) offset of each example in its row
    t = np.arange(length)[None, :]  # (1, L)
    real = t < used[:, None]  # (R, L)
    token_example = np.full((num_rows, length), -1, dtype=np.int64)
    token_example[real] = np.repeat(np.arange(n), token_lengths)  # row-major, like the examples
    ex = np.maximum(token_example, 0)
    local = np.arange(n) - first[row_of]  # (N,) index of each example within its row
    segment_ids = np.where(real, local[ex] if n else 0, per_row[:, None]).astype(np.int32)
    positions = np.where(real, t - (start[ex] if n else 0), t - used[:, None]).astype(np.int32)
    return {
        "token_example": token_example,
        "segment_ids": segment_ids,
        "positions": positions,
        "padding": ~real,
        "offsets": row_of * length + start,
    }


def make_packed_batch(
    tokens: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    example_ids: np.ndarray,
    row_of: np.ndarray,
    *,
    num_rows: int,
    length: int,
    objective: str,
    key: int,
    mask_prob: float,
) -> dict[str, torch.Tensor]:
    """The batch dict of packed rows (see :func:`protein_lm.data.collate.make_batch` for the shared keys).

    Args:
        tokens: the flat ``uint8`` residue array of a token cache.
        starts, lengths: ``(N,)`` residues of each example (already cropped), row-major order.
        example_ids: ``(N,)`` stable ids feeding the mask stream (as in single mode).
        row_of: ``(N,)`` row of each example.
        num_rows, length: the batch is ``(num_rows, length)``.

    Returns:
        ``input_ids``, ``labels`` (int64), ``padding_mask`` (bool, True at padding), plus
        ``segment_ids`` (int32, non-decreasing per row; the padding tail has its own id) and
        ``positions`` (int32, position inside the protein: ``<cls>`` is 0).
    """
    layout = packed_layout(lengths + 2, row_of, num_rows, length)
    ids = np.full(num_rows * length, PAD_ID, dtype=np.uint8)
    for at, s, n in zip(layout["offsets"].tolist(), starts.tolist(), lengths.tolist(), strict=True):
        ids[at] = CLS_ID  # one slice copy per example
        ids[at + 1 : at + 1 + n] = tokens[s : s + n]
        ids[at + 1 + n] = EOS_ID
    ids = ids.reshape(num_rows, length)
    seg = layout["segment_ids"]
    if objective == "mlm":
        h = hash_u32_at(key, example_ids, np.maximum(layout["token_example"], 0), layout["positions"])
        inputs, labels = mlm_mask_hashed(ids, h, mask_prob)
    else:
        inputs, labels = ids.astype(np.int64), causal_labels(ids, seg)
    return {
        "input_ids": torch.from_numpy(inputs),
        "labels": torch.from_numpy(labels),
        "padding_mask": torch.from_numpy(layout["padding"]),
        "segment_ids": torch.from_numpy(seg),
        "positions": torch.from_numpy(layout["positions"]),
    }
