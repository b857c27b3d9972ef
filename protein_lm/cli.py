"""`protein-lm` command line: one entry point, sub-commands loaded lazily.

Training sub-commands (``fit``, ``validate``, ``test``, ``predict``) go to
LightningCLI (see :mod:`protein_lm.commands.train`); the others are small
argparse programs in :mod:`protein_lm.commands`. Nothing heavy (torch,
Lightning) is imported until a sub-command needs it, so ``--help`` and
``prepare`` start in well under a second.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Errors a user can act on are raised as :class:`protein_lm.errors.UserError`
and printed as one line with exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from protein_lm import __version__
from protein_lm.errors import OldConfigNames, UserError

# name -> (module, one-line help). Modules are imported only when chosen.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("protein_lm.commands.prepare", "FASTA(.gz) -> token cache (memmap + offsets + manifest)"),
    "download": ("protein_lm.commands.download", "download a UniProt release file (resumable)"),
    "evaluate": ("protein_lm.commands.evaluate", "accuracy / perplexity of a checkpoint on a FASTA file"),
    "export": ("protein_lm.commands.export", "checkpoint -> weights-only file (no optimiser state)"),
    "convert": ("protein_lm.commands.convert", "exact-attention checkpoint -> Performer checkpoint"),
    "analyze": ("protein_lm.commands.analyze", "attention -> amino-acid similarity, BLOSUM62 comparison, heatmaps"),
    "spans": ("protein_lm.commands.spans", "adaptive attention span per layer and head -> figure (+ JSON)"),
    "embed": ("protein_lm.commands.embed", "per-protein embeddings (mean / per-residue / cls) -> safetensors"),
    "score": ("protein_lm.commands.score", "per-sequence pseudo-log-likelihood, variant effects -> CSV"),
    "init-example": ("protein_lm.commands.init_example", "copy the shipped configs, sample data and model into DIR"),
    "probe": ("protein_lm.commands.probe", "secondary-structure probe (FLIP, Q3) on frozen embeddings vs baselines"),
}
LIGHTNING_COMMANDS = {
    "fit": "train a model (LightningCLI; --config configs/<name>.yaml)",
    "validate": "run the validation loop on a checkpoint",
    "test": "run the test loop on a checkpoint",
    "predict": "run prediction",
}


def _top_level_help() -> str:
    lines = [f"protein-lm {__version__}: protein language models with Performer attention", "", "commands:"]
    for name, text in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "`protein-lm COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    with _notes_as_one_line():
        return _run(name, rest)


def _run(name: str, rest: list[str]) -> int:
    try:
        if name in LIGHTNING_COMMANDS:
            from protein_lm.commands.train import run_lightning_cli

            return run_lightning_cli([name, *rest])
        if name not in COMMANDS:
            print(f"protein-lm: unknown command {name!r}\n\n{_top_level_help()}", file=sys.stderr)
            return 2
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"protein-lm {name}", description=COMMANDS[name][1])
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        with _sigterm_as_interrupt():
            return int(module.run(args) or 0)
    except UserError as err:
        print(f"protein-lm {name}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"protein-lm {name}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"protein-lm {name}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _notes_as_one_line() -> Iterator[None]:
    """Deprecation notes meant for the user (:class:`OldConfigNames`) print as one ``protein-lm:``
    line, without the source line that a Python warning shows."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' hook
        if issubclass(category, OldConfigNames):
            print(f"protein-lm: {message}", file=sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so that every cleanup that runs on Ctrl-C runs for it too."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, SLURM, ``docker stop``) unwinds like Ctrl-C instead of killing outright,
    so temporary files and directories are removed. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
