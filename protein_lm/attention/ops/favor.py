"""FAVOR+ attention (Performer): linear-time softmax / ReLU attention through random features.

``out = D^-1 phi(Q) (phi(K)^T V)`` with ``D = diag(phi(Q) phi(K)^T 1)`` (bidirectional) or its
prefix-sum version (causal, see :mod:`protein_lm.attention.causal`). The L x L matrix is never
formed. The normaliser is ``max(D, eps)`` with a tiny ``eps`` (1e-30): for any normaliser above
``eps`` the output is exactly the ratio (no bias), and one that underflowed cannot give 0/0 = NaN.
Packed rows (``segment_ids``) keep attention inside each segment (:mod:`protein_lm.attention.segments`).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .causal import DEFAULT_CHUNK, causal_linear_attention
from .features import RELU_EPS, draw_projection, relu_features, softmax_features
from .segments import segment_labels, segmented_linear_attention

__all__ = ["FavorAttention", "favor_bidirectional", "favor_causal", "favor_features", "DEFAULT_EPS"]

# The normaliser floor only guards against 0/0: under the global key shift an early causal position can
# have a normaliser of 1e-12 or less (unit-variance q, k at D=64), which must not be floored (1e-6 made
# the first outputs ~0). Division backward stays finite down to 1e-30 (|grad| <= |out| / den <= 1e30).
DEFAULT_EPS = 1e-30
KERNELS = ("softmax", "relu")
BACKENDS = ("auto", "torch", "triton")


def _zero_padded(x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Zero padded positions of ``(B, H, L, *)`` so inf/NaN there cannot reach real outputs."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def favor_features(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    kernel: str,
    key_padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Query and key features for ``kernel``: ``(B,H,L,D) x2 -> (B,H,L,M) x2`` (float32).

    Padded keys get zero features; padded queries (when queries and keys share L) are zeroed
    before the map so that huge or non-finite padding values stay finite. ``segment_ids`` (integer
    ``(B, L)``): softmax keys are shifted per segment (see :func:`softmax_features`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if segment_ids is not None and q.shape[-2] != k.shape[-2]:
        raise ValueError("segment_ids need queries and keys of the same length")
    q_mask = key_padding_mask if key_padding_mask is not None and q.shape[-2] == k.shape[-2] else None
    q = _zero_padded(q, q_mask)
    if kernel == "softmax":
        phi_q = softmax_features(q, projection, is_query=True)
        phi_k = softmax_features(
            k, projection, is_query=False, key_padding_mask=key_padding_mask, segment_ids=segment_ids
        )
    else:
        phi_q = relu_features(q, projection, eps=RELU_EPS)
        phi_k = relu_features(k, projection, eps=RELU_EPS, key_padding_mask=key_padding_mask)
    return phi_q, phi_k


def favor_bidirectional(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    segment_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Bidirectional linear attention ``phi_q (phi_k^T v) / max(phi_q . sum_L phi_k, eps)``.

    Args:
        phi_q: ``(B, H, Lq, M)`` query features.
        phi_k: ``(B, H, L, M)`` key features.
        v: ``(B, H, L, D)`` values.
        key_padding_mask: bool ``(B, L)``, True at padding (padded keys and values are zeroed).
        eps: floor of the normaliser.
        segment_ids: integer ``(B, L)``: query ``t`` sees only the keys of its own segment (a
            maximal run of equal ids). Needs ``Lq == L``.
        chunk_size: tokens per exact masked-quadratic chunk of the segmented path.

    Returns:
        ``(B, H, Lq, D)`` in the features' dtype (float32), computed with autocast off.
    """
    dt = phi_q.dtype
    lq, lk, m, d = phi_q.shape[-2], phi_k.shape[-2], phi_k.shape[-1], v.shape[-1]
    with torch.autocast(device_type=phi_q.device.type, enabled=False):
        phi_k = _zero_padded(phi_k, key_padding_mask)
        v = _zero_padded(v.to(dt), key_padding_mask)
        if segment_ids is not None:
            if lq != lk:
                raise ValueError("segment_ids need queries and keys of the same length")
            return _segmented(phi_q, phi_k, v, segment_ids, "both", eps, chunk_size)
        if lq * lk * (m + d) < (lq + lk) * m * d:
            # Short rows (L below ~M*D/(M+D), e.g. 50 tokens at M=256, D=64): the same products in
            # the other order, (phi_q phi_k^T) v, cost less than the (M, D) state of every row.
            scores = phi_q @ phi_k.transpose(-1, -2)  # (B,H,Lq,L)
            return (scores @ v) / scores.sum(dim=-1, keepdim=True).clamp_min(eps)
        kv = phi_k.transpose(-1, -2) @ v  # (B,H,M,D)
        ksum = phi_k.sum(dim=-2)  # (B,H,M)
        num = phi_q @ kv  # (B,H,Lq,D)
        den = (phi_q @ ksum.unsqueeze(-1)).clamp_min(eps)  # (B,H,Lq,1)
        return num / den


