"""The files shipped for trying the toolkit: configs, the Swiss-Prot sample, the trained model.

In a source checkout (or an editable install) they sit at the repository root; a normal
``pip install`` puts copies under ``<prefix>/share/protein-lm/`` (``[tool.setuptools.data-files]``
in pyproject.toml). ``protein-lm init-example DIR`` copies them into a working directory, where
the shipped configs' relative paths (``data/...``, ``checkpoints/...``, resolved against the
working directory) then work as written.
"""

from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

from protein_lm.errors import UserError

#: (folder, file patterns) copied by ``init-example``; pyproject.toml's data-files list the same.
EXAMPLE_FILES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("configs", ("*.yaml",)),
    ("configs/base", ("*.yaml",)),  # what the configs extend
    ("data", ("swissprot_sample.fasta.gz", "README.md")),
    ("checkpoints", ("*.pt", "README.md")),
)
_MARKER = Path("configs") / "quickstart.yaml"


def candidate_roots() -> list[Path]:
    """Where the example files may be: the source tree, then the install prefixes' share folders."""
    roots = [Path(__file__).resolve().parents[1]]
    for base in (sysconfig.get_path("data"), sys.prefix, site.USER_BASE):
        if base:
            roots.append(Path(base) / "share" / "protein-lm")
    return roots


def example_root() -> Path:
    """The first candidate folder that holds the example files.

    Raises:
        UserError: none found (an install without its data files).
    """
    for root in candidate_roots():
        if (root / _MARKER).is_file():
            return root
    raise UserError("the example files (configs, sample data, checkpoint) are not installed; looked in "
                    + ", ".join(str(r) for r in candidate_roots()))


def example_files(root: Path) -> list[Path]:
    """Paths (relative to ``root``) of the example files present there."""
    found = []
    for folder, patterns in EXAMPLE_FILES:
        for pattern in patterns:
            found += sorted(p.relative_to(root) for p in (root / folder).glob(pattern) if p.is_file())
    return found
