"""init-example: the shipped configs, sample and model reach a working directory; pyproject ships the same files."""

from __future__ import annotations

import tomllib

from protein_lm.cli import main
from protein_lm.examples import EXAMPLE_FILES, example_files
from tests.conftest import REPO


def test_copies_the_shipped_files_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "example"
    assert main(["init-example", str(out)]) == 0
    copied = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    shipped = sorted(example_files(REPO))
    assert copied == shipped
    assert {"configs/quickstart.yaml", "configs/finetune_shipped.yaml", "configs/base/cpu_tiny.yaml",
            "data/swissprot_sample.fasta.gz",
            "checkpoints/performer-softmax-bid-swissprot2014.pt"} <= {str(p) for p in copied}
    for rel in copied:
        assert (out / rel).read_bytes() == (REPO / rel).read_bytes()
    assert main(["init-example", str(out)]) == 2  # never copies over an earlier directory
    assert "not an empty directory" in capsys.readouterr().err


def test_pyproject_installs_what_init_example_copies():
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    want = {f"share/protein-lm/{folder}": [f"{folder}/{p}" for p in patterns] for folder, patterns in EXAMPLE_FILES}
    assert data_files == want
