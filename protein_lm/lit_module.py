"""A thin LightningModule around :class:`protein_lm.model.ProteinLM`.

What it adds to the plain model — and nothing else:

* the objective: ``mlm`` (bidirectional, BID in the Performer paper) or ``causal``
  (unidirectional, UNI). Batches come from :class:`protein_lm.data.datamodule.ProteinDataModule`
  as ``input_ids``, ``labels`` (-100 = no loss; causal labels already shifted) and
  ``padding_mask`` (True at padding), so both objectives use the same loss code; packed
  batches (``mode: packed``) add ``segment_ids`` and ``positions``, passed on to the model;
* the paper's metrics. Over the scored positions of a whole epoch (masked positions
  for MLM, every real position for causal):

  - ``loss``       = mean cross-entropy (nats per token),
  - ``accuracy``   = fraction of positions whose arg-max prediction is the label,
  - ``perplexity`` = exp(mean cross-entropy).

  They are token-weighted sums accumulated over the epoch and reduced across DDP
  ranks before dividing (:class:`TokenMetrics`) — not a mean of per-batch means,
  which would over-weight short batches. Logged as ``val/loss``, ``val/accuracy``,
  ``val/perplexity`` (``test/*`` likewise); ``train/loss`` is the per-step batch loss;
* AdamW (or Muon for the weight matrices, ``optimizer``) with linear warm-up and cosine (or linear) decay to ``min_lr_ratio * lr``, over the
  steps or over a wall-clock budget (``schedule``, :mod:`protein_lm.schedules`); no weight decay
  on biases, norms and embeddings (:func:`param_groups`); gradient clipping is the
  Trainer's (``gradient_clip_val`` in the configs);
* Performer projection redraw every ``redraw_interval`` optimiser steps, from a
  generator seeded by ``(seed, step)`` so the sequence of projections is reproducible
  and survives resume; never during evaluation;
* exact resume: before every training batch, torch's global RNG (dropout) is reseeded
  from ``(seed, step, micro-batch index among all ranks')``, so dropout does not depend on
  what else consumed random numbers (sanity checks, data-loader start-up, validation), a
  resumed run draws the same masks, and N ranks draw those of one process accumulating
  N micro-batches over the same data. The numpy / python / torch RNG states are also
  saved in the checkpoint and restored;
* a non-finite training loss stops the run with :class:`NonFiniteLossError` *before* the
  optimiser step, so no NaN weights are ever saved and ``last.ckpt`` stays the last good
  checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from protein_lm import distributed
from protein_lm.errors import UserError
from protein_lm.model import ModelConfig, ProteinLM
from protein_lm.optimizers import MuonAdamW, split_for_muon
from protein_lm.schedules import SCHEDULES, TrainClock, time_warmup_decay, warmup_decay

Objective = Literal["mlm", "causal"]
IGNORE_INDEX = -100
# torch.compile's modes, accepted by ``compile``
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CHECKPOINT_KEY = "protein_lm"
OPTIMIZERS = ("adamw", "muon")


class NonFiniteLossError(UserError):
    """The training loss became NaN/inf; the run stops without saving the bad weights."""


# --------------------------------------------------------------------------- metrics


class TokenMetrics(Metric):
    """Token-weighted cross-entropy / accuracy over an epoch, summed across ranks.

    ``update`` takes per-batch *sums*; ``compute`` divides once at the end, so every
    scored token counts equally however the batches were shaped.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, correct: Tensor, count: Tensor) -> None:
        self.loss_sum += loss_sum.detach().to(torch.float64)
        self.correct += correct.detach().to(torch.int64)
        self.count += count.detach().to(torch.int64)

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp(min=1).to(torch.float64)
        loss = self.loss_sum / count
        return {
            "loss": loss.float(),
            "accuracy": (self.correct.to(torch.float64) / count).float(),
            "perplexity": loss.exp().float(),
            "num_tokens": self.count.clone(),
        }


