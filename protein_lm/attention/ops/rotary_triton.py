"""Fused qkv split + rotary position embedding: one Triton pass forward, one backward.

``(B, L, 3*H*D)`` output of the qkv projection -> ``q, k`` rotated and ``v``, each ``(B, H, L, D)``
contiguous (the layout the attention kernels read). Eager PyTorch spends about ten elementwise passes
per tensor on this (the view/permute, a float32 round trip, four products, two sums, a concatenation,
the cast back, and as many again in backward); here each element is read and written once per
direction. Same numbers as :func:`protein_lm.model._rotate`: float32 arithmetic on the same
``cos``/``sin`` tables, each product rounded before the sum (no FMA contraction, as in eager
PyTorch), rounded once to the input dtype.

Rotation of the halves ``(x1, x2) = (x[..., :D/2], x[..., D/2:])`` by the angle table:
``(x1 c - x2 s, x1 s + x2 c)``; its gradient is the inverse rotation ``(g1 c + g2 s, -g1 s + g2 c)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["rotary_split", "rotary_split_supported"]

ROWS = 64  # positions per program


@triton.jit
def _rotary_split_kernel(
    QKV,
    COS,
    SIN,
    Q,
    K,
    V,
    L,
    H: tl.constexpr,
    HALF: tl.constexpr,
    R: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Forward: QKV (B, L, 3, H, D) -> Q, K rotated, V copied, each (B, H, L, D).
    Backward: the same index map read the other way, rotating by the negative angle."""
    D: tl.constexpr = 2 * HALF
    pid = tl.program_id(0)
    h = pid % H
    rest = pid // H
    n_blk = tl.cdiv(L, R)
    b = rest // n_blk
    pos = (rest % n_blk) * R + tl.arange(0, R)  # (R,)
    inb = (pos < L)[:, None]
    cols = tl.arange(0, HALF)[None, :]  # (1, HALF)
    cs_off = pos[:, None] * HALF + cols
    c = tl.load(COS + cs_off, mask=inb, other=0.0)  # (R, HALF) float32
    s = tl.load(SIN + cs_off, mask=inb, other=0.0)
    if BACKWARD:
        s = -s
    # element offsets of a (R, HALF) half-tile in each layout
    packed = ((b * L + pos.to(tl.int64)) * 3 * H + h)[:, None] * D + cols  # + part * H * D
    heads = ((b * H + h) * L + pos.to(tl.int64))[:, None] * D + cols
    for part in tl.static_range(3):
        src_base = QKV + part * H * D
        if part == 0:
            dst = Q
        elif part == 1:
            dst = K
        else:
            dst = V
        if BACKWARD:  # read the (B, H, L, D) gradient, write the packed one
            x1 = tl.load(dst + heads, mask=inb, other=0.0).to(tl.float32)
            x2 = tl.load(dst + heads + HALF, mask=inb, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(src_base + packed, mask=inb, other=0.0).to(tl.float32)
            x2 = tl.load(src_base + packed + HALF, mask=inb, other=0.0).to(tl.float32)
        if part < 2:  # q and k rotate; v only changes layout
            y1 = x1 * c - x2 * s
            y2 = x1 * s + x2 * c
        else:
            y1 = x1
            y2 = x2
        if BACKWARD:
            tl.store(src_base + packed, y1.to(QKV.dtype.element_ty), mask=inb)
            tl.store(src_base + packed + HALF, y2.to(QKV.dtype.element_ty), mask=inb)
        else:
            tl.store(dst + heads, y1.to(dst.dtype.element_ty), mask=inb)
            tl.store(dst + heads + HALF, y2.to(dst.dtype.element_ty), mask=inb)


def _launch(qkv: Tensor, cos: Tensor, sin: Tensor, q: Tensor, k: Tensor, v: Tensor, backward: bool) -> None:
    b, heads, length, d = q.shape
    grid = (b * triton.cdiv(length, ROWS) * heads,)
    _rotary_split_kernel[grid](
        qkv,
        cos,
        sin,
        q,
        k,
        v,
        length,
        H=heads,
        HALF=d // 2,
        R=ROWS,
        BACKWARD=backward,
        num_warps=4,
        enable_fp_fusion=False,  # x1*c - x2*s rounded like eager PyTorch: bitwise the same results
    )


class _RotarySplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, heads: int):  # type: ignore[override]
        b, length, width = qkv.shape
        d = width // (3 * heads)
        q, k, v = (torch.empty(b, heads, length, d, device=qkv.device, dtype=qkv.dtype) for _ in range(3))
        _launch(qkv, cos, sin, q, k, v, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.dtype = qkv.shape, qkv.dtype
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):  # type: ignore[override]
        # autograd materialises missing gradients as zeros; they may arrive non-contiguous
        cos, sin = ctx.saved_tensors
        grads = [g.to(ctx.dtype).contiguous() for g in (dq, dk, dv)]
        dqkv = torch.empty(ctx.shape, device=dq.device, dtype=ctx.dtype)
        _launch(dqkv, cos, sin, *grads, backward=True)
        return dqkv, None, None, None


def rotary_split_supported(qkv: Tensor, head_dim: int) -> bool:
    """Whether the model should use :func:`rotary_split`: CUDA, bf16 / fp16 / fp32 (the kernel computes
    in float32, so float64 keeps the PyTorch path), an even power-of-two head dimension, eager mode
    (under ``torch.compile`` Inductor fuses the PyTorch code itself)."""
    return (
        qkv.is_cuda
        and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and head_dim >= 2
        and not head_dim & (head_dim - 1)
        and not torch.compiler.is_compiling()
    )


def rotary_split(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, L, 3*H*D)`` -> ``q, k, v`` ``(B, H, L, D)`` with rotary positions applied to ``q`` and ``k``.

    Args:
        qkv: the qkv projection output, ``[q | k | v]`` along the last dim, each ``(H, D)`` head-major.
        cos, sin: ``(L, D/2)`` float32 angle tables (:meth:`protein_lm.model.RotaryEmbedding.tables`).
        heads: number of heads ``H``.
    """
    b, length, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"qkv width {width} is not 3 * heads ({heads}) * head_dim")
    d = width // (3 * heads)
    if cos.shape != (length, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be (L, D/2) = ({length}, {d // 2}), got {tuple(cos.shape)}")
    return _RotarySplit.apply(qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous(), heads)
