"""Product-key memory layer (Lample et al., NeurIPS 2019, arXiv 1907.05242).

A key/value memory with ``n^2`` slots whose exact top-k search costs ``O((n + k^2) d_q)`` instead of
``O(n^2 d_q)``: every key is the concatenation of two sub-keys, one from each of two sets of ``n``
sub-keys, so ``<q, [c1_a, c2_b]> = <q1, c1_a> + <q2, c2_b>`` for the two halves of the query. The
best ``k`` full keys are all among the ``k x k`` pairs formed by the best ``k`` sub-keys of each half
(any other pair has a half-score below the k-th best of its set, hence is beaten by k pairs), so::

    q = norm(W x)                                   # query network, (T, heads, d_q)
    s1, i1 = topk(q1 @ C1^T, k); s2, i2 = topk(q2 @ C2^T, k)     # per head, over n sub-keys
    s, idx = topk(s1[:, None] + s2[None, :], k)     # k^2 candidates -> k; slot = i1 * n + i2
    w = softmax(s)                                  # over the k selected slots
    out = sum_heads sum_k w * V[slot]               # nn.EmbeddingBag(mode="sum", per_sample_weights=w)

is exact. Heads have their own query projection and sub-keys and share the value table. Only the
``heads * k`` retrieved value rows of each token get gradient (sparse updates); the values live in
their own optimiser group (higher constant LR, no weight decay): :func:`pkm_value_parameters`.

Query normalisation: LayerNorm (per token) by default. The paper uses BatchNorm, whose batch
statistics mix positions (future tokens leak into a causal model's queries, padding skews them);
``query_norm="batchnorm"`` is therefore padding-aware (statistics over real tokens only) and is
still not recommended for causal models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ProductKeyMemory",
    "PKMUsage",
    "PKMFeedForward",
    "product_key_topk",
    "pkm_modules",
    "pkm_value_parameters",
]


def product_key_topk(query: Tensor, subkeys: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """Exact top-k over the ``n^2`` product keys.

    Args:
        query: ``(T, heads, d_q)``.
        subkeys: ``(heads, 2, n, d_q / 2)``.
        topk: ``k`` (``<= n``).

    Returns:
        ``scores (T, heads, k)`` sorted descending and ``slots (T, heads, k)`` long in ``[0, n^2)``,
        slot ``a * n + b`` being the pair (sub-key ``a`` of half 1, sub-key ``b`` of half 2).
    """
    half = subkeys.shape[-1]
    n = subkeys.shape[2]
    q1, q2 = query[..., :half], query[..., half:]
    s1 = torch.einsum("thd,hnd->thn", q1, subkeys[:, 0])  # (T,heads,n)
    s2 = torch.einsum("thd,hnd->thn", q2, subkeys[:, 1])
    s1, i1 = s1.topk(topk, dim=-1)  # (T,heads,k)
    s2, i2 = s2.topk(topk, dim=-1)
    cand = s1[..., :, None] + s2[..., None, :]  # (T,heads,k,k)
    cand_slots = i1[..., :, None] * n + i2[..., None, :]
    scores, flat = cand.flatten(-2).topk(topk, dim=-1)  # (T,heads,k)
    slots = cand_slots.flatten(-2).gather(-1, flat)
    return scores, slots


class _MaskedBatchNorm(nn.Module):
    """BatchNorm over the real (non-padding) tokens only; padded rows pass through unnormalised."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:  # x (T, dim), keep (T,) bool
        if keep is None:
            return self.bn(x)
        out = x.clone()
        out[keep] = self.bn(x[keep])
        return out


