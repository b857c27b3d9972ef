"""Re-export of :mod:`protein_lm.attention.ops.exact_segments` (the packing tests import this path)."""

from protein_lm.attention.ops.exact_segments import *  # noqa: F401,F403
