"""Attention: pure ops (``ops/``), the modules layers use (``modules/``) and the kinds by name
(:mod:`protein_lm.attention.registry`).

All tensors are ``(B, H, L, D)``; ``key_padding_mask`` is bool ``(B, L)``, True at padding.
See docs/architecture.md (contract) and docs/attention.md (math, numerics, measurements).
"""

from .modules.exact import ExactAttention
from .modules.favor import FavorAttention
from .ops.causal import causal_linear_attention
from .ops.exact import exact_attention, exact_probs
from .ops.favor import favor_bidirectional, favor_causal, favor_features
from .ops.features import draw_projection, relu_features, softmax_features
from .ops.implied import implied_attention
from .ops.masks import allowed_keys

__all__ = [
    "FavorAttention",
    "ExactAttention",
    "exact_attention",
    "exact_probs",
    "implied_attention",
    "allowed_keys",
    "softmax_features",
    "relu_features",
    "draw_projection",
    "favor_bidirectional",
    "favor_causal",
    "favor_features",
    "causal_linear_attention",
]
