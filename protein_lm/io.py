"""Atomic writes: a file or a directory is at its path complete, or not at all.

A file is written to a temporary sibling (the same directory, so the rename never crosses a file
system), flushed to disk (``fsync``) and renamed over the target (``os.replace``, atomic on POSIX);
the directory is flushed after the rename so that the rename itself survives a crash. A directory
is built in a scratch sibling and swapped in: an old directory at the path is moved aside first,
removed once the new one is in place, and put back if the swap fails.

Temporary names say which process on which host made them (``.NAME.tmp-HOST-PID-XXXX``): a run
killed with SIGKILL (or a lost node) cannot remove its own, so a later run removes those whose
process is gone (:func:`remove_stale`) and leaves alone those of a run still going, or of another
host sharing the file system, whose processes it cannot see.

User-facing checks and one-line errors around these are in :mod:`protein_lm.outputs`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

KINDS = ("tmp", "old")  # something being written / an old directory moved aside while the new one goes in


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "localhost"


def _prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{_host()}-{os.getpid()}-"


def default_mode(directory: bool = False) -> int:
    """The permissions a new file (or directory) gets from this process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Flush the finished file ``src`` to disk and rename it to ``dst`` (same directory)."""
    _fsync_file(Path(src))
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a new temporary sibling of ``path``, then make it ``path`` atomically.

    The temporary name is unique per call, so processes writing the same path at the same time never
    share a partial file (the last rename wins); it is removed when anything fails, so ``path`` keeps
    its old content and no temporary file is left behind. The file gets the permissions of a new file
    (``mkstemp`` makes it private). ``write`` gets a path, not a file object, so ``torch.save``,
    ``savefig`` and ``safetensors`` can write to it; ``np.save`` needs an open file (it appends
    ``.npy`` to a path without that suffix).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        replace_file(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_file` of ``text`` (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`write_file` of ``data``."""
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def scratch_dir(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A new directory ``.NAME.KIND-HOST-PID-XXXX`` beside ``path``, with the permissions of a new
    directory (it becomes the output; ``mkdtemp`` would make it private)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, kind), dir=path.parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                _fsync_file(Path(dirpath, name))
        fsync_dir(Path(dirpath))


def replace_dir(new: str | os.PathLike, path: str | os.PathLike, aside: str | os.PathLike | None = None) -> None:
    """Make the finished directory ``new`` (a sibling of ``path``) be ``path``.

    Its files are flushed to disk first. Whatever is at ``path`` (a directory or a file) is moved
    aside (into a scratch directory, or to ``aside`` when given), removed once ``new`` is in place,
    and put back if that rename fails. Between the two renames nothing is at ``path``: a process
    killed exactly there leaves the old one aside (``aside``, or a scratch directory that
    :func:`remove_stale` removes later).
    """
    new, path = Path(new), Path(path)
    if new.is_dir():
        _fsync_tree(new)
    else:
        _fsync_file(new)
    held = None
    if path.exists() or path.is_symlink():
        held = Path(aside) if aside is not None else scratch_dir(path, "old") / path.name
        remove_path(held)
        os.replace(path, held)
    try:
        os.replace(new, path)
    except OSError:
        if held is not None:
            os.replace(held, path)
            if aside is None:
                held.parent.rmdir()
        raise
    fsync_dir(path.parent)
    if held is not None:
        remove_path(held if aside is not None else held.parent)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file, link or directory tree at ``path``; nothing there is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove this host's temporary files and directories of ``path`` whose process has died.

    Returns what was removed.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    host = _host()
    for kind in KINDS:
        prefix = f".{path.name}.{kind}-{host}-"
        for found in path.parent.iterdir():  # not glob: the name may hold glob characters
            if not found.name.startswith(prefix):
                continue
            pid_text = found.name[len(prefix):].split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
                continue
            if found.is_dir() and not found.is_symlink():
                shutil.rmtree(found, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    found.unlink()
            removed.append(found)
    return removed
