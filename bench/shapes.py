"""The attention-op shape the kernel tools share: B*L tokens, heads, d, m, one length."""

from __future__ import annotations

import argparse


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """--length, --tokens (B = tokens // length), --heads, --dim, --features."""
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--features", type=int, default=256)


def record_launches(module) -> dict:
    """Route the Triton module's launches (``module._launch``) through a recorder that keeps each
    kernel's last compiled launch, for :func:`compile_report`; returns the record (clear it per case)."""
    launches = getattr(module, "_bench_launches", None)
    if launches is None:
        launches = {}

        def launch(name, kernel, grid, *args, **kwargs):
            launches[name] = kernel[(grid,)](*args, **kwargs)

        module._launch = launch
        module._bench_launches = launches
    return launches


def compile_report(module) -> dict[str, list[int]]:
    """Registers and spilled values per thread of each kernel the Triton module last launched."""
    return {
        name: [int(getattr(kernel, "n_regs", -1)), int(getattr(kernel, "n_spills", -1))]
        for name, kernel in record_launches(module).items()
    }
