"""Pieces shared by the explicit (quadratic, float64) attention references in the tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def allowed_pairs(batch: int, lq: int, lk: int, causal: bool = False, key_padding_mask=None) -> torch.Tensor:
    """Bool ``(B, 1, Lq, Lk)``: True where query i may attend to key j (causal: j <= i; no padded keys)."""
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(batch, 1, lq, lk)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


def same_with_nan_filled_scratch(run: Callable[[], list[torch.Tensor]]) -> bool:
    """Whether ``run()`` gives bitwise the same tensors when every ``torch.empty`` / ``empty_like``
    buffer starts as NaN: a kernel that reads scratch memory before writing it fails this."""

    def nan_filled(make):
        def make_nan(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t

        return make_nan

    normal = run()
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty, torch.empty_like = nan_filled(empty), nan_filled(empty_like)
    try:
        poisoned = run()
    finally:
        torch.empty, torch.empty_like = empty, empty_like
    return all(torch.equal(a, b) for a, b in zip(normal, poisoned, strict=True))
