"""Which keys each query may attend: the one mask every exact, implied and analysis path uses."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["allowed_keys", "zero_padded"]


def allowed_keys(
    rows: range | int,
    length: int,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device | str,
) -> Tensor | None:
    """Bool ``(B or 1, 1, R, Lk)``: True where query ``t`` may attend key ``s``, or None (all keys).

    Args:
        rows: the queries, as absolute positions (``range``; a block of rows for analysis) or their
            count ``Lq`` (positions ``0 .. Lq-1``).
        length: ``Lk``, the number of keys.
        causal: query ``t`` sees keys ``s <= t`` only.
        key_padding_mask: bool ``(B, Lk)``, True at padding (never attended).
        device: where the mask lives.
    """
    rows = range(rows) if isinstance(rows, int) else rows
    allowed = None
    if causal:
        t = torch.arange(rows.start, rows.stop, device=device)[:, None]  # (R, 1)
        s = torch.arange(length, device=device)[None, :]  # (1, Lk)
        allowed = (s <= t)[None, None]  # (1, 1, R, Lk)
    if key_padding_mask is not None:
        keys = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        allowed = keys if allowed is None else allowed & keys
    return allowed


def zero_padded(x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """``x (B, H, L, *)`` with padded positions zeroed (``masked_fill``: also replaces inf/NaN there,
    so they cannot reach real outputs, and its backward gives padded inputs a zero gradient instead
    of ``0 * inf``)."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask.to(torch.bool)[:, None, :, None], 0.0)
