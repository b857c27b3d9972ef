"""``ProteinDataModule``: token cache -> split by content -> examples -> MLM or causal batches.

The stages and their modules are listed in :mod:`protein_lm.data`. The example modes (``mode=``):

* single: one protein per example, ``<cls> residues <eos>``; dynamic padding (pad id 1).
  train: a random crop of the *residues* to ``max_length - 2``, then ``<cls>``/``<eos>`` framing (so
  every example is framed the same way, cropped or not; a cropped window's ``<cls>``/``<eos>`` then
  mark the window, not the true protein ends). eval: deterministic consecutive windows of
  ``max_length - 2`` residues, each framed ``<cls> ... <eos>``: every residue of every sequence is in
  exactly one window.
* concat: the split's sequences in cache order as one stream ``s1 <eos> s2 <eos> s3 <eos> ...`` (no
  ``<cls>``: the ``<eos>`` separator alone marks boundaries, as in the Performer paper) cut into
  windows of exactly ``max_length`` tokens, no padding. Only the final partial window
  (``< max_length`` tokens) per split is dropped. In training the stream is read circularly from a
  random per-epoch offset, so window boundaries move every epoch and the dropped remainder is a
  different piece each epoch; evaluation uses offset 0.
* packed: the single-mode examples (same framing, crops, windows and masks) placed whole into rows
  of exactly ``max_length`` tokens, padding only at a row's tail (``packing.py``); batches add
  ``segment_ids`` and ``positions`` so the model keeps the proteins apart.

Batches are ``{"input_ids", "labels", "padding_mask"}`` (int64, int64 with -100, bool True at
padding; ``collate.py``): ``mlm``: 15 % of residues selected, 80/10/10 ``<mask>``/random standard
AA/unchanged; ``causal``: ``labels[:, t] = input_ids[:, t + 1]`` (packed: not across a protein
boundary). They are assembled inside the dataset (``datasets.py``), one whole batch per worker request.

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

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from protein_lm.data.cache import ensure_cache
from protein_lm.data.collate import STREAM_TEST_MASK, STREAM_TRAIN_MASK, STREAM_VAL_MASK
from protein_lm.data.datasets import (
    ConcatProteinDataset,
    PackedProteinDataset,
    SingleProteinDataset,
    evaluation_windows,
)
from protein_lm.data.packing import PackedPlan
from protein_lm.data.readers import TokenCache
from protein_lm.data.sampler import BatchPlan, ShardedBatchSampler
from protein_lm.data.splits import SPLIT_NAMES, TEST, VAL, assign_with_explicit_sets, sample_by_hash
from protein_lm.data.tokenizer import VOCAB_SIZE
from protein_lm.errors import UserError

MODES = ("single", "concat", "packed")
OBJECTIVES = ("mlm", "causal")


class DataConfigError(UserError, ValueError):
    """A bad ``ProteinDataModule`` argument (a ``UserError`` for the CLI, a ``ValueError`` for Python)."""


class ProteinDataLoader(DataLoader):
    """A ``DataLoader`` that tells Lightning it is resumable.

    The resume state itself lives in :meth:`ProteinDataModule.state_dict` (one source of truth);
    these methods only mark the loader as stateful so Lightning does not warn that a mid-epoch
    checkpoint cannot be resumed exactly (it can: see ``tests/data/test_datamodule.py``).
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class ProteinDataModule(pl.LightningDataModule):
    """Protein sequences for masked- or causal-LM training (see the module docstring for the design).

    Args:
        data_dir: a token cache directory (``protein-lm prepare``) or a FASTA(.gz) file (prepared
            once into ``cache_root``).
        mode: ``"single"`` (one protein per example, padded), ``"concat"`` (``<eos>``-joined
            stream cut into windows of exactly ``max_length``) or ``"packed"`` (single-mode examples
            packed whole into rows of exactly ``max_length``, kept apart by ``segment_ids``;
            ``protein_lm/data/packing.py``).
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
        explicit = {
            code: TokenCache(ensure_cache(fasta, self.cache_root))
            for code, fasta in ((VAL, self.val_fasta), (TEST, self.test_fasta))
            if fasta is not None
        }
        # the hashes are stored with each cache: computed once, not per setup
        codes, keep = assign_with_explicit_sets(
            main.content_hashes(), self.val_fraction, self.test_fraction,
            *(explicit[c].content_hashes() if c in explicit else None for c in (VAL, TEST)),
        )
        caps = (self.max_train_sequences, self.max_eval_sequences, self.max_eval_sequences)
        splits: dict[str, tuple[TokenCache, np.ndarray]] = {}
        for code, name in enumerate(SPLIT_NAMES):
            cache, ids = (explicit[code], keep[code]) if code in explicit else (main, np.flatnonzero(codes == code))
            splits[name] = (cache, sample_by_hash(ids, cache.content_hashes(), caps[code]))
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
        starts, lens = evaluation_windows(offsets[ids], lengths, self.max_length)
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
        plan = self._new_plan(ds, shuffle=False, tokens_per_batch=tokens_per_batch or self.tokens_per_batch,
                              max_rows=max_rows)
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
        if split in self._plans:  # packing the split costs ~1 s per 500k proteins: once
            return self._plans[split]
        ds = self.dataset(split)
        plan = self._new_plan(ds, shuffle=split == "train", tokens_per_batch=self.tokens_per_batch)
        if isinstance(plan, PackedPlan):
            self._plans[split] = plan
        return plan

    def _new_plan(
        self, ds: Dataset, *, shuffle: bool, tokens_per_batch: int | None, max_rows: int | None = None
    ) -> BatchPlan | PackedPlan:
        """The batches of ``ds``: packed rows, token-budget batches (single mode) or ``batch_size`` ones."""
        if isinstance(ds, PackedProteinDataset):
            rows = tokens_per_batch // self.max_length if tokens_per_batch else self.batch_size
            if rows < 1:
                raise DataConfigError(f"tokens_per_batch={tokens_per_batch} holds no packed row of max_length="
                                      f"{self.max_length}: give at least {self.max_length}")
            return PackedPlan(
                ds.token_lengths(), max_length=self.max_length, rows_per_batch=min(rows, max_rows or rows),
                shuffle=shuffle, seed=self.seed,
            )
        single = isinstance(ds, SingleProteinDataset)
        return BatchPlan(
            len(ds),
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            token_lengths=ds.token_lengths() if single else None,
            tokens_per_batch=tokens_per_batch if single else None,
            max_rows=max_rows,
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
