"""Formatting of the result tables the drivers print."""

from __future__ import annotations

import math


def fmt_number(value: object, spec: str) -> str:
    """``format(value, spec)`` for finite numbers, ``-`` for anything else (missing, NaN, failed runs)."""
    return format(value, spec) if isinstance(value, int | float) and math.isfinite(value) else "-"
