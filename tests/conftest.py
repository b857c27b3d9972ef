"""Shared pytest fixtures and the `gpu` marker policy."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def _private_token_cache(tmp_path_factory):
    """Token caches of this run go to a temp folder, not ~/.cache: runs never share or leak state.

    Set in os.environ so the CLI subprocesses that tests start inherit it too."""
    old = os.environ.get("PROTEIN_LM_CACHE")
    os.environ["PROTEIN_LM_CACHE"] = str(tmp_path_factory.mktemp("protein_lm_cache"))
    yield
    if old is None:
        os.environ.pop("PROTEIN_LM_CACHE", None)
    else:
        os.environ["PROTEIN_LM_CACHE"] = old


@pytest.fixture(scope="session")
def sample_fasta() -> Path:
    """The small real Swiss-Prot sample shipped in data/."""
    assert SAMPLE_FASTA.exists(), f"missing {SAMPLE_FASTA}"
    return SAMPLE_FASTA
