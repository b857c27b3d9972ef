"""Token cache: FASTA(.gz) -> memmap of residue ids + offsets + ids + manifest.

Layout of a cache directory (docs/architecture.md, docs/data.md)::

    tokens.u8      uint8 residue ids (4..30) of all kept sequences, concatenated, no specials
    offsets.npy    int64, num_sequences + 1; sequence i is tokens[offsets[i]:offsets[i+1]]
    ids.txt        one record id per line
    manifest.json  written last: its presence means the cache is complete
    hashes.npy     uint64, num_sequences: each sequence's split hash (splits.content_hashes)
    hashes.json    what hashes.npy belongs to: hash scheme, num_sequences, the manifest's
                   content fingerprint and a digest of hashes.npy (see TokenCache.content_hashes)

:func:`prepare_cache` streams with constant memory (tokens appended to a file, lengths
spilled to a scratch file, never the whole corpus in RAM), builds everything in a
temporary directory next to the output and renames it into place at the end, so a crash
or a rejected input never leaves a half-written cache. Unchanged inputs are a cache hit
(size + mtime fast check, then sha256). Reading is :class:`TokenCache` (no torch).

The split hashes are optional files: ``prepare`` writes them (hashing each block while it streams),
and a cache made before they existed gets them on its first :meth:`TokenCache.content_hashes` call.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protein_lm import __version__
from protein_lm.errors import UserError
from protein_lm.fasta import ON_INVALID, SKIP_REASONS, _check_readable, tokenize_fasta
from protein_lm.record_checks import RecordAudit, warnings_for
from protein_lm.scratch import make_scratch_dir, remove_stale
from protein_lm.splits import HASH_SCHEME, content_hashes
from protein_lm.tokenizer import ALPHABET_VERSION
from protein_lm.worker_pool import worker_pool

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
_COPY_CHUNK = 1 << 22  # elements / bytes per chunk when assembling offsets and parts


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


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
        """``uint64`` split hash of every sequence (:func:`protein_lm.splits.content_hashes`).

        Hashing a large corpus costs minutes, and every ``setup`` (each DDP rank, each resume) needs
        the hashes, so they are kept in ``hashes.npy``. They are used only if ``hashes.json`` says they
        were made with today's hash scheme for this very cache (its manifest fingerprint), the file
        is intact (length, dtype, digest) and a few re-hashed sequences agree; otherwise they are
        recomputed and saved atomically (temporary file + rename: concurrent ranks each write the
        same bytes, the last rename wins). A read-only or full disk only costs the recomputation.
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
            or meta != _hashes_meta(self.manifest, hashes)
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
            _save_atomic(self.path / HASHES_FILE, lambda fh: np.save(fh, hashes, allow_pickle=False))
            meta = json.dumps(_hashes_meta(self.manifest, hashes), indent=2) + "\n"
            _save_atomic(self.path / HASHES_META_FILE, lambda fh: fh.write(meta.encode()))
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
    for start in range(0, n_seq + 1, _COPY_CHUNK):
        chunk = np.asarray(offsets[start : start + _COPY_CHUNK])
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


def _hashes_meta(manifest: dict[str, Any], hashes: np.ndarray) -> dict[str, Any]:
    """The content of ``hashes.json`` for ``hashes`` (a ``uint64`` array) of the cache of ``manifest``."""
    return {
        "scheme": HASH_SCHEME,
        "num_sequences": int(len(hashes)),
        "cache_fingerprint": cache_fingerprint(manifest),
        "blake2b": hashlib.blake2b(np.ascontiguousarray(hashes, dtype="<u8").data).hexdigest(),
    }


