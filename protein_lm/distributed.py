"""Multi-GPU training: the FSDP strategy for ``protein-lm fit``, and what the LightningModule needs under it.

DDP needs nothing of its own (``--trainer.strategy ddp``, ``configs/strategy_ddp.yaml``). FSDP shards
parameters, gradients and optimiser state across ranks, for models whose AdamW state does not fit
one GPU. :class:`BlockFSDP` (``configs/strategy_fsdp.yaml``) is Lightning's ``FSDPStrategy`` with
this model's settings as plain options:

* one FSDP unit per Transformer :class:`~protein_lm.model.Block` (the auto-wrap policy), so only
  one block's full parameters exist at a time; the embedding (tied to the output head), the final
  norm and the head bias form the root unit;
* activation checkpointing per Block (recomputed in the backward pass);
* mixed precision: ``trainer.precision: bf16-mixed`` computes with bf16 parameters but reduces
  gradients in float32 (``reduce_dtype``) and keeps buffers in float32. Lightning's own default
  casts buffers to bf16 too, which would round the Performer's random projections and the rotary
  frequencies (both buffers);
* checkpoints: ``state_dict_type: full`` writes one ``.ckpt`` file as DDP does (gathered on rank
  0), which every command reads; ``sharded`` writes a directory per checkpoint (each rank its
  shard, no gather), which ``--ckpt_path`` resumes from and :func:`protein_lm.checkpoint.read_checkpoint`
  reads as full weights (:mod:`protein_lm.sharded_checkpoint`). A sharded checkpoint is written
  next to its final name and swapped in, so a kill never leaves half a checkpoint in its place;
* CPU processes (gloo) work too, which is how the tests run it: torch's FSDP runs on CPU only when
  given ``device_id=cpu``, which Lightning passes only for GPUs.

Under any ``FSDPStrategy`` (Lightning's plain ``--trainer.strategy fsdp`` included) parameters
are flat shards outside the forward pass, so the LightningModule asks this module for the
norm-clipping (:func:`clip_gradients`, over all shards) and for each parameter's real shape
(:func:`remember_shapes` / :func:`logical_ndim`, for the weight-decay groups), and refuses what
FSDP would get wrong: Muon, and learned adaptive spans (:func:`check_supported`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

from protein_lm.errors import UserError
from protein_lm.io import remove_path, replace_dir

_SHAPE_ATTR = "protein_lm_shape"  # set on each parameter before FSDP flattens it
_REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BlockFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy with one unit per :class:`~protein_lm.model.Block` (module docstring).

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimiser state sharded),
            ``SHARD_GRAD_OP`` (parameters kept whole between forward and backward),
            ``HYBRID_SHARD`` (full sharding within a node, replicas across nodes) or ``NO_SHARD``.
        activation_checkpointing: recompute each Block's activations in the backward pass.
        state_dict_type: ``full`` (one checkpoint file) or ``sharded`` (one directory, a file per rank).
        reduce_dtype: gradient reduction under mixed precision, ``float32`` or ``bfloat16``
            (half the communication, less exact).
        cpu_offload: keep parameters and their gradients in CPU memory between uses.
        **kwargs: the other ``FSDPStrategy`` / ``FullyShardedDataParallel`` arguments.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = True,
        state_dict_type: Literal["full", "sharded"] = "full",
        reduce_dtype: Literal["float32", "bfloat16"] = "float32",
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from protein_lm.model import Block

        if reduce_dtype not in _REDUCE_DTYPES:
            raise UserError(f"strategy reduce_dtype must be one of {', '.join(_REDUCE_DTYPES)}, got {reduce_dtype!r}")
        super().__init__(
            sharding_strategy=sharding_strategy,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            activation_checkpointing_policy=ModuleWrapPolicy({Block}) if activation_checkpointing else None,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            **kwargs,
        )
        self.reduce_dtype = reduce_dtype

    @property
    def mixed_precision_config(self):
        """Low-precision compute, float32 buffers and (by default) float32 gradient reduction."""
        if self.mixed_precision is not None:
            return self.mixed_precision
        low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision_plugin.precision)
        if low is None:
            return super().mixed_precision_config
        from torch.distributed.fsdp import MixedPrecision

        return MixedPrecision(param_dtype=low, reduce_dtype=_REDUCE_DTYPES[self.reduce_dtype],
                              buffer_dtype=torch.float32)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning's wrapping, with the device_id torch's FSDP needs to run on CPU at all.
        from pytorch_lightning.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    # On CPU, full state dicts are gathered without offload_to_cpu (see _full_state_dict_on_cpu).
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with _full_state_dict_on_cpu(self.model):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        with _full_state_dict_on_cpu(self.model):
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # keyed by parameter index, as a plain optimizer's (Lightning's format)
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        part, old = path.with_name(path.name + ".part"), path.with_name(path.name + ".old")
        if self.global_rank == 0:
            remove_path(part)  # debris of a save that was interrupted
            restore_interrupted_saves(path.parent)
        self.barrier("sharded_checkpoint_start")
        super().save_checkpoint(checkpoint, part, storage_options)  # every rank writes its shard
        self.barrier("sharded_checkpoint_written")
        if self.global_rank == 0:  # a kill between the two renames leaves the previous one as .old
            replace_dir(part, path, aside=old)
        self.barrier("sharded_checkpoint_done")
        return None


def restore_interrupted_saves(dirpath: str | os.PathLike) -> list[Path]:
    """Put back every ``NAME.old`` whose ``NAME`` is missing in ``dirpath``: a sharded save killed
    between moving the previous checkpoint aside and moving the new one in leaves only the ``.old``,
    which ``--ckpt_path last`` would not find (it would silently start over). Returns what it restored."""
    restored = []
    root = Path(dirpath)
    if not root.is_dir():
        return restored
    for held in sorted(root.glob("*.old")):
        target = held.with_name(held.name[: -len(".old")])
        if not target.exists():
            os.replace(held, target)
            restored.append(target)
    return restored


def _full_state_dict_on_cpu(module: nn.Module) -> Any:
    """Full state dicts gathered on rank 0, without ``offload_to_cpu``: on CPU parameters that
    option frees the gathered storage before it is copied (a segfault in torch 2.13), and they are in
    CPU memory anyway."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))


