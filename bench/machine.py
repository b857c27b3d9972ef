"""What machine a benchmark ran on (every published number names it), and what its fast paths do."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_triton_backend() -> dict[str, str]:
    """Pick the FAVOR+ backend per (kernel, causal): Triton if it agrees with the PyTorch path on a
    random batch (forward and input gradients within 5%; "auto" then picks it on CUDA), else the
    PyTorch path. Cheap insurance
    against spending a GPU call on a broken fast path."""
    import torch

    from protein_lm.attention import FavorAttention

    choice = {}
    for kernel in ("softmax", "relu"):
        for causal in (False, True):
            key = f"{kernel}-{'causal' if causal else 'bid'}"
            try:
                torch.manual_seed(0)
                q, k, v = (torch.randn(2, 4, 777, 64, device="cuda", requires_grad=True) for _ in range(3))
                mask = torch.zeros(2, 777, dtype=torch.bool, device="cuda")
                mask[1, 700:] = True
                outs = {}
                for backend in ("torch", "triton"):
                    attn = FavorAttention(64, 256, kernel=kernel, causal=causal, backend=backend, seed=1).cuda()
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = attn(q, k, v, key_padding_mask=mask)
                    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
                    outs[backend] = (out.float(), *grads)
                err = max(((a - b).norm() / b.norm()).item() for a, b in zip(outs["triton"], outs["torch"], strict=True))
                choice[key] = "auto" if err < 0.05 else "torch"  # auto = Triton on CUDA
                print(f"[runs] backend check {key}: max rel err {err:.4f} -> {choice[key]}", flush=True)
            except Exception as exc:  # any failure of the fast path: use the reference path
                choice[key] = "torch"
                print(f"[runs] backend check {key}: {type(exc).__name__}: {exc} -> torch", flush=True)
    return choice
