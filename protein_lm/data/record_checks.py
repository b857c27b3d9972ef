"""Records that are valid FASTA but probably not what the user meant: counted per input file.

* **nucleotide sequences**: every residue in ``A C G T U N`` — all letters of the protein
  alphabet too, so they tokenise without complaint, and a DNA file given by mistake would train or
  score a model on nonsense. Records shorter than :data:`MIN_NUCLEOTIDE_LENGTH` are not counted: a
  short peptide such as ``GAG`` may well be made of these letters alone;
* **duplicate record ids** (a later record with the id of an earlier one) and **empty ids** (a bare
  ``>``): outputs keyed by id become ambiguous.

These records are kept (they are not errors); ``prepare`` warns once per file with the count and
records the counts in the manifest's ``inputs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from protein_lm.data.tokenizer import BYTE_TO_ID

MIN_NUCLEOTIDE_LENGTH = 20
_NUCLEOTIDE = np.zeros(256, dtype=bool)
_NUCLEOTIDE[[int(BYTE_TO_ID[ord(c)]) for c in "ACGTUN"]] = True


class RecordAudit:
    """Counts over the :class:`protein_lm.data.fasta.TokenBlock` s of one file, fed in order."""

    def __init__(self) -> None:
        self.nucleotide = 0
        self.first_nucleotide: str | None = None
        self.empty_ids = 0
        self._id_hashes: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, ids: bytes) -> None:
        names = ids.split(b"\n")[:-1]
        self.empty_ids += names.count(b"")
        self._id_hashes.append(np.fromiter((hash(n) for n in names), dtype=np.int64, count=len(names)))
        if lengths.size == 0:
            return
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        protein_like = np.add.reduceat((~_NUCLEOTIDE[tokens]).astype(np.int64), starts)
        suspects = np.flatnonzero((protein_like == 0) & (lengths >= MIN_NUCLEOTIDE_LENGTH))
        if suspects.size:
            self.nucleotide += int(suspects.size)
            if self.first_nucleotide is None:
                self.first_nucleotide = names[int(suspects[0])].decode("utf-8", "replace")

    def counts(self) -> dict[str, Any]:
        """``nucleotide_records``, ``duplicate_ids`` and ``empty_ids`` (for the manifest)."""
        hashes = np.concatenate(self._id_hashes) if self._id_hashes else np.zeros(0, np.int64)
        duplicates = int(hashes.size - np.unique(hashes).size)  # 64-bit hashes: collisions ~never
        return {"nucleotide_records": self.nucleotide, "duplicate_ids": duplicates, "empty_ids": self.empty_ids,
                "first_nucleotide_record": self.first_nucleotide}


def warnings_for(input_info: dict[str, Any]) -> list[str]:
    """One message per kind of suspect record in one input (empty when there are none)."""
    path, out = input_info["path"], []
    n = input_info.get("nucleotide_records", 0)
    if n:
        out.append(f"{path}: {n:,} records look like nucleotide sequences (only A/C/G/T/U/N, "
                   f"first {input_info.get('first_nucleotide_record')!r}); they are kept as protein: "
                   "is this the right file?")
    dup = input_info.get("duplicate_ids", 0)
    if dup:
        out.append(f"{path}: {dup:,} records repeat the id of an earlier record; outputs keyed by id "
                   "will hold several entries for it")
    empty = input_info.get("empty_ids", 0)
    if empty:
        out.append(f"{path}: {empty:,} records have an empty id (a bare '>')")
    return out
