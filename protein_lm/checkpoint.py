"""Loading models from Lightning checkpoints and exported weight files — never executing code.

Two formats, both read with ``torch.load(weights_only=True)`` (only tensors and plain
python containers are unpickled, so a file cannot run code when loaded):

* a Lightning ``.ckpt`` written by ``protein-lm fit`` (it also holds optimiser state,
  loop progress and RNG states for resuming), or the directory of a sharded FSDP checkpoint
  (:mod:`protein_lm.sharded_checkpoint`);
* an exported weights file (``protein-lm export`` / ``protein-lm convert``)::

      {"format": "protein_lm.weights", "version": 1, "config": {...ModelConfig...},
       "objective": "mlm" | "causal", "state_dict": {...}, "metrics": {...}}

:func:`load_model` accepts either and returns ``(ProteinLM, info)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from protein_lm.checkpoint_checks import check_checkpoint, model_config
from protein_lm.errors import UserError
from protein_lm.model import ModelConfig, ProteinLM
from protein_lm.outputs import write_atomically

WEIGHTS_FORMAT = "protein_lm.weights"
WEIGHTS_VERSION = 1
_LIGHTNING_KEY = "protein_lm"


def _read(path: str | os.PathLike, map_location: Any) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""  # torch's text runs to pages
        first = first.split(". ")[0]
        raise UserError(f"{path}: cannot read as a protein_lm checkpoint: damaged, truncated or not written by "
                        f"torch.save ({type(err).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a protein_lm checkpoint (top level is {type(data).__name__})")
    return data


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The parts every consumer needs, from either format.

    Returns:
        dict with ``format`` (``"lightning"``, also for a sharded FSDP checkpoint directory, see
        :mod:`protein_lm.sharded_checkpoint`; ``"weights"``; or ``"safetensors"``, an exported
        directory, see :mod:`protein_lm.safetensors_dir`), ``config`` (dict),
        ``objective``, ``state_dict`` (keys of :class:`ProteinLM`), ``metrics`` (dict),
        ``global_step``, ``epoch``, ``path``.
    """
    if Path(path).is_dir():
        from protein_lm.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint

        if not is_sharded_checkpoint(path):
            from protein_lm.safetensors_dir import read_directory

            ckpt = read_directory(path, map_location)
            ckpt["config"] = model_config(ckpt["config"], str(path)).to_dict()
            return ckpt
        data = read_sharded_checkpoint(path, map_location)
    else:
        data = _read(path, map_location)
    if data.get("format") == WEIGHTS_FORMAT:
        if int(data.get("version", 0)) > WEIGHTS_VERSION:
            raise UserError(f"{path}: weights format version {data['version']} is newer than this protein_lm")
        config = data.get("config")
        if not isinstance(config, dict):
            raise UserError(f"{path}: exported weights file without a protein_lm model config")
        ckpt = {
            "format": "weights",
            "config": dict(config),
            "objective": data.get("objective", "causal" if config.get("causal") else "mlm"),
            "state_dict": data["state_dict"],
            "metrics": dict(data.get("metrics") or {}),
            "global_step": data.get("global_step"),
            "epoch": data.get("epoch"),
            "path": str(path),
        }
        ckpt["config"] = check_checkpoint(ckpt).to_dict()  # groups nested, whichever way it was saved
        return ckpt
    if "state_dict" in data and (_LIGHTNING_KEY in data or "hyper_parameters" in data):
        meta = data.get(_LIGHTNING_KEY) or {}
        hparams = data.get("hyper_parameters") or {}
        config = meta.get("config") or hparams.get("config")
        if config is None:
            raise UserError(f"{path}: Lightning checkpoint without a protein_lm model config")
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in data["state_dict"].items() if k.startswith(prefix)}
        ckpt = {
            "format": "lightning",
            "config": dict(config),
            "objective": meta.get("objective") or hparams.get("objective", "mlm"),
            "state_dict": state,
            "metrics": _lightning_metrics(data),
            "global_step": data.get("global_step"),
            "epoch": data.get("epoch"),
            "path": str(path),
        }
        ckpt["config"] = check_checkpoint(ckpt).to_dict()  # groups nested, whichever way it was saved
        return ckpt
    raise UserError(f"{path}: neither a protein_lm Lightning checkpoint nor an exported weights file")


def _lightning_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """The monitored best score recorded by ModelCheckpoint, if any."""
    metrics: dict[str, Any] = {}
    for key, state in (data.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict):
            score = state.get("best_model_score")
            monitor = state.get("monitor")
            if score is not None and monitor:
                metrics[f"best_{monitor}"] = float(score)
    return metrics


def build_model(config: dict[str, Any] | ModelConfig, state_dict: dict[str, Any], strict: bool = True) -> ProteinLM:
    """A :class:`ProteinLM` from a config and weights, in eval mode."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    model = ProteinLM(cfg)
    model.load_state_dict(state_dict, strict=strict)
    return model.eval()


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[ProteinLM, dict[str, Any]]:
    """Load a model from a Lightning ``.ckpt`` or an exported weights file.

    Args:
        path: the file.
        map_location: passed to ``torch.load`` (default ``"cpu"``).

    Returns:
        ``(model, info)``: the model in eval mode, and ``info`` with ``format``,
        ``objective``, ``config`` (dict), ``metrics``, ``global_step``, ``epoch``, ``path``.

    Raises:
        UserError: the file is missing or is not a protein_lm checkpoint.
    """
    ckpt = read_checkpoint(path, map_location)
    if ckpt["config"].get("favor_backend") == "triton":
        # Which kernel runs is a property of the machine, not of the weights: a model trained with
        # the Triton path forced must still load and run on a CPU.
        ckpt["config"] = {**ckpt["config"], "favor_backend": "auto"}
    model = build_model(ckpt["config"], ckpt.pop("state_dict"))
    return model, ckpt


def weights_payload(
    config: ModelConfig | dict[str, Any],
    objective: str,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The exported-weights dict (plain python + tensors only)."""
    cfg = (config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)).to_dict()
    return {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "config": cfg,
        "objective": objective,
        "state_dict": {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()},
        "metrics": dict(metrics or {}),
        **extra,
    }


def save_weights(payload: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write atomically (temp file then rename), so a crash never leaves half a file."""
    return write_atomically(out, lambda tmp: torch.save(payload, tmp), "--out")
