"""Writing a token cache: FASTA(.gz) -> memmap of residue ids + offsets + ids + manifest.

The layout is in :mod:`protein_lm.data.readers` (which reads it, no torch).
:func:`prepare_cache` streams with constant memory (tokens appended to a file, lengths
spilled to a scratch file, never the whole corpus in RAM), builds everything in a
temporary directory next to the output and renames it into place at the end, so a crash
or a rejected input never leaves a half-written cache. Unchanged inputs are a cache hit
(size + mtime fast check, then sha256). :func:`ensure_cache` turns a FASTA path into its cache.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protein_lm import __version__
from protein_lm.data.fasta import ON_INVALID, SKIP_REASONS, _check_readable, tokenize_fasta
from protein_lm.data.progress import ReadProgress
from protein_lm.data.readers import (
    CACHE_FILES,
    FORMAT,
    HASHES_FILE,
    HASHES_META_FILE,
    IDS_FILE,
    MANIFEST_FILE,
    OFFSETS_FILE,
    OPTIONAL_FILES,
    TOKENS_FILE,
    VERSION,
    cache_damage,
    hashes_meta,
    is_cache_dir,
)
from protein_lm.data.record_checks import RecordAudit, warnings_for
from protein_lm.data.splits import content_hashes
from protein_lm.data.tokenizer import ALPHABET_VERSION
from protein_lm.errors import UserError
from protein_lm.io import remove_stale, replace_dir, scratch_dir, write_text
from protein_lm.worker_pool import worker_pool

_COPY_CHUNK = 1 << 22  # elements / bytes per chunk when assembling offsets and parts


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
    prog = ReadProgress(path.name, info["size"], progress)
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
        write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return True


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
        tmp = scratch_dir(out_dir)
    except OSError as err:
        raise UserError(f"{out_dir}: cannot create the cache directory: {err.strerror or err}") from None
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
        meta = hashes_meta(manifest, hashes)
        del hashes
        (tmp / HASHES_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
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
