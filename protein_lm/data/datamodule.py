"""``ProteinDataModule``: token cache -> split by content -> examples -> MLM or causal batches.

The stages and their modules are listed in :mod:`protein_lm.data`. Where each part is described:

* the example modes ``single`` / ``concat`` / ``packed`` (framing, crops, evaluation windows):
  :mod:`protein_lm.data.datasets` (packed rows: :mod:`protein_lm.data.packing`);
* the batch dict and the MLM / causal labels: :mod:`protein_lm.data.collate`;
* which examples form which batch: :mod:`protein_lm.data.plans` and :mod:`protein_lm.data.sampler`
  (which also says how batches are sharded under DDP);
* determinism and exact resume (``state_dict()`` / ``load_state_dict()``, and why a LightningModule
  needs no hook for it): :mod:`protein_lm.data.resume`;
* the checks of the arguments below: :mod:`protein_lm.data.options`.

``evaluation_dataloader(path, max_sequences)`` gives deterministic evaluation batches over a whole
FASTA file (for ``protein-lm evaluate``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from protein_lm.data.cache import ensure_cache
from protein_lm.data.datasets import ConcatProteinDataset, SingleProteinDataset, build_dataset
from protein_lm.data.loader import ProteinDataLoader, ddp_world, make_loader
from protein_lm.data.options import DataConfigError, check_int, check_options
from protein_lm.data.packing import PackedPlan
from protein_lm.data.plans import batch_plan
from protein_lm.data.readers import TokenCache
from protein_lm.data.resume import fit_progress
from protein_lm.data.sampler import BatchPlan, ShardedBatchSampler
from protein_lm.data.splits import SPLIT_NAMES, TEST, VAL, split_caches
from protein_lm.data.tokenizer import VOCAB_SIZE
from protein_lm.errors import UserError

__all__ = ["DataConfigError", "ProteinDataLoader", "ProteinDataModule"]


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
        check_options(
            data_dir=data_dir, mode=mode, max_length=max_length, objective=objective, batch_size=batch_size,
            num_workers=num_workers, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
            val_fasta=val_fasta, test_fasta=test_fasta, mask_prob=mask_prob, tokens_per_batch=tokens_per_batch,
            max_train_sequences=max_train_sequences, max_eval_sequences=max_eval_sequences,
        )

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
        caps = (self.max_train_sequences, self.max_eval_sequences, self.max_eval_sequences)
        self._splits = split_caches(main, explicit, self.val_fraction, self.test_fraction, caps)
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
        return build_dataset(
            cache, ids, split, mode=self.mode, max_length=self.max_length, objective=self.objective,
            mask_prob=self.mask_prob, seed=self.seed, concat_random_offset=self.concat_random_offset,
        )

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
            check_int("max_sequences", max_sequences, 1)
        cache = TokenCache(ensure_cache(path, self.cache_root))
        ids = np.arange(min(len(cache), max_sequences or len(cache)))
        ds = self._build_dataset(cache, ids, "test")
        if len(ds) == 0:
            raise UserError(
                f"{path}: nothing to evaluate (no sequences, or fewer than max_length tokens in concat mode)"
            )
        plan = self._new_plan(ds, shuffle=False, tokens_per_batch=tokens_per_batch or self.tokens_per_batch,
                              max_rows=max_rows)
        replicas, rank = ddp_world(self.trainer)
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
        return batch_plan(ds, max_length=self.max_length, batch_size=self.batch_size, seed=self.seed,
                          shuffle=shuffle, tokens_per_batch=tokens_per_batch, max_rows=max_rows)

    def _loader(self, sampler: ShardedBatchSampler) -> DataLoader:
        return make_loader(sampler, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_sampler(self) -> ShardedBatchSampler:
        """A fresh training sampler, positioned at the pending resume point if any."""
        ds = self.dataset("train")
        if len(ds) == 0:
            raise UserError(
                f"{self.data_dir}: the training split is empty ({self.describe()}); "
                + ("use a smaller max_length or more data" if self.mode == "concat" else "add data")
            )
        replicas, rank = ddp_world(self.trainer)
        if self._resume is not None:
            epoch = self._resume[0]
        else:
            epoch = int(self.trainer.current_epoch) if self.trainer is not None else self._epoch
        sampler = ShardedBatchSampler(ds, self._plan("train"), num_replicas=replicas, rank=rank, epoch=epoch,
                                      shuffle=True, seed=self.seed)
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
            remedy = ("a smaller max_length (concat windows need max_length tokens)" if self.mode == "concat"
                      else "more data")
            raise UserError(f"the {split} split has no examples ({self.describe()}); raise {split}_fraction, "
                            f"give {remedy}")
        replicas, rank = ddp_world(self.trainer)
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

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_done"}``: where the next training iterator must start."""
        epoch, done = fit_progress(self.trainer) or (self._epoch, self._batches_done)
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next training iterator is ``epoch``'s, minus its first ``batches_done`` batches."""
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        self._epoch, self._batches_done = epoch, done
        if self._train_sampler is not None:
            self._train_sampler.set_resume(epoch, done)
        else:
            self._resume = (epoch, done)

