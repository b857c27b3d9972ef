"""Re-export of the FAVOR+ functions (:mod:`protein_lm.attention.ops.favor`) and module
(:mod:`protein_lm.attention.modules.favor`); benchmark scripts import this path."""

from protein_lm.attention.modules.favor import FavorAttention  # noqa: F401
from protein_lm.attention.ops.favor import *  # noqa: F401,F403
from protein_lm.attention.ops.favor import DEFAULT_EPS  # noqa: F401
