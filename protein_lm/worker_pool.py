"""A process pool whose workers never outlive the run that started them.

With a plain :class:`~concurrent.futures.ProcessPoolExecutor`, a parent killed with SIGKILL leaves
its workers blocked forever on a queue nobody writes to, and a parent stopped by SIGTERM or Ctrl-C
waits for every running task before its cleanup can run. Here each worker asks the kernel to kill
it when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere it checks its parent at
start), leaves SIGINT / SIGTERM to the parent, and the parent kills the workers at once when it
stops early for any reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Worker initializer (runs in the worker)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent handles interrupts and then kills the workers; a worker raising KeyboardInterrupt
    # itself would only print a second traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor of ``workers`` processes that die with this one and on early exit."""
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        # The executor keeps its processes in a private dict; no public API stops running tasks.
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            with contextlib.suppress(Exception):
                proc.kill()
        for proc in processes:
            with contextlib.suppress(Exception):
                proc.join(timeout=5)
        raise
    else:
        pool.shutdown(wait=True)
