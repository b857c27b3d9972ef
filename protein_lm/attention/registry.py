"""Attention kinds by name: what ``ModelConfig.attention`` may say, and how each builds its module.

Every attention module takes ``forward(q, k, v, key_padding_mask=None, ...) -> (B, H, L, D)`` and
``attention_probs(q, k, key_padding_mask=None, rows=None) -> (B, H, R, L)`` (the probabilities of
query rows ``rows``, all by default; rows of real queries sum to 1 -- minus what persistent memory
takes -- and padded keys get 0), which analysis reads instead of knowing the kinds. Adding a kind is
an op file in ``ops/``, a module in ``modules/``, one :func:`register` call below and a test file.

The options that wrap any kind (adaptive span, persistent memory) are applied by
:func:`build_attention` around the kind's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from protein_lm.model_config import ModelConfig

__all__ = ["AttentionKind", "KINDS", "register", "kind", "build_attention", "attention_probs"]


@dataclass(frozen=True)
class AttentionKind:
    """One attention kind.

    Attributes:
        name: the ``ModelConfig.attention`` value.
        build: ``(config, layer_index) -> nn.Module``, the layer's attention module.
        random_features: the module has a random projection (``redraw_projection``), redrawn in
            training and estimated, not exact, attention.
    """

    name: str
    build: Callable[[ModelConfig, int], nn.Module]
    random_features: bool = False


KINDS: dict[str, AttentionKind] = {}


def register(name: str, build: Callable[[ModelConfig, int], nn.Module], random_features: bool = False) -> None:
    """Make ``name`` a valid ``ModelConfig.attention``."""
    if name in KINDS:
        raise ValueError(f"attention kind {name!r} is already registered")
    KINDS[name] = AttentionKind(name, build, random_features)


def kind(name: str) -> AttentionKind:
    """The registered kind, or a one-line ``ValueError`` listing the valid names."""
    try:
        return KINDS[name]
    except KeyError:
        names = ", ".join(repr(k) for k in KINDS)
        raise ValueError(f"attention must be one of {names}, got {name!r}") from None


def build_attention(config: ModelConfig, layer_index: int) -> nn.Module:
    """The attention module of layer ``layer_index``: the kind's module, wrapped by an adaptive span
    and / or persistent memory when the config asks for them (docs/fair_mechanisms.md)."""
    base = kind(config.attention).build(config, layer_index)
    if not (config.span.enabled or config.memory.slots):
        return base
    from protein_lm.attention.modules.memory import PersistentMemory, PersistentMemoryKernel
    from protein_lm.attention.modules.span import AdaptiveSpan, AdaptiveSpanKernel

    exact = not kind(config.attention).random_features
    memory = None
    if config.memory.slots:
        memory = PersistentMemory(config.heads, config.head_dim, config.memory.slots)
    if config.span.enabled:
        span = AdaptiveSpan(
            config.heads,
            config.span.max,
            config.span.ramp,
            config.span.init,
            config.span.loss_coef,
            dynamic=config.span.dynamic,
            dim=config.dim,
        )
        return AdaptiveSpanKernel(span, config.causal, favor=None if exact else base, memory=memory)
    return PersistentMemoryKernel(base, memory, config.causal, favor=not exact)


def attention_probs(
    module: nn.Module, q: Tensor, k: Tensor, mask: Tensor | None = None, rows: range | None = None, **extra
) -> Tensor:
    """``module.attention_probs``: rows ``rows`` of a layer's attention, ``(B, H, R, L)``.

    Args:
        module: a layer's attention module (from :func:`build_attention`).
        q, k: ``(B, H, L, D)``, positions applied.
        mask: bool ``(B, L)``, True at padding.
        rows: query rows (default all).
        extra: what the module's forward also needs (``x`` for dynamic spans).
    """
    return module.attention_probs(q, k, key_padding_mask=mask, rows=rows, **extra)


def _favor(kernel: str) -> Callable[[ModelConfig, int], nn.Module]:
    def build(config: ModelConfig, layer_index: int) -> nn.Module:
        from protein_lm.attention.modules.favor import FavorAttention

        # one seed per layer, so that layers draw different projections from one config seed
        seed = None if config.feature_seed is None else config.feature_seed + 1000 * layer_index
        return FavorAttention(
            dim_head=config.head_dim,
            num_features=config.num_features,
            kernel=kernel,
            causal=config.causal,
            orthogonal=config.orthogonal_features,
            backend=config.favor_backend,
            seed=seed,
        )

    return build


def _exact(config: ModelConfig, layer_index: int) -> nn.Module:
    from protein_lm.attention.modules.exact import ExactAttention

    return ExactAttention(causal=config.causal)


register("performer-softmax", _favor("softmax"), random_features=True)
register("performer-relu", _favor("relu"), random_features=True)
register("exact", _exact)
