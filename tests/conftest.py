"""Shared pytest fixtures and the `gpu` marker policy."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_FASTA = REPO / "data" / "swissprot_sample.fasta.gz"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when CUDA is absent (CI has no GPU)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_fasta() -> Path:
    """The small real Swiss-Prot sample shipped in data/."""
    assert SAMPLE_FASTA.exists(), f"missing {SAMPLE_FASTA}"
    return SAMPLE_FASTA
