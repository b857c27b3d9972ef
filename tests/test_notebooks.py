"""The notebooks are stored without outputs and run top to bottom (tiny settings, CPU).

Equivalent to ``pytest --nbmake notebooks/``; done here with nbclient so that ``pytest`` alone (the
README's test command) covers them. The kernel gets the repository on PYTHONPATH, so the notebooks
import ``protein_lm`` even without ``pip install -e .``.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_attention_similarity.ipynb",
        "03_performance.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    import nbformat  # imported here so that `pytest -m gpu` collects on machines without Jupyter

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "a cell tagged `parameters`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PROTEIN_LM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.time()
    client.execute()
    seconds = time.time() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    if path.stem != "03_performance":  # 03 may legitimately have no results to plot yet
        assert images, f"{path.name} drew no figure"
    print(f"{path.name}: {seconds:.1f} s")
