"""Sharded FSDP checkpoints (``state_dict_type: sharded``) read as one full state dict, on one process.

Lightning writes such a checkpoint as a directory: ``meta.pt`` (everything but the weights and
the optimiser state: loop progress, hyperparameters, callbacks, the ``protein_lm`` record) plus
``torch.distributed.checkpoint`` (DCP) files, ``.metadata`` and one ``__<rank>_0.distcp`` per rank.
:func:`read_sharded_checkpoint` returns the same dict a full ``.ckpt`` file holds, minus the
optimiser state, so :func:`protein_lm.checkpoint.read_checkpoint` (hence ``evaluate``, ``embed``,
``analyze``, ``export``, ``--model.init_weights``) takes the directory like a file.

Nothing in it runs code: ``meta.pt`` and the tensor files are read with ``weights_only=True``,
and DCP's ``.metadata`` (a plain pickle) with an unpickler that builds only DCP's own metadata
classes, ``torch.Size``, dtypes and layouts. Entries stored as pickled bytes instead of tensors
are dropped from the metadata before DCP plans the load, since it would unpickle them without
restriction.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from protein_lm.errors import UserError

META_FILE = "meta.pt"  # lightning_fabric.utilities.load._METADATA_FILENAME
DCP_METADATA = ".metadata"
_MODEL_KEY = "model"  # Lightning's key for the module's state dict in a sharded checkpoint

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by a sharded FSDP save."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / DCP_METADATA).is_file()


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint: the checkpoint without weights and optimiser state."""
    data = _load_weights_only(Path(path) / META_FILE, "cpu")
    if not isinstance(data, dict):
        raise UserError(f"{path}: {META_FILE} is not a Lightning checkpoint record")
    return data


def read_sharded_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint as a full Lightning checkpoint dict: ``meta.pt``'s keys + ``state_dict``.

    The state dict holds every rank's shards joined into whole tensors (keys ``model.*``, as
    in a ``.ckpt`` file); the optimiser state is left out (it is as large as the weights twice over,
    and only a resumed run, which Lightning loads itself, needs it).
    """
    path = Path(path)
    meta = checkpoint_meta(path)
    reader = _SafeReader(path)
    metadata = reader.read_metadata()
    if reader.dropped_model_entries:
        raise UserError(f"{path}: model entries stored as pickled objects, not tensors "
                        f"({reader.dropped_model_entries[:3]}); refusing to unpickle them")
    model_keys = [k for k in metadata.state_dict_metadata if k.split(".", 1)[0] == _MODEL_KEY]
    if not model_keys:
        raise UserError(f"{path}: sharded checkpoint without model weights (as tensors)")
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={_MODEL_KEY}),
                         no_dist=True)
    except (OSError, RuntimeError, ValueError, KeyError, CheckpointException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot read the sharded checkpoint's weights ({first})") from None
    weights = {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in state[_MODEL_KEY].items()}
    return {**meta, "state_dict": weights}


def _load_weights_only(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch's message runs to pages; its first sentence says what failed
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise UserError(f"{path}: cannot read ({type(err).__name__}: {first})") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else (the pickle documentation's "restricting globals")."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == _DCP_METADATA_MODULE:  # the classes defined there (not what it imports)
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the ``.metadata`` pickle read by :class:`_MetadataUnpickler`."""

    dropped_model_entries: list[str] = []  # non-tensor entries the model's part of the load would read

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        file = Path(self.path) / DCP_METADATA
        try:
            metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as err:
            raise UserError(f"{file}: not a checkpoint's metadata ({err})") from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"{file}: not a checkpoint's metadata (a {type(metadata).__name__})")
        # Only tensors are ever loaded: drop every other entry (DCP would unpickle it without
        # restriction), whatever key or planner path the file gives it.
        dropped = {k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)}
        planner = metadata.planner_data or {}
        self.dropped_model_entries = sorted(
            k for k in dropped
            if k.split(".", 1)[0] == _MODEL_KEY or (isinstance(planner.get(k), (tuple, list)) and planner.get(k)
                                                    and planner[k][0] == _MODEL_KEY)
        )
        metadata.state_dict_metadata = {k: v for k, v in metadata.state_dict_metadata.items() if k not in dropped}
        if metadata.planner_data:
            metadata.planner_data = {k: v for k, v in metadata.planner_data.items() if k not in dropped}
        metadata.storage_data = {i: d for i, d in (metadata.storage_data or {}).items() if i.fqn not in dropped}
        missing = sorted({str(d.relative_path) for d in metadata.storage_data.values()
                          if not (Path(self.path) / d.relative_path).is_file()})
        if missing:
            raise UserError(f"{self.path}: sharded checkpoint is incomplete (missing {', '.join(missing[:3])}); "
                            "copy the whole directory")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