class ProductKeyMemory(nn.Module):
    """Product-key memory: ``(B, L, dim) -> (B, L, dim)``.

    Args:
        dim: model width (input and output).
        num_keys: ``n`` sub-keys per half; the memory has ``n^2`` slots.
        topk: ``k`` slots read per head.
        heads: memory heads (own query projection and sub-keys, shared values).
        key_dim: ``d_q``, query/key width (even).
        value_dim: value width (default ``dim``; a final linear maps it back to ``dim`` if different).
        query_norm: ``"layernorm"`` (default) or ``"batchnorm"`` (padding-aware), or ``"none"``.
        input_dropout, query_dropout, value_dropout: dropout on the input, the query and the
            selected weights (``value_dropout`` drops whole slots from the weighted sum).
        value_lr: if set, the value table carries ``optim_overrides = {"lr": value_lr,
            "weight_decay": 0.0, "lr_schedule": "constant"}`` for ``lit_module.param_groups``.

    Attribute ``usage``: an optional :class:`PKMUsage` that, when set, accumulates the slot weights
    of every forward in eval mode (``track_usage`` toggles it for training too).
    """

    def __init__(
        self,
        dim: int,
        num_keys: int = 128,
        topk: int = 32,
        heads: int = 4,
        key_dim: int = 128,
        value_dim: int | None = None,
        query_norm: str = "layernorm",
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        value_lr: float | None = None,
    ) -> None:
        super().__init__()
        if key_dim % 2:
            raise ValueError(f"key_dim must be even, got {key_dim}")
        if topk > num_keys:
            raise ValueError(f"topk ({topk}) must be <= num_keys ({num_keys})")
        if query_norm not in ("layernorm", "batchnorm", "none"):
            raise ValueError(f"query_norm must be layernorm|batchnorm|none, got {query_norm!r}")
        self.dim, self.num_keys, self.topk, self.heads, self.key_dim = dim, num_keys, topk, heads, key_dim
        self.value_dim = value_dim or dim
        self.size = num_keys * num_keys
        self.query_norm_kind = query_norm
        self.input_dropout, self.query_dropout, self.value_dropout = (
            input_dropout,
            query_dropout,
            value_dropout,
        )

        self.query_proj = nn.Linear(dim, heads * key_dim)
        if query_norm == "layernorm":
            self.query_norm: nn.Module = nn.LayerNorm(key_dim)
        elif query_norm == "batchnorm":
            self.query_norm = _MaskedBatchNorm(heads * key_dim)
        else:
            self.query_norm = nn.Identity()
        # Sub-keys: (heads, 2 halves, n, d_q/2), uniform with unit expected squared norm per half.
        bound = 1.0 / math.sqrt(key_dim // 2)
        self.keys = nn.Parameter(torch.empty(heads, 2, num_keys, key_dim // 2).uniform_(-bound, bound))
        self.values = nn.EmbeddingBag(self.size, self.value_dim, mode="sum")
        nn.init.normal_(self.values.weight, mean=0.0, std=self.value_dim**-0.5)
        if value_lr is not None:
            self.values.weight.optim_overrides = {
                "lr": value_lr,
                "weight_decay": 0.0,
                "lr_schedule": "constant",
            }
        self.out_proj = nn.Linear(self.value_dim, dim) if self.value_dim != dim else nn.Identity()
        self.usage: PKMUsage | None = None
        self.track_usage = False

    statistics_group = "pkm"  # ProteinLM.statistics logs pkm/<i>/<key>

    def reset_statistics(self) -> None:
        """Start counting slot usage afresh (a :class:`PKMUsage`); called at validation start."""
        if self.usage is None:
            self.usage = PKMUsage(self.size)
        else:
            self.usage.reset()

    def statistics(self) -> dict[str, float]:
        """Slot usage since :meth:`reset_statistics` (:meth:`PKMUsage.compute`); empty before it."""
        return {} if self.usage is None else self.usage.compute()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, slots={self.num_keys}^2={self.size}, topk={self.topk}, heads={self.heads}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, query_norm={self.query_norm_kind!r}"
        )

    def query(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Query network ``(B, L, dim) -> (B*L, heads, d_q)``."""
        t = x.shape[0] * x.shape[1]
        flat = F.dropout(x.reshape(t, self.dim), self.input_dropout, self.training)
        q = self.query_proj(flat)  # (T, heads*d_q)
        if self.query_norm_kind == "batchnorm":
            keep = None if padding_mask is None else ~padding_mask.reshape(t).to(torch.bool)
            q = self.query_norm(q, keep).view(t, self.heads, self.key_dim)
        else:
            q = self.query_norm(q.view(t, self.heads, self.key_dim))
        return F.dropout(q, self.query_dropout, self.training)

    def lookup(self, x: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Selected ``slots`` and softmax ``weights``, each ``(B*L, heads, k)``."""
        q = self.query(x, padding_mask)
        with torch.autocast(device_type=x.device.type, enabled=False):  # exact search in float32
            scores, slots = product_key_topk(q.float(), self.keys.float(), self.topk)
            weights = torch.softmax(scores, dim=-1)
        return slots, weights

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x (B, L, dim)``, ``padding_mask`` bool ``(B, L)`` True at padding -> ``(B, L, dim)``."""
        b, length, _ = x.shape
        slots, weights = self.lookup(x, padding_mask)
        t = b * length
        if self.value_dropout > 0 and self.training:
            weights = F.dropout(weights, self.value_dropout, True)
        if self.usage is not None and (self.track_usage or not self.training):
            keep = None if padding_mask is None else ~padding_mask.reshape(t).to(torch.bool)
            self.usage.update(slots, weights, keep)
        w = weights.reshape(t, self.heads * self.topk).to(self.values.weight.dtype)
        out = self.values(slots.reshape(t, self.heads * self.topk), per_sample_weights=w)  # (T, value_dim)
        out = self.out_proj(out).view(b, length, self.dim)
        if padding_mask is not None:
            out = out.masked_fill(padding_mask[..., None].to(torch.bool), 0.0)
        return out.to(x.dtype)


class PKMFeedForward(nn.Module):
    """A block's feed-forward sublayer with a product-key memory replacing it or beside it.

    ``forward(x, padding_mask=None) = ffn(x) + pkm(x)`` ("beside"), or ``pkm(x)`` when ``ffn`` is
    None ("replace", the paper's setting). ``takes_padding_mask`` tells the block to pass the mask.
    """

    takes_padding_mask = True

    def __init__(self, pkm: ProductKeyMemory, ffn: nn.Module | None = None) -> None:
        super().__init__()
        self.pkm, self.ffn = pkm, ffn

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        out = self.pkm(x, padding_mask)
        return out if self.ffn is None else out + self.ffn(x)


class PKMUsage:
    """Accumulates how a memory's slots are used (call :meth:`reset` at the start of validation).

    Per slot it sums the softmax weight given to it (``mass``) and the number of times it was
    selected (``hits``). :meth:`compute` reports:

    * ``used``: fraction of slots selected at least once,
    * ``kl_uniform``: ``KL(p || uniform)`` of the normalised weight mass ``p`` (0 = perfectly even,
      ``log(n^2)`` = one slot takes everything),
    * ``top50/top90/top99``: how many slots (most used first) hold 50 / 90 / 99 % of the mass.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.mass = torch.zeros(self.size, dtype=torch.float64)
        self.hits = torch.zeros(self.size, dtype=torch.float64)

    @torch.no_grad()
    def update(self, slots: Tensor, weights: Tensor, keep: Tensor | None = None) -> None:
        """``slots, weights: (T, heads, k)``; ``keep (T,)`` bool selects real tokens."""
        if keep is not None:
            slots, weights = slots[keep], weights[keep]
        s = slots.reshape(-1).cpu()
        self.mass.index_add_(0, s, weights.reshape(-1).double().cpu())
        self.hits.index_add_(0, s, torch.ones_like(s, dtype=torch.float64))

    def compute(self) -> dict[str, float]:
        total = float(self.mass.sum())
        if total <= 0:
            return {"used": 0.0, "kl_uniform": float("nan"), "top50": 0.0, "top90": 0.0, "top99": 0.0}
        p = self.mass / total
        nz = p[p > 0]
        kl = float((nz * (nz * self.size).log()).sum())
        cum = p.sort(descending=True).values.cumsum(0)
        out = {"used": float((self.hits > 0).double().mean()), "kl_uniform": kl}
        for q in (50, 90, 99):
            out[f"top{q}"] = float(int(torch.searchsorted(cum, torch.tensor(q / 100, dtype=cum.dtype))) + 1)
        return out


def pkm_modules(model: nn.Module) -> Iterator[tuple[str, ProductKeyMemory]]:
    """``(name, module)`` of every :class:`ProductKeyMemory` in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, ProductKeyMemory):
            yield name, mod


def pkm_value_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The PKM value tables, for their own optimiser group (higher constant LR, no weight decay)."""
    return [mod.values.weight for _, mod in pkm_modules(model)]
