"""Random projections and random feature maps for FAVOR+ (Choromanski et al., ICLR 2021).

Two kernels:

* softmax (positive random features): ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M)`` with
  ``x' = x * D**-0.25``, so that ``E_W[phi(q) . phi(k)] = exp(q . k / sqrt(D))`` for ``W`` with
  N(0, I) rows;
* relu (Performer-ReLU "generalized attention"): ``phi(x) = relu(W x) + 1e-3``.

The softmax map is numerically stabilised by shifts that cancel exactly in FAVOR+'s ratio
``phi(q) (phi(K)^T V) / phi(q) (phi(K)^T 1)`` (see docs/architecture.md, "Softmax-kernel numerics"):
a per-query shift (each query's own max over features) and one shared key shift per
``(batch, head)`` (the max over all *real* keys and features; padding never enters it), or per
``(batch, head, segment)`` for packed rows.

Feature maps always compute in at least float32, with autocast disabled, because ``exp`` of a bf16
logit loses ~3 significant digits and the normaliser sums up to 65k such terms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .segments import segment_amax, segment_labels

__all__ = ["draw_projection", "softmax_features", "relu_features", "feature_dtype", "RELU_EPS"]

RELU_EPS = 1e-3


def feature_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype feature maps and normalisers compute in: float32, or float64 if given float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def draw_projection(
    num_features: int,
    dim: int,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw a FAVOR+ projection matrix ``W`` of shape ``(num_features, dim)``.

    ``orthogonal=True`` (the paper's default): stack ``ceil(M / D)`` independent ``D x D`` blocks
    whose rows are orthonormal (Haar-distributed, via QR of a Gaussian matrix with the sign fix
    ``Q * sign(diag(R))``), truncate to ``M`` rows, and rescale each row by an independent
    chi(D)-distributed norm (the norm of a fresh ``N(0, I_D)`` vector). Every row is then marginally
    ``N(0, I_D)`` -- so each feature stays unbiased -- while rows within a block are exactly
    orthogonal, which lowers the estimator's variance. ``orthogonal=False``: iid ``N(0, I_D)`` rows.

    The draw happens in float64 on the CPU with ``generator`` (so a seed gives the same matrix on
    every device) and is then cast to ``dtype`` / moved to ``device``.

    Args:
        num_features: M, the number of random features.
        dim: D, the head dimension.
        orthogonal: orthogonal random features (ORF) instead of iid Gaussian rows.
        generator: a CPU ``torch.Generator``; ``None`` uses the global RNG.
        dtype: dtype of the returned matrix.
        device: device of the returned matrix.

    Returns:
        ``(M, D)`` tensor.
    """
    if num_features < 1 or dim < 1:
        raise ValueError(f"num_features and dim must be positive, got {num_features}, {dim}")
    kw = {"generator": generator, "dtype": torch.float64}
    if not orthogonal:
        w = torch.randn(num_features, dim, **kw)
    else:
        num_blocks = math.ceil(num_features / dim)
        gauss = torch.randn(num_blocks, dim, dim, **kw)
        q, r = torch.linalg.qr(gauss)  # (nb, D, D); columns of q orthonormal
        # Sign fix makes q Haar-distributed (QR alone is biased towards diag(R) > 0).
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        rows = q.transpose(-1, -2).reshape(num_blocks * dim, dim)[:num_features]  # orthonormal rows
        norms = torch.randn(num_features, dim, **kw).norm(dim=-1, keepdim=True)  # chi(D)
        w = rows * norms
    return w.to(dtype=dtype, device=device)


