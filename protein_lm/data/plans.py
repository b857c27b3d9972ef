"""The batch plan of a dataset: which of the three kinds of plan it gets, with which batch size.

* packed rows (:class:`protein_lm.data.packing.PackedPlan`) for a ``PackedProteinDataset``, with
  ``tokens_per_batch // max_length`` rows per batch, else ``batch_size``;
* token-budget batches (:class:`protein_lm.data.sampler.BatchPlan` with ``tokens_per_batch``) for a
  ``SingleProteinDataset`` when ``tokens_per_batch`` is given;
* ``batch_size`` examples per batch otherwise (always in concat mode, whose windows all have
  ``max_length`` tokens).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from protein_lm.data.datasets import PackedProteinDataset, SingleProteinDataset
from protein_lm.data.options import DataConfigError
from protein_lm.data.packing import PackedPlan
from protein_lm.data.sampler import BatchPlan


def batch_plan(
    ds: Dataset,
    *,
    max_length: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    tokens_per_batch: int | None,
    max_rows: int | None = None,
) -> BatchPlan | PackedPlan:
    """The batches of ``ds``; ``shuffle`` for training, ``max_rows`` caps the rows of any batch."""
    if isinstance(ds, PackedProteinDataset):
        rows = tokens_per_batch // max_length if tokens_per_batch else batch_size
        if rows < 1:
            raise DataConfigError(f"tokens_per_batch={tokens_per_batch} holds no packed row of max_length="
                                  f"{max_length}: give at least {max_length}")
        return PackedPlan(
            ds.token_lengths(), max_length=max_length, rows_per_batch=min(rows, max_rows or rows),
            shuffle=shuffle, seed=seed,
        )
    single = isinstance(ds, SingleProteinDataset)
    return BatchPlan(
        len(ds),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        token_lengths=ds.token_lengths() if single else None,
        tokens_per_batch=tokens_per_batch if single else None,
        max_rows=max_rows,
    )
