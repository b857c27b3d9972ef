"""Alias of :mod:`protein_lm.attention.ops.favor_triton` (the same module object, so attributes set
here -- e.g. by a benchmark -- reach the kernels). Benchmark scripts import this path."""

import sys

from protein_lm.attention.ops import favor_triton as _kernels

sys.modules[__name__] = _kernels
