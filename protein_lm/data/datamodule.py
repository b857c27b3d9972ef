"""``ProteinDataModule``: token cache -> split by content -> single / concat examples -> MLM or causal batches.

Pipeline::

    data_dir (cache dir or FASTA) --ensure_cache--> TokenCache (uint8 memmap + offsets)
      --splits.py--> train / val / test sequence indices (BLAKE2b of the residues; duplicates never
                     straddle splits; ``val_fasta`` / ``test_fasta`` replace the hashed val / test part)
      --mode--> examples:
          single: one protein per example, ``<cls> residues <eos>``; dynamic padding (pad id 1).
              train: a random crop of the *residues* to ``max_length - 2``, then ``<cls>``/``<eos>``
                     framing (so every example is framed the same way, cropped or not; a cropped
                     window's ``<cls>``/``<eos>`` then mark the window, not the true protein ends).
              eval:  deterministic consecutive windows of ``max_length - 2`` residues, each framed
                     ``<cls> ... <eos>``: every residue of every sequence is in exactly one window.
          concat: the split's sequences in cache order as one stream ``s1 <eos> s2 <eos> s3 <eos> ...``
              (no ``<cls>``: the ``<eos>`` separator alone marks boundaries, as in the Performer paper)
              cut into windows of exactly ``max_length`` tokens, no padding. Only the final partial
              window (``< max_length`` tokens) per split is dropped. In training the stream is read
              circularly from a random per-epoch offset, so window boundaries move every epoch and the
              dropped remainder is a different piece each epoch; evaluation uses offset 0.
          packed: the single-mode examples (same framing, crops, windows and masks) placed whole into
              rows of exactly ``max_length`` tokens, padding only at a row's tail (``packing.py``);
              batches add ``segment_ids`` and ``positions`` so the model keeps the proteins apart.
      --collate.py--> ``{"input_ids", "labels", "padding_mask"}`` (int64, int64 with -100, bool True
                      at padding); ``mlm``: 15 % of residues selected, 80/10/10 ``<mask>``/random
                      standard AA/unchanged; ``causal``: ``labels[:, t] = input_ids[:, t + 1]``
                      (packed: not across a protein boundary).

Batches are assembled inside the dataset: the sampler yields ``(epoch, example indices)`` per batch,
``DataLoader(batch_size=None)`` hands that to ``Dataset.__getitem__`` which returns the finished,
vectorised batch. One worker therefore produces one whole batch per request (no per-example IPC).

Determinism and exact resume:
    * train order (which examples form which batch, and batch order) is a pure function of
      ``(seed, epoch)``; crop offsets and MLM masks are pure functions of
      ``(seed, epoch, example index, position)`` (counter-based hashing, see ``collate.py``), so
      batches do not depend on ``num_workers``, prefetching or process.
    * evaluation batches and masks are fixed (independent of epoch), so ``val/*`` is comparable
      across epochs and ``evaluate`` is reproducible.
    * ``state_dict()`` returns ``{"epoch", "batches_done"}`` — the epoch the next training iterator
      must produce and how many of its batches are already consumed. After ``load_state_dict()``
      the training loader starts in that epoch and its iterators skip exactly ``batches_done``
      batches (``len()`` stays the full epoch, as Lightning expects) until the sampler moves on to
      another epoch.

    **Hook for the LightningModule: none is needed under a Lightning ``Trainer``.** Lightning saves
    ``datamodule.state_dict()`` in every checkpoint and calls ``load_state_dict()`` on resume; while
    fitting, ``state_dict()`` reads the progress straight from ``trainer.fit_loop`` (batches processed
    in the current epoch, rolling over to ``(epoch + 1, 0)`` once the epoch is complete), which is the
    same count Lightning itself resumes from, so a checkpoint written in ``on_train_batch_end``
    (``ModelCheckpoint(every_n_train_steps=...)``, ``save_last``), at validation end or at epoch end
    resumes with the exact remaining batches. Without a Trainer (a hand-written loop) call
    :meth:`ProteinDataModule.set_epoch` at each epoch start and :meth:`ProteinDataModule.mark_batch_done`
    after each training batch; ``state_dict()`` then reports those counters.

DDP: the sampler is a :class:`torch.utils.data.DistributedSampler` subclass that shards *batches*
across ``trainer.world_size`` ranks itself (padding the batch list by repetition so every rank gets
the same number of batches, like ``DistributedSampler``), so Lightning keeps it as is
(``use_distributed_sampler`` may stay at its default) and still calls its ``set_epoch``.
``trainer.overfit_batches`` is not supported (it replaces the sampler); use ``max_train_sequences``.

``evaluation_dataloader(path, max_sequences)`` gives deterministic evaluation batches over a whole
FASTA file (for ``protein-lm evaluate``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from protein_lm.cache import TokenCache, ensure_cache
from protein_lm.collate import (
    STREAM_CONCAT_OFFSET,
    STREAM_CROP,
    STREAM_ORDER,
    STREAM_TEST_MASK,
    STREAM_TIEBREAK,
    STREAM_TRAIN_MASK,
    STREAM_VAL_MASK,
    frame_single,
    make_batch,
    random_below,
    stream_key,
)
from protein_lm.errors import UserError
from protein_lm.packing import PackedPlan, make_packed_batch
from protein_lm.splits import SPLIT_NAMES, TEST, TRAIN, VAL, assign_splits
from protein_lm.tokenizer import EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE

MODES = ("single", "concat", "packed")
OBJECTIVES = ("mlm", "causal")
_EXCLUDED = -1


class DataConfigError(UserError, ValueError):
    """A bad ``ProteinDataModule`` argument (a ``UserError`` for the CLI, a ``ValueError`` for Python)."""


# --------------------------------------------------------------------------------------
# Datasets: __getitem__((epoch, example_indices)) -> finished batch dict
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Batch plans and the sampler
# --------------------------------------------------------------------------------------


def _chunk(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _budget_chunk(
    order: np.ndarray, token_lengths: np.ndarray, budget: int, max_rows: int | None = None
) -> list[np.ndarray]:
    """Greedy token-budget batches over ``order`` sorted by decreasing length: ``B * longest <= budget``
    (and ``B <= max_rows``: per-row state, such as FAVOR's key-value sums, grows with rows, not tokens)."""
    batches, i, n = [], 0, len(order)
    while i < n:
        m = max(1, budget // int(token_lengths[order[i]]))
        if max_rows is not None:
            m = min(m, max_rows)
        batches.append(order[i : i + m])
        i += m
    return batches


class BatchPlan:
    """Which examples form which batch, per epoch (a pure function of ``(seed, epoch)``).

    Training with ``tokens_per_batch``: examples sorted by token length (ties broken at random per
    epoch), packed greedily so ``batch rows * longest row <= tokens_per_batch``, batch order
    shuffled per epoch. The number of batches depends only on the length multiset, so it is the
    same every epoch (Lightning reads ``len()`` once). Evaluation batches are sorted by length
    (less padding) and fixed.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        token_lengths: np.ndarray | None = None,
        tokens_per_batch: int | None = None,
        max_rows: int | None = None,
    ):
        self.num_examples, self.batch_size, self.shuffle, self.seed = num_examples, batch_size, shuffle, seed
        self.token_lengths, self.tokens_per_batch, self.max_rows = token_lengths, tokens_per_batch, max_rows
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def __call__(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and (self._cache[0] == epoch or not self.shuffle):
            return self._cache[1]
        batches = self._make(epoch)
        self._cache = (epoch, batches)
        return batches

    def _make(self, epoch: int) -> list[np.ndarray]:
        n = self.num_examples
        rng = np.random.default_rng([self.seed, epoch, STREAM_ORDER]) if self.shuffle else None
        if self.tokens_per_batch is not None:
            tl = self.token_lengths
            assert tl is not None
            tie = (
                np.random.default_rng([self.seed, epoch, STREAM_TIEBREAK]).random(n)
                if self.shuffle
                else np.arange(n)
            )
            order = np.lexsort((tie, -tl))  # longest first, ties at random
            batches = _budget_chunk(order, tl, self.tokens_per_batch, self.max_rows)
            if rng is not None:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            return batches
        if self.shuffle:
            return _chunk(rng.permutation(n), self.batch_size)
        if self.token_lengths is not None:  # eval: sort by length so rows in a batch pad little
            return _chunk(np.argsort(-self.token_lengths, kind="stable"), self.batch_size)
        return _chunk(np.arange(n), self.batch_size)


class ShardedBatchSampler(DistributedSampler):
    """Yields ``(epoch, example_indices)`` per batch for this rank; resumable.

    Subclasses ``DistributedSampler`` so Lightning neither replaces it under DDP nor forgets to call
    :meth:`set_epoch`. Sharding is by whole batches: the epoch's batch list is padded by repetition
    to a multiple of ``num_replicas`` and rank ``r`` takes batches ``r, r + R, r + 2R, ...``.

    The batch list is computed when ``iter()`` is called (Lightning may create the iterator of a
    resumed epoch before calling ``set_epoch``; the DataModule therefore builds the sampler with
    the right epoch already set).
    """

    def __init__(
        self,
        dataset: Dataset,
        plan: Callable[[int], list[np.ndarray]],
        *,
        num_replicas: int = 1,
        rank: int = 0,
        epoch: int = 0,
        shuffle: bool = False,
        seed: int = 0,
    ):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.plan = plan
        self.epoch = epoch
        self._skip: tuple[int, int] | None = None

    def set_resume(self, epoch: int, batches_done: int) -> None:
        """Iterators of ``epoch`` start after its first ``batches_done`` batches.

        The skip holds until :meth:`set_epoch` moves to another epoch (not "once per ``iter()``":
        ``DataLoader`` with workers calls ``iter(sampler)`` twice when it builds its first iterator).
        """
        self.epoch = epoch
        self._skip = (epoch, batches_done) if batches_done > 0 else None

    def set_epoch(self, epoch: int) -> None:
        if self._skip is not None and self._skip[0] != epoch:
            self._skip = None
        self.epoch = epoch

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch`` (no resume skipping)."""
        batches = self.plan(epoch)
        if self.num_replicas == 1 or not batches:
            return batches
        per_rank = math.ceil(len(batches) / self.num_replicas)
        padded = [batches[i % len(batches)] for i in range(per_rank * self.num_replicas)]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self):
        epoch = self.epoch
        batches = self.rank_batches(epoch)
        if self._skip is not None and self._skip[0] == epoch:
            batches = batches[self._skip[1] :]
        return iter([(epoch, b) for b in batches])

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))


