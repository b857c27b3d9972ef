"""Pieces shared by the explicit (quadratic, float64) attention references in the tests."""

from __future__ import annotations

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
