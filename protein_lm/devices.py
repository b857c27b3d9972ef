"""`--device` parsing shared by the commands that run a model outside a Trainer."""

from __future__ import annotations

from protein_lm.errors import UserError


def resolve_device(name: str):
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked, never a traceback.

    Raises:
        UserError: an unknown device string, or CUDA asked for on a machine without it.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device
