"""The ``DataLoader`` of one process: the resumable loader class, its settings, and the DDP rank it serves.

Every loader takes whole batches from a :class:`protein_lm.data.sampler.ShardedBatchSampler`
(``batch_size=None``: the dataset builds the batch), so one worker request is one batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from protein_lm.data.sampler import ShardedBatchSampler


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


def make_loader(sampler: ShardedBatchSampler, *, num_workers: int, pin_memory: bool) -> DataLoader:
    """The loader over ``sampler``'s batches; ``pin_memory`` only takes effect when CUDA is available."""
    return ProteinDataLoader(
        sampler.dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def ddp_world(trainer: Any | None) -> tuple[int, int]:
    """``(world size, rank)`` the samplers shard over: the Trainer's, else ``torch.distributed``'s, else one process."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
