"""``protein-lm fit|validate|test|predict``: LightningCLI over ProteinLMModule + ProteinDataModule.

Everything Lightning users know works: ``--config configs/X.yaml`` (several are merged),
``--print_config``, dotted overrides (``--trainer.max_steps 100``, ``--model.lr 1e-3``,
``--data.batch_size 16``), ``--ckpt_path last`` to resume. What this module adds:

* ``--ckpt_path best`` / ``last`` name the files in ``output_dir/checkpoints`` in any process
  (best = lowest recorded ``val/loss``); a missing checkpoint, and Lightning's errors for user
  mistakes, print as one line (exit 2) instead of a traceback;
* every other user mistake is one line too, found before anything is built: option and config-file
  errors (:mod:`protein_lm.commands.train_parser`), model / optimiser values, an unwritable
  ``output_dir`` and ``fit --ckpt_path`` options that contradict the checkpoint
  (:mod:`protein_lm.commands.train_checks`), damaged or inconsistent checkpoints
  (:mod:`protein_lm.checkpoint_checks`);

* links: ``data.vocab_size -> model.config.vocab_size`` (after the data module is built),
  ``data.objective -> model.objective`` and ``data.max_length -> model.config.max_length``;
* ``output_dir`` (default ``runs/<config name>``): checkpoints in ``output_dir/checkpoints``
  (``best-*.ckpt`` on ``val/loss`` and ``last.ckpt``), CSV metrics in
  ``output_dir/csv/version_N/metrics.csv``, wandb files in ``output_dir/wandb``;
* loggers: CSV always; wandb when ``--wandb true`` (the default), offline unless
  ``WANDB_MODE`` says otherwise, and never required — if wandb cannot be imported or
  initialised the run continues with CSV only;
* callbacks: ``ModelCheckpoint`` (configurable under ``checkpoint:``; split into best-on-``val/loss``
  and an unmonitored ``last.ckpt``, see :mod:`protein_lm.callbacks`), ``LearningRateMonitor``;
* precision: when ``trainer.precision`` is unset, ``bf16-mixed`` on a CUDA GPU, ``32-true``
  on CPU.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from protein_lm.callbacks import split_checkpointing
from protein_lm.checkpoint import WEIGHTS_FORMAT, read_checkpoint
from protein_lm.commands.config_files import resolve_argv
from protein_lm.commands.train_checks import (
    check_model_settings,
    check_output_dir,
    check_packed_model,
    check_resume,
    checkpoint_hparams,
)
from protein_lm.commands.train_parser import ProteinLMArgumentParser, option_names
from protein_lm.data.datamodule import ProteinDataModule
from protein_lm.distributed import names_fsdp
from protein_lm.errors import UserError
from protein_lm.finetune import apply_init_weights
from protein_lm.lit_module import ProteinLMModule
from protein_lm.model_config import nest_flat_keys
from protein_lm.sharded_checkpoint import checkpoint_meta, is_sharded_checkpoint

DEFAULT_RUNS_DIR = "runs"


class ProteinLMCLI(LightningCLI):
    """LightningCLI with the project's links, output layout, loggers and defaults."""

    def __init__(self, *args: Any, config_names: list[str] | None = None, **kwargs: Any) -> None:
        argv = kwargs.get("args")
        self._argv = [str(a) for a in argv] if isinstance(argv, list | tuple) else sys.argv[1:]  # for messages
        # The --config files as given: a merged file reaches the parser as text, without its name.
        self._config_names = list(config_names or [])
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # jsonargparse names them `protein-lm [options] fit`; the top level has no options here.
        subparsers = getattr(self, "_subcommand_parsers", {})
        for name, parser in subparsers.items():
            parser.prog = f"protein-lm {name}"
            parser.known_options = option_names(parser)
            parser.help_hint = f"protein-lm {name} --help"
        # The top-level parser reports errors of the chosen subcommand too ("unrecognized arguments").
        self.parser.known_options = tuple(dict.fromkeys(o for p in subparsers.values() for o in p.known_options))
        chosen = next((a for a in self._argv if a in subparsers), None)
        self.parser.help_hint = f"protein-lm {chosen} --help" if chosen else "protein-lm --help"

    def parse_arguments(self, parser, args) -> None:
        self._argv = [str(a) for a in args] if isinstance(args, list | tuple) else []
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D401 - Lightning hook
        parser.add_argument(
            "--output_dir",
            type=str | None,
            default=None,
            help="where checkpoints and logs go (default: runs/<config file name>)",
        )
        parser.add_argument("--wandb", type=bool, default=True, help="also log to wandb (offline unless WANDB_MODE)")
        parser.add_argument("--wandb_project", type=str, default="protein_lm", help="wandb project name")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.objective", "model.objective", apply_on="parse")
        parser.link_arguments("data.max_length", "model.config.max_length", apply_on="parse")

    # -- output layout -----------------------------------------------------------

    def _cfg(self, init: bool = False) -> Any:
        """This subcommand's config (the whole config when built with ``run=False``)."""
        config = self.config_init if init else self.config
        return config if self.subcommand is None else config[self.subcommand]

    def _output_dir(self, cfg: Any = None) -> Path:
        cfg = self._cfg() if cfg is None else cfg
        root = (cfg.get("trainer") or {}).get("default_root_dir")
        if cfg.get("output_dir"):
            if root and Path(root) != Path(cfg["output_dir"]):
                raise UserError(f"--trainer.default_root_dir {root} and --output_dir {cfg['output_dir']} differ; "
                                "give --output_dir only (checkpoints and logs all go there)")
            return Path(cfg["output_dir"])
        if root:  # Lightning's name for the same thing
            return Path(root)
        configs = self._config_names or [c for c in cfg.get("config") or [] if c is not None]
        name = Path(str(configs[-1])).stem if configs else "default"
        return Path(DEFAULT_RUNS_DIR) / name

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path best|last|PATH`` before Lightning reads the checkpoint's hyperparameters.

        Lightning resolves ``best`` only from a callback of the *same* process (so ``test --ckpt_path
        best`` in a new process fails), and ``last`` without a file silently uses random weights
        outside ``fit``. Here both name files in ``output_dir/checkpoints``; a missing one is a
        one-line error.
        """
        subcommand = self.config.get("subcommand")
        if subcommand:
            cfg = self.config[subcommand]
            cfg["ckpt_path"] = self._resolve_ckpt_path(subcommand, cfg)
            ckpt = cfg["ckpt_path"]
            if ckpt and (Path(ckpt).is_file() or is_sharded_checkpoint(ckpt)):
                self._check_checkpoint(subcommand, cfg)
            if ckpt and Path(ckpt).is_file():
                self._take_checkpoint_options(subcommand, ckpt)

    def _take_checkpoint_options(self, subcommand: str, ckpt: str) -> None:
        """The ``model:`` options become the checkpoint's (as Lightning does), the flat model-config
        keys of older checkpoints nested first."""
        hparams = dict(checkpoint_hparams(ckpt))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if isinstance(hparams.get("config"), dict):  # its old flat names were reported when it was read
            hparams["config"], _ = nest_flat_keys(hparams["config"])
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _check_checkpoint(self, subcommand: str, cfg: Any) -> None:
        """A readable, consistent Lightning checkpoint; for ``fit``, one the given options agree with.

        Lightning would unpickle it with a torch traceback on a damaged file, and then replace the
        user's model options by the checkpoint's without a word.
        """
        path = cfg["ckpt_path"]
        if is_sharded_checkpoint(path):
            if not names_fsdp((cfg.get("trainer") or {}).get("strategy")):
                raise UserError(f"--ckpt_path {path}: a sharded FSDP checkpoint, which only an FSDP run loads (add "
                                f"--config configs/strategy_fsdp.yaml); for its weights alone use "
                                f"--model.init_weights {path}, or `protein-lm export --checkpoint {path}`")
            # Each rank reads its own shard: gathering the whole model here to check it would cost
            # every process the full model's memory.
            ckpt = {"format": "lightning"}
        else:
            ckpt = read_checkpoint(path)
        if ckpt["format"] != "lightning":
            raise UserError(f"--ckpt_path {path}: an exported weights file, not a training checkpoint; "
                            f"to start from its weights use --model.init_weights {path}")
        if subcommand == "fit":
            defaults = self._subcommand_parsers[subcommand].get_defaults()
            check_resume(cfg["model"].as_dict(), defaults["model"].as_dict(), checkpoint_hparams(path), path)

    def _resolve_ckpt_path(self, subcommand: str, cfg: Any) -> str | None:
        ckpt = cfg.get("ckpt_path")
        if not ckpt or ckpt == "hpc" or "://" in str(ckpt) or str(ckpt).startswith("registry"):
            return ckpt  # Lightning's own keywords and remote paths
        ckpt_cfg = cfg.get("checkpoint") or {}
        dirpath = Path(ckpt_cfg.get("dirpath") or self._output_dir(cfg) / "checkpoints")
        if ckpt == "best":
            best = find_best_checkpoint(dirpath, ckpt_cfg.get("monitor") or "val/loss", ckpt_cfg.get("mode") or "min")
            if best is None:
                raise UserError(f"--ckpt_path best: no best checkpoint in {dirpath} (train with `protein-lm fit` "
                                "first, or pass --output_dir / a checkpoint path)")
            return str(best)
        if ckpt == "last":
            from protein_lm.distributed import restore_interrupted_saves

            restore_interrupted_saves(dirpath)  # a sharded save killed mid-swap left only last.ckpt.old
            lasts = sorted(dirpath.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
            if lasts:
                return str(lasts[-1])
            if subcommand == "fit":
                return ckpt  # nothing to resume yet: Lightning warns and starts from scratch
            raise UserError(f"--ckpt_path last: no last checkpoint in {dirpath}")
        if not Path(ckpt).exists():
            raise UserError(f"--ckpt_path {ckpt}: no such checkpoint file")
        objective = _exported_objective(ckpt)
        if objective is not None:
            # Exported weights hold no training state: evaluate them as the model's initial weights.
            if subcommand == "fit":
                raise UserError(f"--ckpt_path {ckpt}: exported weights hold no training state to resume; "
                                f"start from them with --model.init_weights {ckpt}")
            cfg["model"]["init_weights"] = str(ckpt)
            cfg["data"]["objective"] = cfg["model"]["objective"] = objective
            return None
        return ckpt

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        note = apply_init_weights(cfg, getattr(self, "_argv", []))
        if note:
            print(note, file=sys.stderr, flush=True)
        check_model_settings(cfg["model"].as_dict())
        check_packed_model(cfg["data"].as_dict(), cfg["model"].as_dict())
        out = self._output_dir()
        check_output_dir(out)  # every subcommand writes there (CSV metrics at least)
        cfg["output_dir"] = str(out)
        if cfg.get("checkpoint") is not None and not cfg["checkpoint"].get("dirpath"):
            cfg["checkpoint"]["dirpath"] = str(out / "checkpoints")
        if self.subcommand == "fit" and not cfg.get("ckpt_path") and cfg.get("checkpoint") is not None:
            _refuse_mixing_runs(Path(cfg["checkpoint"]["dirpath"]))
        trainer = cfg["trainer"]
        if trainer.get("precision") is None:
            on_gpu = torch.cuda.is_available() and trainer.get("accelerator") not in ("cpu",)
            trainer["precision"] = "bf16-mixed" if on_gpu else "32-true"
        if trainer.get("default_root_dir") is None:
            trainer["default_root_dir"] = str(out)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self._cfg(init=True)
        configured = cfg["trainer"].get("logger")
        if configured is False:
            loggers: Any = False
        else:
            loggers = [] if configured in (None, True) else list(_as_list(configured))
            if not any(isinstance(lg, CSVLogger) for lg in loggers):
                loggers.insert(0, CSVLogger(save_dir=cfg["output_dir"], name="csv"))
            if cfg.get("wandb") and self.subcommand == "fit":
                wandb_logger = _make_wandb_logger(cfg["output_dir"], cfg.get("wandb_project", "protein_lm"))
                if wandb_logger is not None:
                    loggers.append(wandb_logger)
        kwargs["logger"] = loggers
        extra = [LearningRateMonitor(logging_interval="step")] if self.subcommand == "fit" and loggers else []
        if self.subcommand == "predict":
            from protein_lm.predictions import PredictionWriter

            extra.append(PredictionWriter(self._cfg()["output_dir"]))
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        # The `checkpoint:` group becomes best-on-val/loss + an unmonitored last.ckpt (callbacks.py).
        keys = [c for c in self._parser(self.subcommand).callback_keys if c != "checkpoint"]
        callbacks = [self._get(self.config_init, c) for c in keys]
        if self._cfg().get("checkpoint") is not None:
            ckpt_args = self._cfg()["checkpoint"].as_dict()
            callbacks += split_checkpointing(ckpt_args, trainer_config.get("val_check_interval"))
        return self._instantiate_trainer(trainer_config, [*callbacks, *extra])

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report(checkpoints=False)

    def after_test(self) -> None:
        self._report(checkpoints=False)

    def after_predict(self) -> None:
        for cb in self.trainer.callbacks:
            if type(cb).__name__ == "PredictionWriter" and self.trainer.global_rank == 0:
                for path in cb.written:
                    print(f"predictions:     {path.resolve()}", flush=True)

    def _report(self, checkpoints: bool = True) -> None:
        trainer = self.trainer
        if trainer.global_rank != 0:
            return
        lines = []
        if checkpoints:
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "best_model_path", ""):
                    score = cb.best_model_score
                    score_text = f" ({cb.monitor}={float(score):.4f})" if score is not None else ""
                    lines.append(f"best checkpoint: {cb.best_model_path}{score_text}")
                if getattr(cb, "last_model_path", ""):
                    lines.append(f"last checkpoint: {cb.last_model_path}")
        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                lines.append(f"metrics (CSV):   {(Path(lg.log_dir) / 'metrics.csv').resolve()}")
            elif type(lg).__name__ == "WandbLogger":
                lines.append(f"wandb run:       {lg.save_dir} ({os.environ.get('WANDB_MODE', 'offline')})")
        if lines:
            print("\n".join(lines), flush=True)


def find_best_checkpoint(dirpath: Path, monitor: str = "val/loss", mode: str = "min") -> Path | None:
    """The checkpoint in ``dirpath`` (``last*.ckpt`` aside) with the best recorded ``monitor`` score.

    The score is read from the checkpoint's own ModelCheckpoint state (memory-mapped, so a large
    checkpoint costs little); files without one rank by modification time, after scored files.
    With ``save_top_k=1`` there is normally a single candidate.
    """
    candidates = [p for p in Path(dirpath).glob("*.ckpt") if not p.name.startswith("last")]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    sign = 1.0 if mode == "min" else -1.0

    def rank(path: Path) -> tuple[int, float, float]:
        score = _recorded_score(path, monitor)
        mtime = path.stat().st_mtime
        return (0, sign * score, -mtime) if score is not None else (1, 0.0, -mtime)

    return min(candidates, key=rank)


def _recorded_score(path: Path, monitor: str) -> float | None:
    """``monitor``'s value for ``path`` as its ModelCheckpoint recorded it, or None."""
    try:
        ckpt = checkpoint_meta(path) if is_sharded_checkpoint(path) else torch.load(
            path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable or not a Lightning checkpoint: ranked by age instead
        return None
    for state in (ckpt.get("callbacks") or {}).values():
        if not isinstance(state, dict) or state.get("monitor") != monitor:
            continue
        for saved, score in (state.get("best_k_models") or {}).items():
            if Path(saved).name == path.name and score is not None:
                return float(score)
        if Path(str(state.get("best_model_path", ""))).name == path.name and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


def _exported_objective(path: str) -> str | None:
    """The objective of the exported model at ``path``; None for anything else (a Lightning checkpoint)."""
    if is_sharded_checkpoint(path):
        return None
    if not Path(path).is_dir():
        try:  # memory-mapped: a large training checkpoint costs next to nothing to look at
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not ours to judge here: Lightning reports it when it loads the file
            return None
        if not isinstance(data, dict) or data.get("format") != WEIGHTS_FORMAT:
            return None
    return read_checkpoint(path)["objective"]


def _refuse_mixing_runs(dirpath: Path) -> None:
    """A new run must not write next to another run's checkpoints (``--ckpt_path best`` could pick theirs)."""
    old = sorted(p.name for p in dirpath.glob("*.ckpt")) if dirpath.is_dir() else []
    if old:
        raise UserError(f"{dirpath} holds checkpoints of an earlier run ({', '.join(old[:3])}"
                        f"{', ...' if len(old) > 3 else ''}): resume it with --ckpt_path last, or start a new "
                        "run with --output_dir NEW_DIR (or delete them)")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _make_wandb_logger(save_dir: str, project: str) -> Logger | None:
    """A WandbLogger (offline unless ``WANDB_MODE`` says otherwise), or None if wandb fails."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    try:
        from pytorch_lightning.loggers import WandbLogger

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(project=project, save_dir=save_dir, mode=mode)
        _ = logger.experiment  # initialise now, so a failure falls back to CSV here, not mid-run
        return logger
    except Exception as err:  # wandb missing, no network in online mode, bad credentials, ...
        warnings.warn(f"wandb logging disabled ({type(err).__name__}: {err}); continuing with CSV only",
                      stacklevel=2)
        return None


def build_cli(argv: list[str], run: bool = True) -> ProteinLMCLI:
    """Construct the CLI (``run=False`` parses and instantiates without a subcommand)."""
    # `protein-lm fit ...` passes exactly sys.argv[1:]; LightningCLI would warn about that.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    argv, config_names, notes = resolve_argv([str(a) for a in argv])
    for note in notes:
        print(f"protein-lm: {note}", file=sys.stderr, flush=True)
    return ProteinLMCLI(
        ProteinLMModule,
        ProteinDataModule,
        args=argv,
        config_names=config_names,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "protein-lm"},  # not `__main__.py` under `python -m protein_lm`
        parser_class=ProteinLMArgumentParser,  # one-line errors, "did you mean"
        auto_configure_optimizers=False,
    )


def run_lightning_cli(argv: list[str]) -> int:
    """Entry point used by :mod:`protein_lm.cli` for ``fit``, ``validate``, ``test``, ``predict``."""
    torch.set_float32_matmul_precision("high")
    try:
        build_cli(list(argv))
    except (ValueError, MisconfigurationException) as err:
        # Lightning reports user mistakes (bad trainer flags, unusable ckpt_path, ...) as these;
        # print them as one line. ValueErrors from elsewhere are bugs and keep their traceback.
        if os.environ.get("PROTEIN_LM_TRACEBACK") or not _raised_by_lightning(err):
            raise
        raise UserError(" ".join(str(err).split()) or type(err).__name__) from None
    return 0


def _raised_by_lightning(err: BaseException) -> bool:
    """Whether ``err`` was raised inside Lightning itself (its innermost frame), not in our code or torch."""
    if isinstance(err, MisconfigurationException):
        return True
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    parts = Path(tb.tb_frame.f_code.co_filename).parts
    return "pytorch_lightning" in parts or "lightning_fabric" in parts


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_lightning_cli(sys.argv[1:]))
