"""protein_lm: protein language models with Performer (FAVOR+) linear attention.

Heavy modules (torch, Lightning) are imported lazily by the submodules that need
them, so `protein-lm --help` and `protein-lm prepare` start fast. The data pipeline is
:mod:`protein_lm.data`; its modules' old top-level paths still import (:mod:`protein_lm._moved`).
"""

__version__ = "0.1.0"

from protein_lm._moved import install as _install_moved_paths  # noqa: E402

_install_moved_paths()
