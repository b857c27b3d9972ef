"""protein_lm: protein language models with Performer (FAVOR+) linear attention.

Heavy modules (torch, Lightning) are imported lazily by the submodules that need
them, so `protein-lm --help` and `protein-lm prepare` start fast.
"""

__version__ = "0.1.0"
