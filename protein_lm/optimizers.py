"""Muon for the hidden weight matrices, AdamW for everything else, as one optimiser.

Why one object: Lightning's automatic optimisation drives a single optimiser (one closure, one
LR scheduler, gradient clipping over its parameter groups). :class:`MuonAdamW` holds a
``torch.optim.Muon`` and a ``torch.optim.AdamW`` whose parameter-group dicts *are* its own
``param_groups``, so the LR scheduler and gradient clipping act on both; ``step`` evaluates the
closure once and steps both.

Muon orthogonalises the momentum of 2-D weight matrices (Newton-Schulz iterations); it is not
meant for embeddings, norms, biases or the output head. Here the output head is tied to the
embedding, so Muon takes the 2-D weights of the ``decay`` group of
:func:`protein_lm.lit_module.param_groups` (linear layers), and AdamW the rest. Muon uses
``adjust_lr_fn="match_rms_adamw"`` so that its updates have AdamW's RMS and the same ``lr`` and
schedule serve both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked ``muon: True``, AdamW on the others.

    Args:
        groups: parameter-group dicts (``params`` plus per-group settings); a group with
            ``"muon": True`` must hold 2-D parameters only.
        lr: base learning rate of both.
        betas: AdamW betas.
        eps: AdamW epsilon.
        momentum: Muon momentum.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, momentum: float = 0.95) -> None:
        muon_groups = [g for g in groups if g.get("muon")]
        adam_groups = [g for g in groups if not g.get("muon")]
        self.inner: list[torch.optim.Optimizer] = []
        if muon_groups:
            self.inner.append(torch.optim.Muon(muon_groups, lr=lr, momentum=momentum,
                                               adjust_lr_fn="match_rms_adamw"))
        if adam_groups:
            self.inner.append(torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps))
        # The inner optimisers' group dicts, shared (not copied): an LR change reaches them.
        super().__init__([g for opt in self.inner for g in opt.param_groups], {})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.inner:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict["inner"]
        if len(inner) != len(self.inner):
            raise ValueError(f"optimiser state holds {len(inner)} optimisers, this one has {len(self.inner)}")
        for opt, state in zip(self.inner, inner, strict=True):
            opt.load_state_dict(state)
        # load_state_dict replaces the inner group dicts: share the new ones again
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]


def split_for_muon(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``decay`` group's 2-D weights become a ``muon`` group; every other parameter stays as it was."""
    out = []
    for group in groups:
        if group.get("name") != "decay":
            out.append(group)
            continue
        matrices = [p for p in group["params"] if p.ndim == 2]
        others = [p for p in group["params"] if p.ndim != 2]
        if matrices:
            out.append({**group, "params": matrices, "name": "muon", "muon": True})
        if others:
            out.append({**group, "params": others})
    return out
