"""Which examples form which batch (:class:`BatchPlan`), and the sampler that hands them out per rank.

Training order is a pure function of ``(seed, epoch)``; evaluation batches are fixed. The sampler
shards whole batches across DDP ranks and resumes mid-epoch (see :class:`ShardedBatchSampler`).
Packed mode plans its rows with :class:`protein_lm.data.packing.PackedPlan`, which the same sampler
serves.

DDP: the sampler is a :class:`torch.utils.data.DistributedSampler` subclass that shards *batches*
across ``trainer.world_size`` ranks itself (padding the batch list by repetition so every rank gets
the same number of batches, like ``DistributedSampler``), so Lightning keeps it as is
(``use_distributed_sampler`` may stay at its default) and still calls its ``set_epoch``.
``trainer.overfit_batches`` is not supported (it replaces the sampler); use ``max_train_sequences``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

from protein_lm.data.collate import STREAM_ORDER, STREAM_TIEBREAK


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