def token_statistics(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over the scored positions of one batch.

    Args:
        logits: (B, L, V), any float dtype (cross-entropy is computed in float32).
        labels: (B, L), ``-100`` where no loss is taken.

    Returns:
        ``(loss_sum, correct, count)``: summed cross-entropy (float32 scalar), number of
        correct arg-max predictions, number of scored positions.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    scored = flat_labels.ne(IGNORE_INDEX)
    correct = (flat_logits.argmax(dim=-1).eq(flat_labels) & scored).sum()
    return loss_sum, correct, scored.sum()


# --------------------------------------------------------------------------- optimiser


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups.

    * weights of linear layers (``ndim >= 2``, not embeddings): ``weight_decay``;
    * biases, LayerNorm / other norms, embeddings (incl. the tied output head), any
      1-d parameter: no decay;
    * a parameter with an ``optim_overrides`` dict attribute goes into its own group
      with those settings (keys: ``lr``, ``weight_decay``, ``lr_schedule`` —
      ``"constant"`` to skip warm-up/decay). Unset keys default to the no-decay group's.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    custom: dict[tuple, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            overrides = getattr(param, "optim_overrides", None)
            if overrides:
                custom.setdefault(tuple(sorted(overrides.items())), []).append(param)
            elif distributed.logical_ndim(param) < 2 or isinstance(module, nn.Embedding | nn.LayerNorm):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    for i, (key, params) in enumerate(custom.items()):
        settings = dict(key)
        group = {"params": params, "weight_decay": settings.pop("weight_decay", 0.0), "name": f"custom{i}"}
        group.update(settings)
        groups.append(group)
    return [g for g in groups if g["params"]]


def warmup_cosine(warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine to ``min_lr_ratio`` at ``total_steps``.

    With ``total_steps=None`` the rate stays at 1 after warm-up.
    """
    return warmup_decay(warmup_steps, total_steps, min_lr_ratio, "cosine")


def _global_micro_batch(micro: int, trainer: Any) -> tuple[int, int]:
    """``(index, 0)`` of this rank's micro-batch among the step's ``world_size x accumulation`` ones.

    Rank ``r``'s micro-batch ``m`` is the data module's batch ``m * world_size + r`` of the step, the
    batch one process with ``world_size`` times the gradient accumulation sees as micro-batch
    ``m * world_size + r``: seeding dropout by that index gives both runs the same masks. The
    trailing 0 stands where the rank used to be, so one process keeps the seeds it always had.
    """
    world, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
    return micro * world + rank, 0


def _mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- module


class ProteinLMModule(pl.LightningModule):
    """LightningModule: objective, metrics, optimiser, projection redraw.

    Args:
        config: the :class:`ModelConfig` (``vocab_size`` is linked from the data module by
            the CLI; ``causal`` is set from ``objective``).
        objective: ``mlm`` (bidirectional) or ``causal`` (unidirectional).
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay (not applied to norms/biases/embeddings).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warm-up length in optimiser steps.
        max_steps: length of the cosine decay; ``None`` uses the Trainer's estimate
            (``trainer.estimated_stepping_batches``).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        schedule: decay after warm-up: ``cosine`` / ``linear`` over the steps up to ``max_steps``,
            or ``time_cosine`` / ``time_linear`` over ``budget_minutes`` of training time
            (:attr:`train_clock`, which evaluations may pause), for runs with a time budget.
        budget_minutes: the training-time budget of the ``time_*`` schedules.
        optimizer: ``adamw``, or ``muon``: ``torch.optim.Muon`` for the 2-D weights of the linear
            layers and AdamW for embeddings, norms, biases (:mod:`protein_lm.optimizers`).
        redraw_interval: redraw the Performer projections every this many optimiser
            steps (``None`` or 0: never; the paper redraws during training).
        seed: seeds the projection redraws and the per-step dropout RNG.
        compile: wrap the model's forward in ``torch.compile``: ``true`` (default mode) or a mode
            name, e.g. ``"reduce-overhead"`` (CUDA graphs: removes the per-kernel launch cost; for
            the concat windows' fixed shapes on an H100, 1.35x the default mode in bench/model.py,
            docs/benchmarks.md; every new batch shape records a new graph).
        init_weights: start from the weights of this ``.ckpt`` / exported file (e.g. the
            output of ``protein-lm convert``); the architecture must match, the attention
            kind may differ. Ignored when resuming with ``--ckpt_path``.
    """

    def __init__(
        self,
        config: ModelConfig = ModelConfig(),  # noqa: B008 - a frozen-in-use default, copied below
        objective: Objective = "mlm",
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        warmup_steps: int = 1000,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        schedule: str = "cosine",
        budget_minutes: float | None = None,
        optimizer: str = "adamw",
        redraw_interval: int | None = 1000,
        seed: int = 0,
        compile: bool | str = False,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        if objective not in ("mlm", "causal"):
            raise ValueError(f"objective must be 'mlm' or 'causal', got {objective!r}")
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be true, false or one of {COMPILE_MODES}, got {compile!r}")
        if schedule not in SCHEDULES:
            raise UserError(f"model.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if schedule.startswith("time_") and not (budget_minutes and budget_minutes > 0):
            raise UserError(f"model.schedule {schedule} needs model.budget_minutes > 0, got {budget_minutes!r}")
        if optimizer not in OPTIMIZERS:
            raise UserError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        if objective == "mlm" and config.causal:
            raise ValueError("objective 'mlm' needs a bidirectional model (config.causal=False)")
        config = dataclasses.replace(config, causal=objective == "causal")
        # Hyper-parameters are stored as plain python (the config as a dict) so that the
        # checkpoint loads with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "config": config.to_dict(),
                "objective": objective,
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": tuple(betas),
                "eps": eps,
                "warmup_steps": warmup_steps,
                "max_steps": max_steps,
                "min_lr_ratio": min_lr_ratio,
                "schedule": schedule,
                "budget_minutes": budget_minutes,
                "optimizer": optimizer,
                "redraw_interval": redraw_interval,
                "seed": seed,
                "compile": compile,
                "init_weights": init_weights,
            }
        )
        self.config = config
        self.objective = objective
        self.model = ProteinLM(config)
        if init_weights:
            self._load_initial_weights(init_weights)
        self.val_metrics = TokenMetrics()
        self.test_metrics = TokenMetrics()
        # Training seconds for the time schedules; started when fitting starts, paused by
        # evaluations (Lightning's validation here, a benchmark's own evaluations elsewhere).
        self.train_clock = TrainClock()
        self._compiled: Callable | None = None
        self._rng_step: tuple[int, int] = (-1, 0)  # (global_step, micro-batch) of the last reseed
        self._pending_rng: dict[str, Any] | None = None

    def _load_initial_weights(self, path: str) -> None:
        from protein_lm.checkpoint import read_checkpoint

        state = read_checkpoint(path)["state_dict"]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Attention-kernel buffers (random projections) may legitimately differ (exact -> Performer).
        bad = [k for k in [*missing, *unexpected] if ".kernel." not in k]
        if bad:
            raise UserError(f"{path}: weights do not match model.config (first mismatches: {bad[:5]})")

    # -- forward -----------------------------------------------------------------

    def configure_model(self) -> None:
        distributed.remember_shapes(self.model)  # before FSDP flattens them (weight-decay groups)
        if self.hparams.compile and self._compiled is None:
            # Kept out of the module tree so state_dict keys stay "model.*".
            mode = self.hparams.compile if isinstance(self.hparams.compile, str) else None
            self.__dict__["_compiled"] = self.model.compiled(mode)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None, segment_ids: Tensor | None = None,
                positions: Tensor | None = None):
        fn = self._compiled if self._compiled is not None else self.model
        if segment_ids is None:
            return fn(input_ids, padding_mask)
        return fn(input_ids, padding_mask, segment_ids=segment_ids, positions=positions)

    def _model_out(self, batch: dict[str, Tensor]):
        """The model's output on a batch (packed batches also carry ``segment_ids`` and ``positions``)."""
        return self(batch["input_ids"], batch.get("padding_mask"), batch.get("segment_ids"), batch.get("positions"))

    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        out = self._model_out(batch)
        loss_sum, correct, count = token_statistics(out.logits, batch["labels"])
        loss = loss_sum / count.clamp(min=1)
        return loss, out.aux_loss, loss_sum, correct, count

    # -- training ----------------------------------------------------------------

    def on_train_start(self) -> None:
        if not self.train_clock.started:
            self.train_clock.start()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = int(self.global_step)
        last_step, micro = self._rng_step
        micro = micro + 1 if step == last_step else 0
        self._rng_step = (step, micro)
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng, torch_global=False)
            self._pending_rng = None
        torch.manual_seed(_mix_seed(self.hparams.seed, step, *_global_micro_batch(micro, self.trainer)))
        interval = self.hparams.redraw_interval
        if interval and step > 0 and step % interval == 0 and micro == 0 and self.config.is_performer:
            generator = torch.Generator().manual_seed(_mix_seed(self.hparams.seed, step, 1))
            self.model.redraw_projections(generator)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, aux, _, _, count = self._shared_step(batch)
        total = loss + aux
        # Checked after backward (on_after_backward), not here: reading the loss now would stall the
        # host until the forward pass ends, with no backward kernels queued behind it.
        self._unchecked_loss = total.detach()
        bsz = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=bsz)
        if aux.requires_grad:  # models with span / memory penalties (no device sync for the rest)
            self.log("train/aux_loss", aux, on_step=True, on_epoch=False, batch_size=bsz)
        # every rank's scored tokens of this step (one scalar all-reduce)
        self.log("train/tokens", count.float(), on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=True,
                 batch_size=bsz)
        return total

    def on_after_backward(self) -> None:
        """Refuse a non-finite loss before the optimiser step (gradient clipping and the step come later)."""
        loss, self._unchecked_loss = getattr(self, "_unchecked_loss", None), None
        if loss is not None:
            self._check_finite(loss)

    def _check_finite(self, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()))
        if self.trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        last = None
        for cb in getattr(self.trainer, "checkpoint_callbacks", []) or []:
            last = getattr(cb, "last_model_path", None) or getattr(cb, "best_model_path", None) or last
        where = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"non-finite training loss ({float(loss.detach()):.4g}) at step {self.global_step} "
            f"(epoch {self.current_epoch}); the run stopped before the optimiser step, so no bad "
            f"weights were saved — {where}. Lower model.lr, raise warmup_steps, or keep "
            f"trainer.gradient_clip_val set, then resume with --ckpt_path."
        )

    # -- evaluation --------------------------------------------------------------

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, _, loss_sum, correct, count = self._shared_step(batch)
        self.val_metrics.update(loss_sum, correct, count)

    def on_validation_start(self) -> None:
        self.train_clock.pause()

    def on_validation_end(self) -> None:
        self.train_clock.resume()

    def on_validation_epoch_start(self) -> None:
        self.model.reset_statistics()  # e.g. PKM slot usage: measured over the validation set only

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics, "val")
        # Adaptive-span lengths and PKM slot usage (empty for models without those layers).
        # Usage is counted on each rank's share of the data; rank 0's is logged.
        extra = self.model.statistics()
        if extra:
            self.log_dict({f"val/{k}": float(v) for k, v in extra.items()}, rank_zero_only=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, _, loss_sum, correct, count = self._shared_step(batch)
        self.test_metrics.update(loss_sum, correct, count)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics, "test")

    def _log_epoch(self, metrics: TokenMetrics, prefix: str) -> None:
        values = metrics.compute()  # already reduced across ranks
        metrics.reset()
        for name, value in values.items():
            self.log(f"{prefix}/{name}", value.float(), prog_bar=name == "loss", sync_dist=False)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-position arg-max predictions and the log-probability of each label (and, for packed
        rows, the ``segment_ids`` that tell their proteins apart)."""
        out = self._model_out(batch)
        logp = out.logits.float().log_softmax(-1)
        labels = batch["labels"]
        label_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        label_logp = label_logp.masked_fill(labels.eq(IGNORE_INDEX), 0.0)
        result = {"predictions": logp.argmax(-1), "label_log_prob": label_logp, "labels": labels}
        if batch.get("segment_ids") is not None:
            result["segment_ids"] = batch["segment_ids"]
        return result

    # -- optimiser ---------------------------------------------------------------

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if not distributed.clip_gradients(self._trainer, gradient_clip_val, gradient_clip_algorithm):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        distributed.check_supported(self._trainer, hp.optimizer, self.config)
        groups = param_groups(self.model, hp.weight_decay)
        if hp.optimizer == "muon":
            optimizer: torch.optim.Optimizer = MuonAdamW(split_for_muon(groups), lr=hp.lr, betas=tuple(hp.betas),
                                                         eps=hp.eps)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = hp.max_steps
        if total is None and self.trainer is not None:
            estimate = self.trainer.estimated_stepping_batches
            total = int(estimate) if math.isfinite(estimate) else None
        lambdas = []
        for group in optimizer.param_groups:  # the optimiser's order (Muon's groups come first)
            if group.pop("lr_schedule", None) == "constant":
                lambdas.append(lambda step: 1.0)
            elif hp.schedule.startswith("time_"):
                budget = 60.0 * float(hp.budget_minutes)
                lambdas.append(time_warmup_decay(hp.warmup_steps, budget, hp.min_lr_ratio, hp.schedule,
                                                 self.train_clock))
            else:
                lambdas.append(warmup_decay(hp.warmup_steps, total, hp.min_lr_ratio, hp.schedule))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints -------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": "protein_lm.lightning",
            "version": 1,
            "config": self.config.to_dict(),
            "objective": self.objective,
            "rng": _rng_states_all_ranks(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get(CHECKPOINT_KEY) or {}
        per_rank = info.get("rng")
        if per_rank:
            rank = self.global_rank if self._trainer is not None else 0
            # Restored at the next training batch (after Lightning's own start-up draws).
            self._pending_rng = per_rank[rank] if rank < len(per_rank) else per_rank[0]


# --------------------------------------------------------------------------- RNG helpers


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_states_all_ranks() -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order); a single entry without DDP."""
    local = _rng_state()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return gathered
    return [local]


def _set_rng_state(state: dict[str, Any], torch_global: bool = True) -> None:
    if torch_global and "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "python" in state:
        random.setstate(_python_state_from_plain(state["python"]))
    if torch_global and "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# numpy / python RNG states as tensors and lists, so checkpoints stay weights_only-loadable.
def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_plain(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])


def _python_state_to_plain(state: tuple) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(state: list[Any]) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
