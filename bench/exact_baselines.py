"""Exact-attention baselines as a user gets them, and which SDPA backend actually ran.

``scaled_dot_product_attention`` picks a backend (cuDNN, FlashAttention-2, memory-efficient, math)
per call from the shapes, dtype, mask and GPU. A benchmark that forces one backend can be slower
than what a user gets by default, so every exact baseline here is timed with the default choice,
and the backend that ran is read off the CUDA kernel names (the profiler), not assumed.

FlexAttention (``torch.nn.attention.flex_attention``, compiled once) is the other fast exact option,
and the one that handles document (packed-sequence) masks without a dense L x L mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Ordered: cuDNN's kernel names also contain "flash" (e.g. ``cudnn_..._sm90_flash_fprop``).
_BACKEND_PATTERNS = (
    ("cudnn", ("cudnn",)),
    ("flash", ("flash",)),
    ("efficient", ("fmha", "efficient", "mem_eff")),
)


def classify_kernels(names: list[str]) -> str:
    """The SDPA backend a list of CUDA kernel names points to (``math`` when no fused kernel ran)."""
    lowered = [n.lower() for n in names]
    for backend, patterns in _BACKEND_PATTERNS:
        if any(p in n for n in lowered for p in patterns):
            return backend
    return "math"


def kernels_run(fn: Callable[[], object]) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` launches (a profiler pass, after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def sdpa_backend_ran(fn: Callable[[], object]) -> str:
    """Which SDPA backend ``fn`` (forward, or forward+backward) used."""
    return classify_kernels(kernels_run(fn))


def sdpa_default(causal: bool) -> Callable[..., Tensor]:
    """``F.scaled_dot_product_attention`` with its default backend choice (what a user gets)."""

    def fn(q: Tensor, k: Tensor, v: Tensor, proj: Tensor | None = None) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def sdpa_forced(backend: str, causal: bool) -> Callable[..., Tensor]:
    """SDPA restricted to one backend (``flash``, ``cudnn`` or ``efficient``), for comparison."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend]

    def fn(q: Tensor, k: Tensor, v: Tensor, proj: Tensor | None = None) -> Tensor:
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


_FLEX: Callable | None = None


def compiled_flex() -> Callable:
    """``flex_attention`` compiled once per process (uncompiled it materialises the scores).

    Each new shape or mask recompiles; past ``torch._dynamo.config.recompile_limit`` the call runs the
    unfused reference instead, so a benchmark of many shapes resets Dynamo between them.
    """
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex(causal: bool) -> Callable[..., Tensor]:
    """FlexAttention: no mask (bidirectional) or a causal block mask, built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    masks: dict[tuple, object] = {}

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def fn(q: Tensor, k: Tensor, v: Tensor, proj: Tensor | None = None) -> Tensor:
        block_mask = None
        if causal:
            key = (q.shape[-2], q.device)
            if key not in masks:
                masks[key] = create_block_mask(causal_mask, None, None, q.shape[-2], q.shape[-2], device=q.device)
            block_mask = masks[key]
        return compiled_flex()(q, k, v, block_mask=block_mask)

    return fn


def flex_documents(segment_ids: Tensor, causal: bool) -> tuple[Callable[..., Tensor], object]:
    """FlexAttention restricted to same-segment pairs of ``segment_ids (B, L)`` (a packed batch).

    Returns the attention function and its block mask (built once; its cost is part of a real step).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids

    def same_document(b, h, q_idx, kv_idx):
        same = seg[b, q_idx] == seg[b, kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    b, length = seg.shape
    block_mask = create_block_mask(same_document, b, None, length, length, device=seg.device)

    def fn(q: Tensor, k: Tensor, v: Tensor, proj: Tensor | None = None) -> Tensor:
        return compiled_flex()(q, k, v, block_mask=block_mask)

    return fn, block_mask
