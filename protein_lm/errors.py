"""Errors a person can act on.

The CLI prints a :class:`UserError` as one line (no traceback) and exits with 2.
Messages name the file, the record and the line where that applies.
"""


class UserError(Exception):
    """Bad input or a bad request that the user can fix."""


class FastaFormatError(UserError):
    """A FASTA file is malformed; the message names file, record and line."""
