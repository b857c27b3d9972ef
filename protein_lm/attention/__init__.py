"""Attention kernels: FAVOR+ (softmax / ReLU random features), exact softmax, implied attention.

All tensors are ``(B, H, L, D)``; ``key_padding_mask`` is bool ``(B, L)``, True at padding.
See docs/architecture.md (contract) and docs/attention.md (math, numerics, measurements).
"""

from .ops.causal import causal_linear_attention
from .ops.exact import exact_attention
from .ops.favor import FavorAttention, favor_bidirectional, favor_causal, favor_features
from .ops.features import draw_projection, relu_features, softmax_features
from .ops.implied import implied_attention

__all__ = [
    "FavorAttention",
    "exact_attention",
    "implied_attention",
    "softmax_features",
    "relu_features",
    "draw_projection",
    "favor_bidirectional",
    "favor_causal",
    "favor_features",
    "causal_linear_attention",
]