def is_fsdp(trainer: Any) -> bool:
    """Whether ``trainer`` (or None) trains with an FSDP strategy."""
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def names_fsdp(strategy: Any) -> bool:
    """Whether a ``trainer.strategy`` setting (a name, a ``class_path`` config or an object) is FSDP."""
    if isinstance(strategy, str):
        return strategy.startswith("fsdp")
    if isinstance(strategy, FSDPStrategy):
        return True
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # Lightning reports a wrong class path itself
    return isinstance(cls, type) and issubclass(cls, FSDPStrategy)


def remember_shapes(model: nn.Module) -> None:
    """Record every parameter's shape on the parameter, before FSDP replaces its data by a flat shard.

    FSDP keeps the same parameter objects (``use_orig_params``), so the record survives wrapping.
    Idempotent: a parameter that has one keeps it.
    """
    for param in model.parameters():
        if not hasattr(param, _SHAPE_ATTR):
            setattr(param, _SHAPE_ATTR, tuple(param.shape))


def logical_ndim(param: torch.Tensor) -> int:
    """The number of dimensions ``param`` had when built (a flat FSDP shard is 1-d whatever it was)."""
    return len(getattr(param, _SHAPE_ATTR, param.shape))


def clip_gradients(trainer: Any, clip_val: float | None, algorithm: str | None) -> bool:
    """Clip by the norm over every rank's shard under FSDP; False when not FSDP (clip as usual).

    ``torch.nn.utils.clip_grad_norm_`` would see only this rank's shard, so Lightning refuses it
    under FSDP; the root FSDP module's ``clip_grad_norm_`` reduces the norm across ranks.
    """
    if not is_fsdp(trainer) or not clip_val:
        return False
    if (algorithm or "norm") != "norm":
        return False  # clipping by value is elementwise: the same on a shard
    trainer.strategy.model.clip_grad_norm_(float(clip_val))
    return True


def check_supported(trainer: Any, optimizer: str, config: Any) -> None:
    """Refuse what FSDP would silently get wrong (one line each).

    * Muon orthogonalises whole weight matrices; FSDP gives each rank a flat piece of them.
    * Learned (static) adaptive spans add their penalty after the last block has run, when FSDP
      has already resharded the span parameters (dynamic spans compute theirs inside the block).
    """
    if not is_fsdp(trainer):
        return
    if optimizer == "muon":
        raise UserError("--model.optimizer muon needs whole weight matrices on every rank, which FSDP shards; "
                        "use --model.optimizer adamw with FSDP, or muon with --trainer.strategy ddp")
    if config.span.enabled and not config.span.dynamic:
        raise UserError("--model.config.span.enabled: the span penalty reads the spans outside their block, where "
                        "FSDP has resharded them; train this model with --trainer.strategy ddp (or span.dynamic)")