class ProteinDataLoader(DataLoader):
    """A ``DataLoader`` that tells Lightning it is resumable.

    The resume state itself lives in :meth:`ProteinDataModule.state_dict` (one source of truth);
    these methods only mark the loader as stateful so Lightning does not warn that a mid-epoch
    checkpoint cannot be resumed exactly (it can: see ``tests/test_datamodule.py``).
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------


class ProteinDataModule(pl.LightningDataModule):
    """Protein sequences for masked- or causal-LM training (see the module docstring for the design).

    Args:
        data_dir: a token cache directory (``protein-lm prepare``) or a FASTA(.gz) file (prepared
            once into ``cache_root``).
        mode: ``"single"`` (one protein per example, padded), ``"concat"`` (``<eos>``-joined
            stream cut into windows of exactly ``max_length``) or ``"packed"`` (single-mode examples
            packed whole into rows of exactly ``max_length``, kept apart by ``segment_ids``;
            ``protein_lm/packing.py``).
        max_length: tokens per example, including ``<cls>``/``<eos>`` in single mode; the row
            length in packed mode.
        objective: ``"mlm"`` (80/10/10 masking) or ``"causal"`` (next-token labels).
        batch_size: examples per batch (per device under DDP); rows per batch in packed mode
            unless ``tokens_per_batch`` is given.
        num_workers: DataLoader worker processes; batches are identical for any value.
        seed: drives order, crops, masks (not the split, which depends on content only).
        val_fraction: share of distinct sequence contents in validation (by content hash).
        test_fraction: share in test.
        val_fasta: optional FASTA (or cache dir) used as the validation set instead of the hashed
            share; its sequences are removed from train and test.
        test_fasta: optional FASTA (or cache dir) used as the test set; removed from train.
        mask_prob: MLM selection probability per residue.
        cache_root: where FASTA inputs are prepared (default ``$PROTEIN_LM_CACHE`` or
            ``~/.cache/protein_lm``).
        tokens_per_batch: single mode: pack batches by a token budget (rows × longest row)
            instead of a fixed ``batch_size``; packed mode: ``tokens_per_batch // max_length``
            rows per batch. Must be ≥ ``max_length``; not for concat mode.
        max_train_sequences: keep at most this many training sequences (a content-hash-uniform
            sample, stable across runs) — for quick runs and overfitting tests.
        max_eval_sequences: the same cap for validation and test.
        concat_random_offset: concat training windows start at a random per-epoch stream offset.
        pin_memory: pin batches when CUDA is available.
    """

    def __init__(
        self,
        data_dir: str,
        mode: str = "single",
        max_length: int = 1024,
        objective: str = "mlm",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        val_fasta: str | None = None,
        test_fasta: str | None = None,
        mask_prob: float = 0.15,
        cache_root: str | None = None,
        tokens_per_batch: int | None = None,
        max_train_sequences: int | None = None,
        max_eval_sequences: int | None = None,
        concat_random_offset: bool = True,
        pin_memory: bool = True,
    ):
        super().__init__()
        _check_choice("mode", mode, MODES)
        _check_choice("objective", objective, OBJECTIVES)
        _check_int("max_length", max_length, 2 if mode == "concat" else 3)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise DataConfigError(f"{name} must be a number in [0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise DataConfigError(
                f"val_fraction + test_fraction must be < 1 (nothing left to train on), got "
                f"{val_fraction!r} + {test_fraction!r}"
            )
        if (
            isinstance(mask_prob, bool)
            or not isinstance(mask_prob, (int, float))
            or not 0.0 < mask_prob < 1.0
        ):
            raise DataConfigError(f"mask_prob must be a number in (0, 1), got {mask_prob!r}")
        if tokens_per_batch is not None:
            if mode == "concat":
                raise DataConfigError(
                    f"tokens_per_batch={tokens_per_batch!r} applies to mode='single' or 'packed' only; concat "
                    "batches are always batch_size x max_length tokens"
                )
            _check_int("tokens_per_batch", tokens_per_batch, max_length)
        for name, value in (
            ("max_train_sequences", max_train_sequences),
            ("max_eval_sequences", max_eval_sequences),
        ):
            if value is not None:
                _check_int(name, value, 1)
        if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
            raise DataConfigError(f"data_dir must be a path to a token cache or FASTA file, got {data_dir!r}")
        for name, value in (("data_dir", data_dir), ("val_fasta", val_fasta), ("test_fasta", test_fasta)):
            if value is not None and not Path(value).expanduser().exists():
                raise DataConfigError(f"{name}: {value}: no such file or directory")

        self.save_hyperparameters()
        self.data_dir, self.mode, self.max_length, self.objective = str(data_dir), mode, max_length, objective
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.val_fasta, self.test_fasta, self.cache_root = val_fasta, test_fasta, cache_root
        self.mask_prob, self.tokens_per_batch = float(mask_prob), tokens_per_batch
        self.max_train_sequences, self.max_eval_sequences = max_train_sequences, max_eval_sequences
        self.concat_random_offset, self.pin_memory = concat_random_offset, pin_memory

        self._splits: dict[str, tuple[TokenCache, np.ndarray]] | None = None
        self._datasets: dict[str, Dataset] = {}
        self._plans: dict[str, PackedPlan] = {}
        self._train_sampler: ShardedBatchSampler | None = None
        self._epoch = 0  # counters for loops without a Trainer (set_epoch / mark_batch_done)
        self._batches_done = 0
        self._resume: tuple[int, int] | None = None

    # ---- constants the model links to ---------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """33: the ESM-2 alphabet (LightningCLI links this to the model's ``vocab_size``)."""
        return VOCAB_SIZE

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def mask_id(self) -> int:
        return MASK_ID

    # ---- preparing and splitting --------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the token caches of FASTA inputs (once per node; a cache hit afterwards)."""
        for path in (self.data_dir, self.val_fasta, self.test_fasta):
            if path is not None:
                ensure_cache(path, self.cache_root)

    def setup(self, stage: str | None = None) -> None:
        """Open the caches and assign every sequence to train / val / test (idempotent)."""
        if self._splits is not None:
            return
        main = TokenCache(ensure_cache(self.data_dir, self.cache_root))
        hashes = main.content_hashes()  # stored with the cache: computed once, not per setup
        split = assign_splits(hashes, self.val_fraction, self.test_fraction)
        splits: dict[str, tuple[TokenCache, np.ndarray]] = {}
        explicit_hashes: list[np.ndarray] = []
        for code, fasta in ((VAL, self.val_fasta), (TEST, self.test_fasta)):
            if fasta is None:
                continue
            cache = TokenCache(ensure_cache(fasta, self.cache_root))
            h = cache.content_hashes()
            keep = np.arange(len(cache))
            if explicit_hashes:  # a test sequence also in the explicit val set stays in val only
                keep = keep[~np.isin(h, explicit_hashes[0])]
            splits[SPLIT_NAMES[code]] = (cache, keep)
            split[split == code] = TRAIN  # the explicit set replaces the hashed share
            explicit_hashes.append(h)
        if explicit_hashes:  # never train or test on content of an explicit evaluation set
            split[np.isin(hashes, np.concatenate(explicit_hashes))] = _EXCLUDED
        for code, name in enumerate(SPLIT_NAMES):
            if name not in splits:
                splits[name] = (main, np.flatnonzero(split == code))
        cap = {
            "train": self.max_train_sequences,
            "val": self.max_eval_sequences,
            "test": self.max_eval_sequences,
        }
        for name, (cache, ids) in splits.items():
            if cap[name] is not None and len(ids) > cap[name]:
                h = cache.content_hashes()[ids]
                ids = np.sort(ids[np.argsort(h, kind="stable")[: cap[name]]])
                splits[name] = (cache, ids)
        self._splits = splits
        rank_zero_info(self.describe())

    def split_indices(self, split: str) -> tuple[TokenCache, np.ndarray]:
        """``(cache, sequence indices)`` of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    @property
    def rows_per_batch(self) -> int:
        """Packed mode: rows per batch (``tokens_per_batch // max_length``, else ``batch_size``)."""
        return self.tokens_per_batch // self.max_length if self.tokens_per_batch else self.batch_size

    def dataset(self, split: str) -> SingleProteinDataset | ConcatProteinDataset:
        """The (cached) dataset of ``split``; its ``__getitem__`` takes ``(epoch, example indices)``."""
        if split not in self._datasets:
            cache, ids = self.split_indices(split)
            self._datasets[split] = self._build_dataset(cache, ids, split)
        return self._datasets[split]

    def _build_dataset(
        self, cache: TokenCache, ids: np.ndarray, split: str
    ) -> SingleProteinDataset | ConcatProteinDataset:
        train = split == "train"
        stream = {"train": STREAM_TRAIN_MASK, "val": STREAM_VAL_MASK, "test": STREAM_TEST_MASK}[split]
        common = dict(
            max_length=self.max_length,
            objective=self.objective,
            mask_prob=self.mask_prob,
            seed=self.seed,
            train=train,
            mask_stream=stream,
        )
        if self.mode == "concat":
            return ConcatProteinDataset(cache, ids, random_offset=self.concat_random_offset, **common)
        offsets = np.asarray(cache.offsets)
        lengths = offsets[ids + 1] - offsets[ids]
        kind = PackedProteinDataset if self.mode == "packed" else SingleProteinDataset
        if train:
            return kind(cache, offsets[ids], lengths, ids, **common)
        # evaluation: consecutive windows of max_length - 2 residues, each framed <cls> ... <eos>
        w = self.max_length - 2
        k = (lengths + w - 1) // w
        seq = np.repeat(np.arange(len(ids)), k)
        j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        starts = offsets[ids][seq] + j * w
        lens = np.minimum(w, lengths[seq] - j * w)
        return kind(cache, starts, lens, np.arange(len(starts)), **common)

    def evaluation_dataloader(
        self, path: str, max_sequences: int | None = None, tokens_per_batch: int | None = None,
        max_rows: int | None = None,
    ) -> DataLoader:
        """Deterministic evaluation batches over *every* sequence of a FASTA file or cache dir.

        For ``protein-lm evaluate``: no split, the first ``max_sequences`` sequences in file order,
        the same windows / fixed seeded masks as the test split, so two runs give identical numbers.
        ``tokens_per_batch`` (single mode) packs batches by a token budget instead of the module's
        setting, at most ``max_rows`` rows each: many short records then share one batch.
        """
        if max_sequences is not None:
            _check_int("max_sequences", max_sequences, 1)
        cache = TokenCache(ensure_cache(path, self.cache_root))
        ids = np.arange(min(len(cache), max_sequences or len(cache)))
        ds = self._build_dataset(cache, ids, "test")
        if len(ds) == 0:
            raise UserError(
                f"{path}: nothing to evaluate (no sequences, or fewer than max_length tokens in concat mode)"
            )
        if isinstance(ds, PackedProteinDataset):
            budget = tokens_per_batch or self.tokens_per_batch
            rows = budget // self.max_length if budget else self.batch_size
            plan: Callable[[int], list[np.ndarray]] = PackedPlan(
                ds.token_lengths(), max_length=self.max_length, rows_per_batch=min(rows, max_rows or rows),
                shuffle=False, seed=self.seed,
            )
        else:
            single = ds if isinstance(ds, SingleProteinDataset) else None
            plan = BatchPlan(
                len(ds),
                batch_size=self.batch_size,
                shuffle=False,
                seed=self.seed,
                token_lengths=single.token_lengths() if single else None,
                tokens_per_batch=(tokens_per_batch or self.tokens_per_batch) if single else None,
                max_rows=max_rows,
            )
        replicas, rank = self._world()
        return self._loader(ShardedBatchSampler(ds, plan, num_replicas=replicas, rank=rank))

    def describe(self) -> str:
        """One line: configuration and split sizes (logged by :meth:`setup`)."""
        parts = []
        for name in SPLIT_NAMES:
            cache, ids = self.split_indices(name)
            offsets = np.asarray(cache.offsets)
            residues = int((offsets[ids + 1] - offsets[ids]).sum())
            extra = ""
            if self.mode == "concat":
                extra = f", {(residues + len(ids)) // self.max_length:,} windows"
            if self.mode == "packed":
                plan = self._plan(name)
                extra = f", {plan.num_rows:,} rows, {100 * plan.padding_fraction():.2f}% padding"
            parts.append(f"{name} {len(ids):,} seqs / {residues:,} residues{extra}")
        rows = f", rows_per_batch={self.rows_per_batch}" if self.mode == "packed" else ""
        return (
            f"ProteinDataModule(mode={self.mode}, objective={self.objective}, max_length={self.max_length}, "
            f"batch_size={self.batch_size}{rows}, seed={self.seed}): " + "; ".join(parts)
        )

    # ---- loaders ------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _plan(self, split: str) -> BatchPlan | PackedPlan:
        ds = self.dataset(split)
        if isinstance(ds, PackedProteinDataset):
            if split not in self._plans:  # packing the split costs ~1 s per 500k proteins: once
                self._plans[split] = PackedPlan(
                    ds.token_lengths(), max_length=self.max_length, rows_per_batch=self.rows_per_batch,
                    shuffle=split == "train", seed=self.seed,
                )
            return self._plans[split]
        token_lengths = ds.token_lengths() if isinstance(ds, SingleProteinDataset) else None
        return BatchPlan(
            len(ds),
            batch_size=self.batch_size,
            shuffle=split == "train",
            seed=self.seed,
            token_lengths=token_lengths,
            tokens_per_batch=self.tokens_per_batch,
        )

    def _loader(self, sampler: ShardedBatchSampler) -> DataLoader:
        return ProteinDataLoader(
            sampler.dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_sampler(self) -> ShardedBatchSampler:
        """A fresh training sampler, positioned at the pending resume point if any."""
        ds = self.dataset("train")
        if len(ds) == 0:
            raise UserError(
                f"{self.data_dir}: the training split is empty ({self.describe()}); "
                + ("use a smaller max_length or more data" if self.mode == "concat" else "add data")
            )
        replicas, rank = self._world()
        if self._resume is not None:
            epoch = self._resume[0]
        else:
            trainer = getattr(self, "trainer", None)
            epoch = int(trainer.current_epoch) if trainer is not None else self._epoch
        sampler = ShardedBatchSampler(
            ds,
            self._plan("train"),
            num_replicas=replicas,
            rank=rank,
            epoch=epoch,
            shuffle=True,
            seed=self.seed,
        )
        if self._resume is not None:
            sampler.set_resume(*self._resume)
            self._resume = None
        return sampler

    def train_dataloader(self) -> DataLoader:
        self._train_sampler = self.train_sampler()
        return self._loader(self._train_sampler)

    def _eval_loader(self, split: str) -> DataLoader | list:
        ds = self.dataset(split)
        if len(ds) == 0:
            explicit = self.val_fasta if split == "val" else self.test_fasta
            fraction = self.val_fraction if split == "val" else self.test_fraction
            if explicit is None and fraction == 0:
                return []  # evaluation on this split is switched off
            raise UserError(
                f"the {split} split has no examples ({self.describe()}); raise {split}_fraction, give "
                + (
                    "a smaller max_length (concat windows need max_length tokens)"
                    if self.mode == "concat"
                    else "more data"
                )
            )
        replicas, rank = self._world()
        sampler = ShardedBatchSampler(ds, self._plan(split), num_replicas=replicas, rank=rank, shuffle=False)
        return self._loader(sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    # ---- resume -------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (loops without a Trainer; Lightning calls the sampler's ``set_epoch``)."""
        self._epoch, self._batches_done = int(epoch), 0
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(int(epoch))

    def mark_batch_done(self) -> None:
        """Count one consumed training batch (loops without a Trainer)."""
        self._batches_done += 1

    def _progress(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            epoch = int(trainer.current_epoch)
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            total = trainer.num_training_batches
            if done > 0 and total != float("inf") and done >= total:
                return epoch + 1, 0  # the epoch is complete: resume at the start of the next one
            return epoch, done
        return self._epoch, self._batches_done

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_done"}``: where the next training iterator must start."""
        epoch, done = self._progress()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next training iterator is ``epoch``'s, minus its first ``batches_done`` batches."""
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        self._epoch, self._batches_done = epoch, done
        if self._train_sampler is not None:
            self._train_sampler.set_resume(epoch, done)
        else:
            self._resume = (epoch, done)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