def favor_causal(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    chunk_size: int = DEFAULT_CHUNK,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Causal linear attention: ``out_t = phi_q[t] sum_{s<=t} phi_k[s] v_s^T / max(phi_q[t] sum_{s<=t} phi_k[s], eps)``.

    The normaliser rides along as an extra all-ones value column, so one chunked pass (and one
    recomputing backward) yields numerator and normaliser together. Memory O(L*(M+D)).

    Args:
        phi_q: ``(B, H, L, M)``.
        phi_k: ``(B, H, L, M)``.
        v: ``(B, H, L, D)``.
        key_padding_mask: bool ``(B, L)``, True at padding.
        eps: floor of the normaliser.
        chunk_size: tokens per exact masked-quadratic chunk.
        segment_ids: integer ``(B, L)``: the prefix restarts at each segment (a maximal run of
            equal ids), so query ``t`` sees keys ``s <= t`` of its own segment only.

    Returns:
        ``(B, H, L, D)`` in the features' dtype.
    """
    dt = phi_q.dtype
    with torch.autocast(device_type=phi_q.device.type, enabled=False):
        phi_k = _zero_padded(phi_k, key_padding_mask)
        v = _zero_padded(v.to(dt), key_padding_mask)
        if segment_ids is not None:
            return _segmented(phi_q, phi_k, v, segment_ids, "causal", eps, chunk_size)
        ones = torch.ones(*v.shape[:-1], 1, dtype=dt, device=v.device)
        nd = causal_linear_attention(phi_q, phi_k, torch.cat([v, ones], dim=-1), chunk=chunk_size)
        num, den = nd[..., :-1], nd[..., -1:]
        return num / den.clamp_min(eps)


def _segmented(phi_q, phi_k, v, segment_ids, window: str, eps: float, chunk_size: int) -> Tensor:
    """Normalised segmented linear attention (padded keys and values already zeroed); the normaliser
    rides along as an all-ones value column, as in :func:`favor_causal`. Short rows take the
    quadratic form, masked by segment equality (``L <= ~M*D/(M+D)``, like the bidirectional path)."""
    labels = segment_labels(segment_ids, phi_q.shape[-2]).to(phi_q.device)
    length, m, d = phi_q.shape[-2], phi_q.shape[-1], v.shape[-1]
    if length * (m + d) < 2 * m * d:
        allowed = labels[:, None, :, None] == labels[:, None, None, :]  # (B,1,L,L)
        if window == "causal":
            allowed = allowed.tril()
        scores = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~allowed, 0.0)  # (B,H,L,L)
        return (scores @ v) / scores.sum(dim=-1, keepdim=True).clamp_min(eps)
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    nd = segmented_linear_attention(
        phi_q, phi_k, torch.cat([v, ones], dim=-1), labels[:, None, :], window, chunk=chunk_size
    )
    num, den = nd[..., :-1], nd[..., -1:]
    return num / den.clamp_min(eps)


_TRITON_FN: Callable | None | bool = False  # False: not looked up yet; None: unavailable


def _triton_fn() -> Callable | None:
    """``favor_attention_triton`` from helper G's module, or None (import guarded, looked up once)."""
    global _TRITON_FN
    if _TRITON_FN is False:
        try:
            mod = importlib.import_module("protein_lm.attention.ops.favor_triton")
            _TRITON_FN = getattr(mod, "favor_attention_triton", None)
        except Exception:  # ImportError, missing triton, broken module: fall back to torch
            _TRITON_FN = None
    return _TRITON_FN  # type: ignore[return-value]


class FavorAttention(nn.Module):
    """FAVOR+ attention over ``(B, H, L, D)`` tensors (no input/output projections).

    Args:
        dim_head: D.
        num_features: M, random features per head (shared by all heads of the layer).
        kernel: ``"softmax"`` (positive random features) or ``"relu"`` (Performer-ReLU).
        causal: unidirectional (prefix-sum) attention.
        orthogonal: orthogonal random features; ``False`` for iid Gaussian rows.
        backend: ``"auto"`` (Triton on CUDA when ``kernels.favor_triton`` is available and accepts the
            shapes -- a ``ValueError`` from it means "unsupported" and falls back, with one warning --
            else torch), ``"torch"`` or ``"triton"`` (error if unavailable or unsupported).
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
        self._warned_fallback = False
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

    def _use_triton(self, q: Tensor) -> Callable | None:
        if self.backend == "torch":
            return None
        if self.backend == "triton":
            if not q.is_cuda:
                raise RuntimeError(
                    "FavorAttention(backend='triton') needs CUDA tensors; use 'auto' or 'torch'"
                )
            fn = _triton_fn()
            if fn is None:
                raise RuntimeError(
                    "FavorAttention(backend='triton'): protein_lm.attention.ops.favor_triton."
                    "favor_attention_triton is not importable (is triton installed?)"
                )
            return fn
        return _triton_fn() if q.is_cuda else None

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
        fn = self._use_triton(q)
        if fn is not None:
            try:
                args = (q, k, v, self.projection, self.kernel, self.causal, key_padding_mask, self.eps)
                return fn(*args, segment_ids)
            except ValueError as err:  # the kernel's way of saying "shape / config not supported"
                if self.backend == "triton":
                    raise
                if not self._warned_fallback:
                    warnings.warn(
                        f"FavorAttention: Triton kernel declined ({err}); using the PyTorch path",
                        stacklevel=2,
                    )
                    self._warned_fallback = True
        phi_q, phi_k = favor_features(q, k, self.projection, self.kernel, key_padding_mask, segment_ids)
        if self.causal:
            out = favor_causal(phi_q, phi_k, v, key_padding_mask, self.eps, self.chunk_size, segment_ids)
        else:
            out = favor_bidirectional(
                phi_q, phi_k, v, key_padding_mask, self.eps, segment_ids, self.chunk_size
            )
        return out.to(v.dtype)