def _save_atomic(path: Path, write: Any) -> None:
    """``write(binary file)`` into a unique temporary sibling, then rename it to ``path``.

    The temporary name is unique per call (``mkstemp``), so processes saving at the same time never
    share a partial file; it is removed when anything fails.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    """What :func:`prepare` did (the CLI prints it)."""

    path: Path
    hit: bool
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Part:
    """The output of tokenising one input file into a scratch directory."""

    index: int
    tokens: Path
    lengths: Path
    ids: Path
    hashes: Path
    num_sequences: int
    num_residues: int
    skipped: dict[str, int]
    input: dict[str, Any]


class _Progress:
    """Bytes-read progress on stderr: redrawn in place on a terminal, a line every 10 s
    otherwise (logs), nothing for inputs that finish quickly."""

    DELAY = 2.0  # seconds before the first report
    INTERVAL_TTY = 0.5
    INTERVAL_LOG = 10.0

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.done = 0
        self.start = self.last = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()
        self.shown = False

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        interval = self.INTERVAL_TTY if self.tty else self.INTERVAL_LOG
        if now - self.start < self.DELAY or now - self.last < interval:
            return
        self.last = now
        self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9) / 1e6
        pct = 100.0 * self.done / self.total
        line = f"prepare: {self.label}: {pct:5.1f}% of {self.total / 1e6:,.0f} MB read ({rate:,.0f} MB/s)"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.enabled and self.shown:
            self.done = self.total
            self._show(time.monotonic())
            if self.tty:
                print(file=sys.stderr, flush=True)


def _file_info(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _tokenize_to_part(index: int, path: Path, scratch: Path, on_invalid: str, progress: bool) -> _Part:
    """Tokenise one input into ``scratch/part-INDEX.*`` (runs in a worker process or inline)."""
    info = _file_info(path)
    hasher = hashlib.sha256()
    counts: Counter = Counter()
    prog = _Progress(path.name, info["size"], progress)
    tok_path = scratch / f"part-{index}.u8"
    len_path = scratch / f"part-{index}.lengths"
    ids_path = scratch / f"part-{index}.ids"
    hash_path = scratch / f"part-{index}.hashes"
    n_seq = n_res = 0
    audit = RecordAudit()
    with (
        open(tok_path, "wb") as ftok,
        open(len_path, "wb") as flen,
        open(ids_path, "wb") as fids,
        open(hash_path, "wb") as fhash,
    ):
        try:
            for block in tokenize_fasta(path, on_invalid, counts, hasher=hasher, on_raw=prog):
                ftok.write(block.tokens.data)
                flen.write(block.lengths.data)
                fids.write(block.ids)
                audit.add(block.tokens, block.lengths, block.ids)
                # split hashes while the block is in memory (saves a pass over the cache later)
                block_offsets = np.concatenate([[0], np.cumsum(block.lengths)])
                fhash.write(content_hashes(block.tokens, block_offsets).astype("<u8").data)
                n_seq += int(block.lengths.size)
                n_res += int(block.tokens.size)
        finally:
            prog.close()
    # The file must not have changed while we read it (the hash would not describe the cache).
    after = _file_info(path)
    if (after["size"], after["mtime_ns"]) != (info["size"], info["mtime_ns"]):
        raise UserError(f"{path}: the file changed while it was being read; run prepare again")
    info["sha256"] = hasher.hexdigest()
    info["num_sequences"] = n_seq
    info.update(audit.counts())
    return _Part(index, tok_path, len_path, ids_path, hash_path, n_seq, n_res, dict(counts), info)


def _concat_files(parts: list[Path], dest: Path) -> None:
    if len(parts) == 1:
        os.replace(parts[0], dest)
        return
    with open(dest, "wb") as out:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
            p.unlink()


def _write_offsets(length_files: list[Path], n: int, dest: Path) -> None:
    """offsets.npy from the per-part length files, in chunks (constant memory)."""
    offsets = np.lib.format.open_memmap(dest, mode="w+", dtype=np.int64, shape=(n + 1,))
    offsets[0] = 0
    pos, total = 1, 0
    for lf in length_files:
        with open(lf, "rb") as fh:
            while raw := fh.read(_COPY_CHUNK * 8):
                chunk = np.cumsum(np.frombuffer(raw, dtype=np.int64)) + total
                offsets[pos : pos + chunk.size] = chunk
                pos += chunk.size
                total = int(chunk[-1])
        lf.unlink()
    assert pos == n + 1, (pos, n)
    offsets.flush()
    del offsets


def _write_hashes(hash_files: list[Path], n: int, dest: Path) -> np.ndarray:
    """hashes.npy from the per-part raw ``<u8`` files, in chunks; returns it memory-mapped."""
    hashes = np.lib.format.open_memmap(dest, mode="w+", dtype="<u8", shape=(n,))
    pos = 0
    for hf in hash_files:
        with open(hf, "rb") as fh:
            while raw := fh.read(_COPY_CHUNK * 8):
                chunk = np.frombuffer(raw, dtype="<u8")
                hashes[pos : pos + chunk.size] = chunk
                pos += chunk.size
        hf.unlink()
    assert pos == n, (pos, n)
    hashes.flush()
    return hashes


def _resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UserError("no input FASTA files given")
    for p in inputs:
        _check_readable(Path(p).expanduser())  # as given: links and pipes are named as the user knows them
    paths = [Path(p).expanduser().resolve() for p in inputs]
    seen: set[Path] = set()
    for p in paths:
        if p in seen:
            raise UserError(f"{p}: the same input file is given twice")
        seen.add(p)
    return paths


def _is_hit(out_dir: Path, paths: list[Path], on_invalid: str) -> bool:
    """True when ``out_dir`` holds a complete cache of exactly these, unchanged, inputs."""
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    if (manifest.get("format"), manifest.get("version"), manifest.get("alphabet_version")) != (
        FORMAT,
        VERSION,
        ALPHABET_VERSION,
    ):
        return False
    recorded = manifest.get("inputs", [])
    if [r.get("path") for r in recorded] != [str(p) for p in paths]:
        return False
    # An "error" cache equals a "skip" cache when nothing invalid was skipped.
    invalid = sum(v for k, v in manifest.get("skipped", {}).items() if k != "empty_sequence")
    if on_invalid == "error" and invalid:
        return False
    if not all((out_dir / f).is_file() for f in CACHE_FILES) or cache_damage(out_dir, manifest):
        return False  # rebuilt from its inputs
    touched = False
    for rec, p in zip(recorded, paths, strict=True):
        info = _file_info(p)
        if info["size"] != rec.get("size"):
            return False
        if info["mtime_ns"] != rec.get("mtime_ns"):
            if _sha256(p) != rec.get("sha256"):
                return False
            rec["mtime_ns"] = info["mtime_ns"]  # same content, touched: remember the new mtime
            touched = True
    if touched:
        _write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _check_out_dir(out_dir: Path) -> None:
    """Never replace a directory that holds anything but a token cache (``--out .``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir():
        ours = CACHE_FILES + OPTIONAL_FILES
        foreign = [  # leftovers of an interrupted atomic write (.NAME.tmp-*) are ours too
            p.name
            for p in out_dir.iterdir()
            if p.name not in ours and not any(p.name.startswith(f".{f}.tmp-") for f in ours)
        ]
        if foreign:
            raise UserError(
                f"{out_dir}: exists and holds files that are not part of a token cache "
                f"({', '.join(sorted(foreign)[:3])}); choose another --out"
            )


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an old cache there is moved aside first, then removed
    (and put back if the rename fails)."""
    old = None
    if out_dir.exists():
        old = make_scratch_dir(out_dir, "old")
        os.replace(out_dir, old / "cache")
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old / "cache", out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    on_invalid: str = "error",
    progress: bool = True,
    workers: int = 1,
    force: bool = False,
) -> PrepareResult:
    """Build (or reuse) a token cache and say what happened. See :func:`prepare_cache`."""
    t0 = time.perf_counter()
    if on_invalid not in ON_INVALID:
        raise UserError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    paths = _resolve_inputs(inputs)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir)
    with contextlib.suppress(OSError):  # left by runs killed (SIGKILL) before they could clean up
        remove_stale(out_dir)
    if not force and _is_hit(out_dir, paths, on_invalid):
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        return PrepareResult(out_dir, True, time.perf_counter() - t0, manifest)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_scratch_dir(out_dir, "tmp")
    except OSError as err:
        raise UserError(f"{out_dir}: cannot create the cache directory: {err.strerror or err}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a cache is an ordinary dir
    try:
        workers = max(1, min(int(workers), len(paths)))
        if workers == 1:
            parts = [_tokenize_to_part(i, p, tmp, on_invalid, progress) for i, p in enumerate(paths)]
        else:
            with worker_pool(workers) as pool:
                futures = [
                    pool.submit(_tokenize_to_part, i, p, tmp, on_invalid, progress)
                    for i, p in enumerate(paths)
                ]
                parts = [f.result() for f in futures]
        for part in parts:  # once per file, when it is read (not on every cache hit)
            for message in warnings_for(part.input):
                print(f"protein-lm: warning: {message}", file=sys.stderr, flush=True)
        n_seq = sum(p.num_sequences for p in parts)
        n_res = sum(p.num_residues for p in parts)
        skipped = {reason: 0 for reason in SKIP_REASONS}
        for p in parts:
            for k, v in p.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
        if n_seq == 0:
            raise UserError(
                f"no sequences kept from {', '.join(str(p) for p in paths)} "
                f"(skipped: {', '.join(f'{k}={v}' for k, v in skipped.items() if v) or 'none'})"
            )
        _concat_files([p.tokens for p in parts], tmp / TOKENS_FILE)
        _concat_files([p.ids for p in parts], tmp / IDS_FILE)
        _write_offsets([p.lengths for p in parts], n_seq, tmp / OFFSETS_FILE)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "alphabet_version": ALPHABET_VERSION,
            "num_sequences": n_seq,
            "num_residues": n_res,
            "skipped": skipped,
            "on_invalid": on_invalid,
            "inputs": [p.input for p in parts],
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "protein_lm_version": __version__,
        }
        hashes = _write_hashes([p.hashes for p in parts], n_seq, tmp / HASHES_FILE)
        meta = _hashes_meta(manifest, hashes)
        del hashes
        (tmp / HASHES_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, out_dir)
    except OSError as err:  # disk full, permissions: one line, nothing half-written left
        raise UserError(f"{out_dir}: cannot write the cache: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(out_dir, False, time.perf_counter() - t0, manifest)


def prepare_cache(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    on_invalid: str = "error",
    progress: bool = True,
    *,
    workers: int = 1,
    force: bool = False,
) -> Path:
    """Tokenise FASTA(.gz) files into a token cache directory and return its path.

    A cache hit (same inputs, same size/mtime or same sha256, same policy) returns at once.

    Args:
        inputs: FASTA files, plain or gzip; their records are concatenated in this order.
        out_dir: the cache directory (created; replaced atomically when rebuilt).
        on_invalid: ``"error"`` stops at the first bad record (nothing is written);
            ``"skip"`` drops bad records and counts them per reason in the manifest.
        progress: show bytes-read progress on stderr for long inputs.
        workers: processes tokenising input files in parallel (one file per process).
        force: rebuild even if the cache is up to date.

    Raises:
        FastaFormatError / UserError: one line naming file, record and line.
    """
    return prepare(inputs, out_dir, on_invalid, progress, workers, force).path


def default_cache_root() -> Path:
    """``$PROTEIN_LM_CACHE`` or ``~/.cache/protein_lm``."""
    env = os.environ.get("PROTEIN_LM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "protein_lm"


def is_cache_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def ensure_cache(
    path_or_fasta: str | os.PathLike, cache_root: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Return a token cache for ``path_or_fasta``.

    A cache directory is returned as is. A FASTA file is prepared (once) into
    ``cache_root`` (default :func:`default_cache_root`) under a name derived from its
    absolute path, size and mtime, so an edited file gets a fresh cache.
    """
    path = Path(path_or_fasta).expanduser()
    if path.is_dir():
        if not is_cache_dir(path):
            raise UserError(
                f"{path}: a directory but not a token cache (no {MANIFEST_FILE}); "
                "give a FASTA file or a directory made by `protein-lm prepare`"
            )
        return path
    _check_readable(path)
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = path.name.removesuffix(".gz")
    for suffix in (".fasta", ".fa", ".faa", ".fas"):
        stem = stem.removesuffix(suffix)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return prepare_cache([path], root / f"{stem}-{key}", progress=progress)
