"""Learning-rate multipliers: step-based warm-up + decay, and a wall-clock version for fixed time budgets.

Why a time-based schedule: a step-based cosine needs the total step count in advance, but a
time-to-quality run has a budget in minutes and an unknown step rate (it depends on the model,
the kernels, ``torch.compile``). The time schedules warm up over ``warmup_steps`` optimiser steps,
then decay by the elapsed fraction of the budget, so every recipe ends at ``min_lr_ratio * lr``
exactly when its budget is spent, whatever its speed.

The clock is :class:`TrainClock`: wall seconds of training with evaluation pauses taken out, so
the evaluations a benchmark runs neither shorten the training budget nor move the schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

SCHEDULES = ("cosine", "linear", "time_cosine", "time_linear")


def decay_shape(kind: str, progress: float, min_lr_ratio: float) -> float:
    """Multiplier at ``progress`` in [0, 1] of the decay: cosine or linear from 1 to ``min_lr_ratio``."""
    progress = min(1.0, max(0.0, progress))
    if kind.endswith("cosine"):
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def warmup_decay(
    warmup_steps: int, total_steps: int | None, min_lr_ratio: float, kind: str = "cosine"
) -> Callable[[int], float]:
    """Step-based multiplier: linear warm-up from ~0 to 1, then ``kind`` decay to ``min_lr_ratio`` at ``total_steps``.

    With ``total_steps=None`` the rate stays at 1 after warm-up.
    """

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not total_steps or total_steps <= warmup_steps:
            return 1.0
        return decay_shape(kind, (step - warmup_steps) / (total_steps - warmup_steps), min_lr_ratio)

    return factor


class TrainClock:
    """Training seconds: wall time since :meth:`start`, minus the time spent between pause/resume.

    Args:
        now: the time source (``time.perf_counter``; tests pass a fake one).
    """

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._start: float | None = None
        self._paused_at: float | None = None
        self._paused_total = 0.0

    @property
    def started(self) -> bool:
        return self._start is not None

    def start(self) -> None:
        """Start counting (again from zero)."""
        self._start, self._paused_at, self._paused_total = self._now(), None, 0.0

    def pause(self) -> None:
        if self._start is not None and self._paused_at is None:
            self._paused_at = self._now()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_total += self._now() - self._paused_at
            self._paused_at = None

    def elapsed(self) -> float:
        """Training seconds so far (0 before :meth:`start`; frozen while paused)."""
        if self._start is None:
            return 0.0
        end = self._paused_at if self._paused_at is not None else self._now()
        return end - self._start - self._paused_total


def time_warmup_decay(
    warmup_steps: int, budget_seconds: float, min_lr_ratio: float, kind: str, clock: TrainClock
) -> Callable[[int], float]:
    """Multiplier: linear warm-up over ``warmup_steps`` steps, then decay by the elapsed budget fraction.

    The decay runs from the training time at which warm-up ended, ``t_w``, to the budget ``B``:
    ``progress = (t - t_w) / (B - t_w)`` (so the rate is 1 right after warm-up and
    ``min_lr_ratio`` at the budget; a warm-up that outlasts the budget gives ``min_lr_ratio``).
    """
    if budget_seconds <= 0:
        raise ValueError(f"the time budget must be > 0 seconds, got {budget_seconds}")
    warmup_end: list[float] = []  # training seconds at the first post-warm-up step

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = clock.elapsed()
        if not warmup_end:
            warmup_end.append(t)
        span = budget_seconds - warmup_end[0]
        if span <= 0:
            return min_lr_ratio
        return decay_shape(kind, (t - warmup_end[0]) / span, min_lr_ratio)

    return factor
