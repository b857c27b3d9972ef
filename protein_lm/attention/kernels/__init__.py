"""Old home of the Triton kernels, kept because benchmark scripts import it; see :mod:`protein_lm.attention.ops`."""
