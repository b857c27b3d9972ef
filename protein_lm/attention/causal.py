"""Re-export of :mod:`protein_lm.attention.ops.causal` (benchmark scripts import this path)."""

from protein_lm.attention.ops.causal import *  # noqa: F401,F403
from protein_lm.attention.ops.causal import DEFAULT_BLOCK_BYTES_CUDA, DEFAULT_CHUNK  # noqa: F401
