"""Reading prepared data: the token cache (:class:`TokenCache`) and FASTA records by id.

Layout of a cache directory (docs/architecture.md, docs/data.md; written by
:mod:`protein_lm.data.cache`)::

    tokens.u8      uint8 residue ids (4..30) of all kept sequences, concatenated, no specials
    offsets.npy    int64, num_sequences + 1; sequence i is tokens[offsets[i]:offsets[i+1]]
    ids.txt        one record id per line
    manifest.json  written last: its presence means the cache is complete
    hashes.npy     uint64, num_sequences: each sequence's split hash (splits.content_hashes)
    hashes.json    what hashes.npy belongs to: hash scheme, num_sequences, the manifest's
                   content fingerprint and a digest of hashes.npy (see TokenCache.content_hashes)

The split hashes are optional files: ``prepare`` writes them (hashing each block while it streams),
and a cache made without them gets them on its first :meth:`TokenCache.content_hashes` call.

The commands that read FASTA records directly (``analyze``, ``spans``, ``embed``, ``score``,
``probe``) use :func:`read_sequences` and :func:`read_proteins`. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protein_lm.data.fasta import read_fasta
from protein_lm.data.splits import HASH_SCHEME, content_hashes
from protein_lm.errors import UserError
from protein_lm.io import write_file, write_text

FORMAT = "protein_lm.token_cache"
VERSION = 1
TOKENS_FILE = "tokens.u8"
OFFSETS_FILE = "offsets.npy"
IDS_FILE = "ids.txt"
MANIFEST_FILE = "manifest.json"
HASHES_FILE = "hashes.npy"
HASHES_META_FILE = "hashes.json"
CACHE_FILES = (TOKENS_FILE, OFFSETS_FILE, IDS_FILE, MANIFEST_FILE)  # a complete cache has all of these
OPTIONAL_FILES = (HASHES_FILE, HASHES_META_FILE)  # derived; (re)made on first use when missing or stale
_HASH_SPOT_CHECKS = 16  # sequences re-hashed when loading hashes.npy (catches a cache edited by hand)
_CHECK_CHUNK = 1 << 22  # offsets read per chunk when checking a cache


class TokenCache:
    """Read-only view of a prepared token cache (memory-mapped; cheap to open and pickle).

    Example::

        cache = TokenCache("data/cache")
        len(cache), cache.sequence(0), cache.record_id(0), cache.lengths[:5]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise UserError(
                f"{self.path}: not a complete token cache (no {MANIFEST_FILE}); "
                "run `protein-lm prepare FASTA --out DIR`"
            )
        manifest = _read_manifest(self.path)
        if manifest is None:
            raise UserError(_damaged_message(self.path, None, f"{MANIFEST_FILE} is not valid JSON"))
        self.manifest: dict[str, Any] = manifest
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise UserError(
                f"{self.path}: unsupported cache format {self.manifest.get('format')!r} "
                f"version {self.manifest.get('version')!r} (expected {FORMAT!r} v{VERSION}); "
                "re-run `protein-lm prepare`"
            )
        damage = cache_damage(self.path, self.manifest)
        if damage:
            raise UserError(_damaged_message(self.path, self.manifest, damage))
        self._open()

    def _open(self) -> None:
        self.offsets: np.ndarray = np.load(self.path / OFFSETS_FILE, mmap_mode="r")
        n_tok = int(self.offsets[-1])
        if n_tok:
            self.tokens: np.ndarray = np.memmap(
                self.path / TOKENS_FILE, dtype=np.uint8, mode="r", shape=(n_tok,)
            )
        else:  # numpy cannot memory-map an empty file
            self.tokens = np.zeros(0, dtype=np.uint8)
        self._lengths: np.ndarray | None = None
        self._hashes: np.ndarray | None = None
        self._id_starts: np.ndarray | None = None
        self._ids: np.ndarray | None = None

    # Pickle by path: DataLoader workers re-open the memmaps instead of copying them.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.manifest = state["manifest"]
        self._open()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r}, sequences={len(self)}, residues={self.num_residues})"

    @property
    def num_residues(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """``int64`` length of every sequence (computed once)."""
        if self._lengths is None:
            self._lengths = np.diff(np.asarray(self.offsets))
        return self._lengths

    def content_hashes(self) -> np.ndarray:
        """``uint64`` split hash of every sequence (:func:`protein_lm.data.splits.content_hashes`).

        Hashing a large corpus costs minutes, and every ``setup`` (each DDP rank, each resume) needs
        the hashes, so they are kept in ``hashes.npy``. They are used only if ``hashes.json`` says they
        were made with today's hash scheme for this very cache (its manifest fingerprint), the file
        is intact (length, dtype, digest) and a few re-hashed sequences agree; otherwise they are
        recomputed and saved atomically (:func:`protein_lm.io.write_file`: concurrent ranks each write
        the same bytes, the last rename wins). A read-only or full disk only costs the recomputation.
        """
        if self._hashes is None:
            hashes = self._load_hashes()
            if hashes is None:
                hashes = content_hashes(self.tokens, self.offsets)
                self._save_hashes(hashes)
            self._hashes = hashes
        return self._hashes

    def _load_hashes(self) -> np.ndarray | None:
        """The stored hashes if they provably belong to this cache, else ``None``."""
        try:
            meta = json.loads((self.path / HASHES_META_FILE).read_text())
            # memory-mapped: ranks and workers share the page cache instead of a copy each
            hashes = np.load(self.path / HASHES_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):  # missing, unreadable, garbage
            return None
        n = len(self)
        if (
            not isinstance(meta, dict)
            or hashes.dtype != np.dtype("<u8")
            or hashes.shape != (n,)
            or meta != hashes_meta(self.manifest, hashes)
        ):
            return None
        offs = self.offsets
        for i in np.unique(np.linspace(0, n - 1, min(n, _HASH_SPOT_CHECKS)).astype(np.int64)).tolist():
            a, b = int(offs[i]), int(offs[i + 1])
            if content_hashes(self.tokens[a:b], np.array([0, b - a]))[0] != hashes[i]:
                return None
        return hashes

    def _save_hashes(self, hashes: np.ndarray) -> None:
        try:
            def save(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.save(fh, hashes, allow_pickle=False)

            write_file(self.path / HASHES_FILE, save)
            write_text(self.path / HASHES_META_FILE, json.dumps(hashes_meta(self.manifest, hashes), indent=2) + "\n")
        except OSError as err:
            warnings.warn(
                f"{self.path}: cannot save the sequence hashes ({err.strerror or err}); "
                "they are recomputed (in memory) every time this cache is opened",
                stacklevel=3,
            )

    def sequence(self, i: int) -> np.ndarray:
        """Residue token ids of sequence ``i`` (a read-only ``uint8`` view, no specials)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for a cache of {n} sequences")
        i %= n
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    __getitem__ = sequence

    def record_id(self, i: int) -> str:
        """FASTA id (header up to the first whitespace) of sequence ``i``."""
        if self._ids is None:  # memory-map ids.txt and index its line starts once
            path = self.path / IDS_FILE
            self._ids = (
                np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
            )
            nl = np.flatnonzero(self._ids == 10)
            self._id_starts = np.concatenate([[0], nl + 1]).astype(np.int64)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for a cache of {n} sequences")
        i %= n
        start, end = int(self._id_starts[i]), int(self._id_starts[i + 1]) - 1
        return bytes(self._ids[start:end]).decode("utf-8")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of the cache at ``path``, or None when it is not a JSON object."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def cache_damage(path: Path, manifest: dict[str, Any]) -> str | None:
    """What is wrong with the cache files at ``path`` compared with ``manifest``, or None.

    The manifest is written last and records the counts, so a file truncated, replaced or edited
    afterwards shows as a size that disagrees with them. Checked: ``tokens.u8`` holds exactly
    ``num_residues`` bytes; ``offsets.npy`` is ``num_sequences + 1`` int64 offsets rising from 0 to
    ``num_residues``; ``ids.txt`` has ``num_sequences`` lines. This reads the offsets and the ids once
    (a few MB per million sequences), never the tokens, so opening a cache stays cheap; a residue
    byte changed in place keeps every size and is not detected.
    """
    try:
        n_seq, n_res = int(manifest["num_sequences"]), int(manifest["num_residues"])
    except (KeyError, TypeError, ValueError):
        return f"{MANIFEST_FILE} lacks the sequence and residue counts"
    for name in (TOKENS_FILE, OFFSETS_FILE, IDS_FILE):
        if not (path / name).is_file():
            return f"{name} is missing"
    size = (path / TOKENS_FILE).stat().st_size
    if size != n_res:
        return f"{TOKENS_FILE} has {size:,} bytes, the manifest says {n_res:,} residues"
    try:
        offsets = np.load(path / OFFSETS_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return f"{OFFSETS_FILE} is not a readable numpy array"
    if offsets.dtype != np.int64 or offsets.shape != (n_seq + 1,):
        return f"{OFFSETS_FILE} holds {offsets.dtype} {offsets.shape}, expected int64 ({n_seq + 1},)"
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_res:
        return f"{OFFSETS_FILE} does not run from 0 to {n_res:,}"
    prev = 0
    for start in range(0, n_seq + 1, _CHECK_CHUNK):
        chunk = np.asarray(offsets[start : start + _CHECK_CHUNK])
        if chunk[0] < prev or (chunk.size > 1 and bool((np.diff(chunk) < 0).any())):
            return f"{OFFSETS_FILE} is not increasing"
        prev = int(chunk[-1])
    ids_size = (path / IDS_FILE).stat().st_size
    lines = int(np.count_nonzero(np.memmap(path / IDS_FILE, dtype=np.uint8, mode="r") == 10)) if ids_size else 0
    if lines != n_seq:
        return f"{IDS_FILE} has {lines:,} lines, the manifest says {n_seq:,} sequences"
    return None


def _damaged_message(path: Path, manifest: dict[str, Any] | None, damage: str) -> str:
    inputs = [str(rec.get("path")) for rec in (manifest or {}).get("inputs", []) if isinstance(rec, dict)]
    fasta = " ".join(inputs) if inputs else "FASTA"
    return f"cache {path} is damaged ({damage}): rerun `protein-lm prepare {fasta} --out {path} --force`"


def cache_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest minus the inputs' ``mtime_ns``: it changes whenever the cache is rebuilt
    (``created``, inputs' sha256, counts, alphabet) but not when a cache hit records a touched input."""
    inputs = [{k: v for k, v in rec.items() if k != "mtime_ns"} for rec in manifest.get("inputs", [])]
    canon = json.dumps({**manifest, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def hashes_meta(manifest: dict[str, Any], hashes: np.ndarray) -> dict[str, Any]:
    """The content of ``hashes.json`` for ``hashes`` (a ``uint64`` array) of the cache of ``manifest``."""
    return {
        "scheme": HASH_SCHEME,
        "num_sequences": int(len(hashes)),
        "cache_fingerprint": cache_fingerprint(manifest),
        "blake2b": hashlib.blake2b(np.ascontiguousarray(hashes, dtype="<u8").data).hexdigest(),
    }


def is_cache_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


# --------------------------------------------------------------------------------------
# FASTA records
# --------------------------------------------------------------------------------------


def read_sequences(
    path: str | os.PathLike, limit: int | None, on_invalid: str = "error"
) -> Iterator[tuple[str, np.ndarray]]:
    """``(record id, residue token ids)`` of the first ``limit`` records of a FASTA(.gz) file.

    Errors name the file, record and line (:func:`protein_lm.data.fasta.read_fasta`).
    """
    counts: Counter = Counter()
    for n, record in enumerate(read_fasta(path, on_invalid=on_invalid, counts=counts)):
        if limit is not None and n >= limit:
            return
        yield record.id, record.tokens


@dataclass(frozen=True)
class Protein:
    """A FASTA record: its id (header up to the first whitespace) and residue ids (no specials)."""

    id: str
    tokens: np.ndarray  # (n,) uint8


def read_proteins(path: str | os.PathLike, flag: str = "--fasta") -> list[Protein]:
    """All records of a FASTA(.gz) file, in file order; ids must be unique (outputs are keyed by them).

    Raises:
        UserError: a missing file, a malformed record, or an id used twice (naming both lines).
    """
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    seen: dict[str, int] = {}
    proteins = []
    for rec in read_fasta(path):
        if rec.id in seen:
            raise UserError(f"{path}: record id {rec.id!r} on line {rec.line} was already used on line "
                            f"{seen[rec.id]}; outputs are keyed by id, so ids must be unique")
        seen[rec.id] = rec.line
        proteins.append(Protein(rec.id, rec.tokens))
    return proteins
