"""Bytes-read progress of ``prepare`` on stderr."""

from __future__ import annotations

import sys
import time


class ReadProgress:
    """Bytes-read progress on stderr: redrawn in place on a terminal, a line every 10 s
    otherwise (logs), nothing for inputs that finish quickly."""

    DELAY = 2.0  # seconds before the first report
    INTERVAL_TTY = 0.5
    INTERVAL_LOG = 10.0

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.done = 0
        self.start = self.last = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()
        self.shown = False

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        interval = self.INTERVAL_TTY if self.tty else self.INTERVAL_LOG
        if now - self.start < self.DELAY or now - self.last < interval:
            return
        self.last = now
        self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9) / 1e6
        pct = 100.0 * self.done / self.total
        line = f"prepare: {self.label}: {pct:5.1f}% of {self.total / 1e6:,.0f} MB read ({rate:,.0f} MB/s)"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.enabled and self.shown:
            self.done = self.total
            self._show(time.monotonic())
            if self.tty:
                print(file=sys.stderr, flush=True)
