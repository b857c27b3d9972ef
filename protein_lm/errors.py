"""Errors a person can act on.

The CLI prints a :class:`UserError` as one line (no traceback) and exits with 2.
Messages name the file, the record and the line where that applies.
"""


class UserError(Exception):
    """Bad input or a bad request that the user can fix."""


class FastaFormatError(UserError):
    """A FASTA file is malformed; the message names file, record and line."""


class OldConfigNames(FutureWarning):
    """A config or checkpoint names the FAIR options the flat way of older versions (still read).

    The command line prints it as one ``protein-lm:`` line (:func:`protein_lm.cli.main`)."""
