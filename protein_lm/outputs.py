"""Output files that are never left half-written, with errors a user can act on."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from protein_lm.errors import UserError
from protein_lm.io import remove_stale, replace_dir, scratch_dir, write_file


def can_write_in(directory: str | os.PathLike) -> OSError | None:
    """Whether files can be made in ``directory`` (or, if it does not exist yet, its first existing
    ancestor): tried with a probe file, not guessed — ``os.access`` says yes to root on a read-only
    mount. Returns the error, or None."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return err
    return None


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail early (before any long work) if ``path`` cannot become a file.

    Args:
        path: the file to be written.
        flag: the option that named it, for the message (e.g. ``--json``).
    """
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a directory; give a file name")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is not a directory")
    if parent.exists() and can_write_in(parent) is not None:
        raise UserError(f"{flag} {out}: cannot write in {parent}")
    return out


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], flag: str = "output") -> Path:
    """Call ``write(tmp)`` on a temporary sibling, then rename it to ``path`` (:func:`protein_lm.io.write_file`).

    A crash or a bad path never leaves a partial file behind; OS errors become one-line
    :class:`UserError` messages.
    """
    out = check_output_file(path, flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_file(out, write)
    except OSError as err:
        raise UserError(f"{flag} {out}: {err.strerror or err}") from None
    except RuntimeError as err:  # torch.save reports unwritable paths as RuntimeError
        raise UserError(f"{flag} {out}: {err}") from None
    return out


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Fail early if ``path`` holds anything: a directory output never mixes with older files."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag} {out}: exists and is not an empty directory; choose a new one")
    return out


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None], flag: str = "output") -> Path:
    """Call ``write(tmp_dir)`` on a fresh sibling directory, then rename it to ``path`` (empty or absent).

    Scratch directories of earlier runs that were killed are removed first (:func:`protein_lm.io.remove_stale`).
    """
    out = check_output_dir(path, flag)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = scratch_dir(out)
        write(tmp)
        replace_dir(tmp, out)
    except OSError as err:
        raise UserError(f"{flag} {out}: {err.strerror or err}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