def _as_bool_mask(key_padding_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """``(B, L)`` padding mask -> ``(B, 1, L, 1)`` broadcastable against ``(B, H, L, M)``."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True at padding), got {key_padding_mask.dtype}")
    b, length = x.shape[0], x.shape[-2]
    if key_padding_mask.shape != (b, length):
        raise ValueError(f"key_padding_mask shape {tuple(key_padding_mask.shape)} != (B, L) = {(b, length)}")
    return key_padding_mask[:, None, :, None]


def _feature_input(x: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``x`` in the feature dtype with padded rows zeroed (so inf/NaN there cannot leak into sums),
    and the ``(B, 1, L, 1)`` mask (or None). Shared first step of every feature map."""
    mask = _as_bool_mask(key_padding_mask, x)
    x = x.to(feature_dtype(x.dtype))
    if mask is not None:
        x = x.masked_fill(mask, 0.0)
    return x, mask


def softmax_features(
    x: Tensor,
    projection: Tensor,
    is_query: bool,
    key_padding_mask: Tensor | None = None,
    stabilize: bool = True,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Positive random features of the softmax kernel: ``(B, H, L, D) -> (B, H, L, M)``.

    Args:
        x: queries or keys, ``(B, H, L, D)`` (any float dtype).
        projection: ``(M, D)`` from :func:`draw_projection`.
        is_query: queries get a per-row shift (max over features); keys get one shared shift per
            ``(batch, head)`` (max over real keys and features). Both cancel in FAVOR+'s ratio.
        key_padding_mask: bool ``(B, L)``, True at padding. Padded keys get ``phi = 0`` and never
            enter the key shift; padded inputs are zeroed first so inf/NaN there cannot leak.
        stabilize: ``False`` returns the unshifted map ``exp(W x' - |x'|^2/2) / sqrt(M)`` (whose
            dot products are the unbiased estimate of ``exp(q.k/sqrt(D))``); for tests and analysis.
        segment_ids: integer ``(B, L)`` (packed rows, see :mod:`protein_lm.attention.ops.segments`):
            keys get one shift per ``(batch, head, segment)`` instead. A key shift only has to be
            shared by the keys one query sees; a row-wide one would underflow to a zero normaliser
            every segment whose keys sit ~87 nats below the row's largest.

    Returns:
        ``(B, H, L, M)`` features in float32 (float64 for float64 input).
    """
    x, mask = _feature_input(x, key_padding_mask)
    dt = x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        d = x.shape[-1]
        log_scale = 0.5 * math.log(projection.shape[0])  # the 1/sqrt(M) factor, folded into the exponent
        x = x * d**-0.25
        # In-place ops below avoid (B,H,L,M)-sized temporaries (each costs allocation + page faults
        # on CPU); none of them overwrites a tensor that autograd saved.
        z = x @ projection.to(dt).transpose(0, 1)  # (B,H,L,M): u = W x'
        if stabilize and is_query:
            # h = -|x'|^2/2 is constant over features, so it cancels in the per-query shift.
            shift = z.detach().amax(dim=-1, keepdim=True)  # (B,H,L,1)
            return z.sub_(shift + log_scale).exp_()
        z = z.sub_(0.5 * (x * x).sum(-1, keepdim=True))  # u + h
        if stabilize and not is_query:
            row_max = z.detach().amax(dim=-1, keepdim=True)  # (B,H,L,1)
            if mask is not None:
                row_max = row_max.masked_fill(mask, -math.inf)
            if segment_ids is None:
                shift = row_max.amax(dim=-2, keepdim=True)  # (B,H,1,1): one shift over real keys
            else:  # (B,H,L,1): the max over the real keys of each position's segment
                labels = segment_labels(segment_ids, x.shape[-2]).to(x.device)
                shift = segment_amax(row_max[..., 0], labels)[..., None]
            # A (batch, head) or segment whose keys are all padding: any finite shift will do.
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            z = z.sub_(shift)  # shifts cancel in the ratio, so no gradient through them
        if mask is not None and not is_query:
            z = z.masked_fill_(mask, -math.inf)  # exp -> exactly 0 for padded keys
        phi = z.sub_(log_scale).exp_()
    return phi


def relu_features(
    x: Tensor,
    projection: Tensor,
    eps: float = RELU_EPS,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Performer-ReLU features ``relu(x @ W^T) + eps``: ``(B, H, L, D) -> (B, H, L, M)``.

    No ``D**-0.25`` scaling and no ``1/sqrt(M)`` factor (both cancel in the ratio). ``eps`` keeps
    every query/key pair's kernel value positive, so no normaliser is ever zero.

    Args:
        x: ``(B, H, L, D)``.
        projection: ``(M, D)``.
        eps: additive floor of each feature (the paper's 1e-3).
        key_padding_mask: bool ``(B, L)``, True at padding; padded rows get ``phi = 0`` (pass it
            for keys only).

    Returns:
        ``(B, H, L, M)`` features in float32 (float64 for float64 input).
    """
    x, mask = _feature_input(x, key_padding_mask)
    with torch.autocast(device_type=x.device.type, enabled=False):
        phi = torch.relu(x @ projection.to(x.dtype).transpose(0, 1)) + eps
        if mask is not None:
            phi = phi.masked_fill(mask, 0.0)
    return phi
