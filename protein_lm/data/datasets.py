"""Datasets whose ``__getitem__((epoch, example indices))`` returns a finished batch.

The sampler (:mod:`protein_lm.data.sampler`) yields ``(epoch, indices)`` per batch and
``DataLoader(batch_size=None)`` hands that to the dataset, so one worker builds one whole, vectorised
batch per request (no per-example inter-process traffic). Crops and MLM masks are pure functions of
``(seed, epoch, example id, position)`` (counter-based hashing, :mod:`protein_lm.data.collate`), so a
batch does not depend on ``num_workers``, prefetching or the process that builds it.

The example modes (``ProteinDataModule(mode=...)``; :func:`build_dataset` picks the class):

* single (:class:`SingleProteinDataset`): one protein per example, ``<cls> residues <eos>``;
  dynamic padding (pad id 1). train: a random crop of the *residues* to ``max_length - 2``, then
  ``<cls>``/``<eos>`` framing (so every example is framed the same way, cropped or not; a cropped
  window's ``<cls>``/``<eos>`` then mark the window, not the true protein ends). eval: deterministic
  consecutive windows of ``max_length - 2`` residues (:func:`evaluation_windows`), each framed
  ``<cls> ... <eos>``: every residue of every sequence is in exactly one window.
* concat (:class:`ConcatProteinDataset`): the split's sequences in cache order as one stream
  ``s1 <eos> s2 <eos> s3 <eos> ...`` (no ``<cls>``: the ``<eos>`` separator alone marks boundaries,
  as in the Performer paper) cut into windows of exactly ``max_length`` tokens, no padding. Only the
  final partial window (``< max_length`` tokens) per split is dropped. In training the stream is
  read circularly from a random per-epoch offset, so window boundaries move every epoch and the
  dropped remainder is a different piece each epoch; evaluation uses offset 0.
* packed (:class:`PackedProteinDataset`): the single-mode examples (same framing, crops, windows
  and masks) placed whole into rows of exactly ``max_length`` tokens, padding only at a row's tail
  (:mod:`protein_lm.data.packing`); batches add ``segment_ids`` and ``positions`` so the model keeps
  the proteins apart.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from protein_lm.data.collate import (
    STREAM_CONCAT_OFFSET,
    STREAM_CROP,
    STREAM_TEST_MASK,
    STREAM_TRAIN_MASK,
    STREAM_VAL_MASK,
    frame_single,
    make_batch,
    random_below,
    stream_key,
)
from protein_lm.data.packing import make_packed_batch
from protein_lm.data.readers import TokenCache
from protein_lm.data.tokenizer import EOS_ID

# each split draws its MLM masks from its own random stream (no two uses of randomness share a key)
MASK_STREAMS = {"train": STREAM_TRAIN_MASK, "val": STREAM_VAL_MASK, "test": STREAM_TEST_MASK}


class SingleProteinDataset(Dataset):
    """One protein (or one window of one) per example; ``<cls> residues <eos>``, padded per batch.

    Args:
        cache: the token cache holding the residues.
        starts: ``(N,)`` offset of each example's residues in ``cache.tokens``.
        lengths: ``(N,)`` residue count of each example (uncropped in training).
        example_ids: ``(N,)`` stable ids feeding the random streams (cache sequence index in
            training, window index in evaluation).
        max_length: tokens per example including ``<cls>``/``<eos>``.
        train: random crop and per-epoch masks (else: no crop needed, fixed masks).
    """

    def __init__(
        self,
        cache: TokenCache,
        starts: np.ndarray,
        lengths: np.ndarray,
        example_ids: np.ndarray,
        *,
        max_length: int,
        objective: str,
        mask_prob: float,
        seed: int,
        train: bool,
        mask_stream: int,
    ):
        self.cache = cache
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.example_ids = np.asarray(example_ids, dtype=np.int64)
        self.max_length, self.objective, self.mask_prob = max_length, objective, mask_prob
        self.seed, self.train, self.mask_stream = seed, train, mask_stream

    def __len__(self) -> int:
        return len(self.starts)

    def token_lengths(self) -> np.ndarray:
        """Tokens each example occupies in a batch row (after cropping and framing)."""
        return np.minimum(self.lengths, self.max_length - 2) + 2

    def examples(self, epoch: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, lengths, example ids)`` of examples ``idx`` in ``epoch``, cropped (training)."""
        starts, lengths, ex = self.starts[idx], self.lengths[idx], self.example_ids[idx]
        cap = self.max_length - 2
        if self.train:
            over = lengths > cap
            if over.any():
                shift = random_below(
                    stream_key(self.seed, epoch, STREAM_CROP), ex[over], lengths[over] - cap + 1
                )
                starts = starts.copy()
                starts[over] += shift
            lengths = np.minimum(lengths, cap)
        return starts, lengths, ex

    def mask_key(self, epoch: int) -> int:
        """Key of the MLM mask stream (fixed in evaluation)."""
        return stream_key(self.seed, epoch if self.train else 0, self.mask_stream)

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        epoch, idx = item
        starts, lengths, ex = self.examples(epoch, np.asarray(idx, dtype=np.int64))
        ids = frame_single(np.asarray(self.cache.tokens), starts, lengths)
        return make_batch(ids, ex, self.objective, self.mask_key(epoch), self.mask_prob)


