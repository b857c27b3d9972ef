"""``FavorAttention``: FAVOR+ over ``(B, H, L, D)`` tensors, on the fused Triton kernels or the
PyTorch reference (:mod:`protein_lm.attention.ops.favor`), chosen by ``backend``.

Backend choice: ``"torch"`` always runs the reference; ``"triton"`` runs the fused kernels and
raises a one-line ``ValueError`` for inputs they do not cover; ``"auto"`` runs the fused kernels on
CUDA tensors they cover and otherwise the reference -- CPU tensors silently (there is no CPU
kernel), CUDA tensors with one warning per module naming the reason (a slow path on a GPU should be
visible). The fused op says what it covers (``favor_triton.why_unsupported``); it never falls back
itself.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
from torch import Tensor, nn

from protein_lm.attention.ops.causal import DEFAULT_CHUNK
from protein_lm.attention.ops.favor import (
    DEFAULT_EPS,
    KERNELS,
    favor_bidirectional,
    favor_causal,
    favor_features,
)
from protein_lm.attention.ops.features import draw_projection
from protein_lm.attention.ops.implied import implied_attention

__all__ = ["FavorAttention", "BACKENDS", "fused_kernels"]

BACKENDS = ("auto", "torch", "triton")

_FUSED: ModuleType | str | None = None  # the kernels module, or why it cannot be imported


def fused_kernels() -> ModuleType | str:
    """:mod:`protein_lm.attention.ops.favor_triton`, or the one-line reason it is not importable
    (looked up once: importing it compiles nothing, but needs a working Triton)."""
    global _FUSED
    if _FUSED is None:
        try:
            from protein_lm.attention.ops import favor_triton

            _FUSED = favor_triton
        except Exception as err:  # ImportError, or a Triton that fails at import
            _FUSED = f"the Triton kernels are not importable ({type(err).__name__}: {err})"
    return _FUSED


class FavorAttention(nn.Module):
    """FAVOR+ attention over ``(B, H, L, D)`` tensors (no input/output projections).

    Args:
        dim_head: D.
        num_features: M, random features per head (shared by all heads of the layer).
        kernel: ``"softmax"`` (positive random features) or ``"relu"`` (Performer-ReLU).
        causal: unidirectional (prefix-sum) attention.
        orthogonal: orthogonal random features; ``False`` for iid Gaussian rows.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring).
        seed: seed of the projection draws. With a seed, the n-th draw (``redraw_count``) is a pure
            function of ``(seed, n)``, so resumed runs redraw the same matrices. Give each layer its
            own seed. ``None``: draws from the global RNG.
        eps: floor of the normaliser.
        chunk_size: causal chunk length (torch backend).

    Buffers (saved in the state dict): ``projection (M, D)`` float32, ``redraw_count`` int64 scalar.
    """

    projection: Tensor
    redraw_count: Tensor

    def __init__(
        self,
        dim_head: int,
        num_features: int = 256,
        kernel: str = "softmax",
        causal: bool = False,
        orthogonal: bool = True,
        backend: str = "auto",
        seed: int | None = None,
        eps: float = DEFAULT_EPS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.dim_head = dim_head
        self.num_features = num_features
        self.kernel = kernel
        self.causal = causal
        self.orthogonal = orthogonal
        self.backend = backend
        self.seed = seed
        self.eps = eps
        self.chunk_size = chunk_size
        self._warned_fallback = False  # auto: one warning per module, not per call
        self.register_buffer("projection", torch.zeros(num_features, dim_head))
        self.register_buffer("redraw_count", torch.zeros((), dtype=torch.int64))
        self.redraw_projection()

    def extra_repr(self) -> str:
        return (
            f"dim_head={self.dim_head}, num_features={self.num_features}, kernel={self.kernel!r}, "
            f"causal={self.causal}, orthogonal={self.orthogonal}, backend={self.backend!r}"
        )

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection in place (device and dtype kept).

        Without ``generator``: seeded modules use a generator seeded from ``(seed, redraw_count)``;
        unseeded ones use the global RNG. ``redraw_count`` is incremented either way.
        """
        if generator is None and self.seed is not None:
            generator = torch.Generator().manual_seed(
                int(self.seed) * 1_000_003 + int(self.redraw_count.item())
            )
        w = draw_projection(self.num_features, self.dim_head, self.orthogonal, generator=generator)
        self.projection.copy_(w.to(self.projection.dtype))
        self.redraw_count += 1

    def _fused(self, q: Tensor, k: Tensor, v: Tensor) -> ModuleType | None:
        """The fused kernels module when this call runs on it, else None (the reference path)."""
        if self.backend == "torch" or (self.backend == "auto" and not q.is_cuda):
            return None
        fused = fused_kernels()
        reason = fused if isinstance(fused, str) else fused.why_unsupported(q, k, v, self.projection)
        if reason is None:
            return fused  # type: ignore[return-value]
        if self.backend == "triton":
            raise ValueError(f"FavorAttention(backend='triton'): {reason}; use backend 'auto' or 'torch'")
        if not self._warned_fallback:
            warnings.warn(f"FavorAttention: using the PyTorch path: {reason}", stacklevel=3)
            self._warned_fallback = True
        return None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """``(B, H, L, D) x3 -> (B, H, L, D)``, in ``v``'s dtype; ``key_padding_mask`` bool ``(B, L)``,
        True at padding; ``segment_ids`` integer ``(B, L)`` for packed rows: attention stays inside
        each maximal run of equal ids (both backends)."""
        if q.shape[-1] != self.dim_head or k.shape[-1] != self.dim_head:
            raise ValueError(f"expected head dim {self.dim_head}, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if self.causal and q.shape[-2] != k.shape[-2]:
            raise ValueError("causal attention needs queries and keys of the same length")
        fused = self._fused(q, k, v)
        if fused is not None:
            args = (q, k, v, self.projection, self.kernel, self.causal, key_padding_mask, self.eps)
            return fused.favor_attention_triton(*args, segment_ids)
        phi_q, phi_k = favor_features(q, k, self.projection, self.kernel, key_padding_mask, segment_ids)
        if self.causal:
            out = favor_causal(phi_q, phi_k, v, key_padding_mask, self.eps, segment_ids=segment_ids,
                               chunk_size=self.chunk_size)
        else:
            out = favor_bidirectional(phi_q, phi_k, v, key_padding_mask, self.eps, segment_ids=segment_ids,
                                      chunk_size=self.chunk_size)
        return out.to(v.dtype)

    @torch.no_grad()
    def attention_probs(
        self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None, rows: range | None = None
    ) -> Tensor:
        """The implied attention ``(B, H, R, L)`` (rows of :func:`implied_attention` with this module's
        projection, kernel and eps), so that ``probs @ v`` is the module's output."""
        return implied_attention(
            q, k, self.projection, self.kernel, self.causal, key_padding_mask, self.eps, rows=rows
        )
