"""Temporary directories next to an output, named by their owner so a later run can clean up.

``prepare`` builds a cache in ``.NAME.tmp-HOST-PID-XXXX`` beside it and renames it into place; a
run killed with SIGKILL (or a lost node) cannot remove it. Because the name says which process on
which host made it, the next run removes those whose process is gone, and leaves alone those of a
run still going (or of another host sharing the file system, whose processes it cannot see).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

KINDS = ("tmp", "old")  # a cache being built / an old cache moved aside while the new one goes in


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "localhost"


def make_scratch_dir(out: Path, kind: str) -> Path:
    """A new private directory ``.OUT.KIND-HOST-PID-XXXX`` in ``out``'s parent."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{_host()}-{os.getpid()}-", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove this host's scratch directories of ``out`` whose process has died; returns them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    host = _host()
    for kind in KINDS:
        prefix = f".{out.name}.{kind}-{host}-"
        for path in out.parent.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix):].split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