class PackedProteinDataset(SingleProteinDataset):
    """Single-mode examples packed whole into rows of exactly ``max_length`` tokens (``packing.py``).

    ``__getitem__((epoch, rows))`` takes a ``(R, K)`` array of example indices (``-1`` = none), one
    row of the batch per row of the array.
    """

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        epoch, rows = item
        rows = np.asarray(rows, dtype=np.int64)
        row_of = np.nonzero(rows >= 0)[0]  # row-major, so examples come row by row
        starts, lengths, ex = self.examples(epoch, rows[rows >= 0])
        return make_packed_batch(
            np.asarray(self.cache.tokens), starts, lengths, ex, row_of,
            num_rows=len(rows), length=self.max_length, objective=self.objective,
            key=self.mask_key(epoch), mask_prob=self.mask_prob,
        )


class ConcatProteinDataset(Dataset):
    """Windows of exactly ``max_length`` tokens over ``s1 <eos> s2 <eos> ...`` (see module docstring).

    Example ``w`` of epoch ``e`` is the stream slice starting at ``(offset(e) + w * max_length) mod T``
    (``T`` = stream length), read circularly; ``offset(e)`` is 0 unless ``random_offset``.
    """

    def __init__(
        self,
        cache: TokenCache,
        seq_ids: np.ndarray,
        *,
        max_length: int,
        objective: str,
        mask_prob: float,
        seed: int,
        train: bool,
        mask_stream: int,
        random_offset: bool,
    ):
        self.cache = cache
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        offsets = np.asarray(cache.offsets)
        self.src = offsets[seq_ids]  # where each sequence's residues start in cache.tokens
        self.res_len = offsets[seq_ids + 1] - self.src
        self.seg_start = np.concatenate([[0], np.cumsum(self.res_len + 1)]).astype(np.int64)
        self.total = int(self.seg_start[-1])
        self.max_length, self.objective, self.mask_prob = max_length, objective, mask_prob
        self.seed, self.train, self.mask_stream = seed, train, mask_stream
        self.random_offset = random_offset and train
        self.num_windows = self.total // max_length

    def __len__(self) -> int:
        return self.num_windows

    def offset(self, epoch: int) -> int:
        """Stream position of window 0 in ``epoch``."""
        if not self.random_offset or self.total == 0:
            return 0
        key = stream_key(self.seed, epoch, STREAM_CONCAT_OFFSET)
        return int(random_below(key, np.zeros(1, dtype=np.int64), np.array([self.total]))[0])

    def _fill(self, row: np.ndarray, pos: int) -> None:
        """Copy stream[pos : pos + len(row)] (circular) into ``row``; one slice copy per sequence."""
        need = len(row)
        if pos + need > self.total:  # wraps around the end of the stream
            head = self.total - pos
            self._fill(row[:head], pos)
            self._fill(row[head:], 0)
            return
        tokens = np.asarray(self.cache.tokens)  # plain ndarray view: memmap slicing is slow
        i0 = int(np.searchsorted(self.seg_start, pos, side="right")) - 1
        i1 = int(np.searchsorted(self.seg_start, pos + need, side="left"))
        srcs, lens = self.src[i0:i1].tolist(), self.res_len[i0:i1].tolist()
        within = pos - int(self.seg_start[i0])
        filled = 0
        for s, n in zip(srcs, lens, strict=True):
            if within < n:
                r = min(n - within, need - filled)
                row[filled : filled + r] = tokens[s + within : s + within + r]
                filled += r
            if filled < need:
                row[filled] = EOS_ID
                filled += 1
            within = 0

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        epoch, idx = item
        idx = np.asarray(idx, dtype=np.int64)
        L = self.max_length
        off = self.offset(epoch)
        ids = np.empty((len(idx), L), dtype=np.uint8)
        for b, w in enumerate(idx.tolist()):
            self._fill(ids[b], (off + w * L) % self.total)
        mask_epoch = epoch if self.train else 0
        key = stream_key(self.seed, mask_epoch, self.mask_stream)
        return make_batch(ids, idx, self.objective, key, self.mask_prob)


def evaluation_windows(starts: np.ndarray, lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows of ``max_length - 2`` residues covering every sequence, each to be framed
    ``<cls> ... <eos>``: every residue is in exactly one window.

    Args:
        starts: ``(N,)`` offset of each sequence's residues in the cache's tokens.
        lengths: ``(N,)`` residue count of each sequence.

    Returns:
        ``(starts, lengths)`` of the windows, ``(W,)`` each, sequence by sequence.
    """
    w = max_length - 2
    k = (lengths + w - 1) // w  # windows per sequence
    seq = np.repeat(np.arange(len(starts)), k)
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)  # window number within its sequence
    return starts[seq] + j * w, np.minimum(w, lengths[seq] - j * w)


def build_dataset(
    cache: TokenCache,
    ids: np.ndarray,
    split: str,
    *,
    mode: str,
    max_length: int,
    objective: str,
    mask_prob: float,
    seed: int,
    concat_random_offset: bool,
) -> SingleProteinDataset | ConcatProteinDataset:
    """The ``mode`` examples of sequences ``ids`` of ``cache`` as ``split`` uses them.

    ``"train"``: whole sequences, cropped at random per epoch (a random stream offset in concat
    mode); ``"val"`` / ``"test"``: fixed windows covering every residue, fixed masks.
    """
    train = split == "train"
    common = dict(
        max_length=max_length,
        objective=objective,
        mask_prob=mask_prob,
        seed=seed,
        train=train,
        mask_stream=MASK_STREAMS[split],
    )
    if mode == "concat":
        return ConcatProteinDataset(cache, ids, random_offset=concat_random_offset, **common)
    offsets = np.asarray(cache.offsets)
    lengths = offsets[ids + 1] - offsets[ids]
    kind = PackedProteinDataset if mode == "packed" else SingleProteinDataset
    if train:
        return kind(cache, offsets[ids], lengths, ids, **common)
    starts, lens = evaluation_windows(offsets[ids], lengths, max_length)
    return kind(cache, starts, lens, np.arange(len(starts)), **common)
