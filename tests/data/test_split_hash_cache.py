"""Split hashes stored with the token cache (hashes.npy + hashes.json): made once, never stale.

The reference is computed here independently (``hashlib.blake2b`` per sequence with the documented
key), not with ``protein_lm.data.splits.content_hashes``, so a change to the stored or the computed
hashes cannot hide behind the code under test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from protein_lm.data import readers
from protein_lm.data.cache import prepare_cache
from protein_lm.data.datamodule import ProteinDataModule
from protein_lm.data.readers import HASHES_FILE, HASHES_META_FILE, TokenCache
from protein_lm.data.splits import TEST, TRAIN, VAL, assign_splits

KEY = b"protein_lm.split.v1"  # the documented split key: changing it would change every split


def reference_hashes(cache: TokenCache) -> np.ndarray:
    offs = np.asarray(cache.offsets)
    tok = np.asarray(cache.tokens)
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(tok[a:b].tobytes(), digest_size=8, key=KEY).digest(), "little")
            for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)
        ],
        dtype=np.uint64,
    )


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, sample_fasta) -> tuple[Path, np.ndarray]:
    """The shipped sample prepared once, with its independently computed reference hashes."""
    out = prepare_cache([sample_fasta], tmp_path_factory.mktemp("hc") / "c", progress=False)
    return out, reference_hashes(TokenCache(out))


@pytest.fixture
def cache_copy(sample_cache, tmp_path) -> tuple[Path, np.ndarray]:
    """A private, writable copy of the sample cache (tests damage it)."""
    src, ref = sample_cache
    dst = tmp_path / "c"
    shutil.copytree(src, dst)
    return dst, ref


def drop_hashes(d: Path) -> None:
    for name in (HASHES_FILE, HASHES_META_FILE):
        (d / name).unlink(missing_ok=True)


def assert_stored(d: Path, ref: np.ndarray) -> None:
    """hashes.npy on disk equals ``ref`` and is accepted by a fresh TokenCache without rehashing."""
    stored = np.load(d / HASHES_FILE)
    assert stored.dtype == np.uint64 and np.array_equal(stored, ref)
    assert TokenCache(d)._load_hashes() is not None
    assert not [p.name for p in d.iterdir() if ".tmp-" in p.name]  # no temporary file left


class CountingHashes:
    """Wraps readers.content_hashes to count the sequences it hashes (full pass vs spot checks)."""

    def __init__(self, monkeypatch):
        self.sequences = 0
        self._real = readers.content_hashes
        monkeypatch.setattr(readers, "content_hashes", self)

    def __call__(self, tokens, offsets):
        self.sequences += len(offsets) - 1
        return self._real(tokens, offsets)


# ------------------------------------------------------------------ identical splits


def test_prepare_stores_the_reference_hashes_and_splits_are_unchanged(sample_cache):
    d, ref = sample_cache
    assert len(ref) == 4000 and len(np.unique(ref)) > 3900
    assert_stored(d, ref)
    meta = json.loads((d / HASHES_META_FILE).read_text())
    assert meta["scheme"] == "blake2b-64/protein_lm.split.v1" and meta["num_sequences"] == 4000
    cache = TokenCache(d)
    assert np.array_equal(cache.content_hashes(), ref)
    # the DataModule's splits are those of the reference hashes, bit for bit
    dm = ProteinDataModule(str(d), val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    expected = assign_splits(ref, 0.1, 0.1)
    for name, code in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        assert np.array_equal(dm.split_indices(name)[1], np.flatnonzero(expected == code)), name


def test_multi_input_prepare_hashes_in_input_order(sample_fasta, tmp_path):
    records = gzip.decompress(sample_fasta.read_bytes()).split(b"\n>")
    a = tmp_path / "a.fa"
    b = tmp_path / "b.fa.gz"
    a.write_bytes(b"\n>".join(records[:1234]) + b"\n")
    b.write_bytes(gzip.compress(b">" + b"\n>".join(records[1234:])))
    for workers in (1, 2):
        out = prepare_cache([a, b], tmp_path / f"ab{workers}", progress=False, workers=workers)
        assert_stored(out, reference_hashes(TokenCache(out)))


# ------------------------------------------------------------------ made lazily, once


def test_old_cache_gets_hashes_on_first_setup_then_reuses_them(cache_copy, monkeypatch):
    d, ref = cache_copy
    drop_hashes(d)  # a cache prepared before hashes.npy existed
    counter = CountingHashes(monkeypatch)
    ProteinDataModule(str(d)).setup("fit")
    assert counter.sequences == 4000  # one full pass
    assert_stored(d, ref)
    counter.sequences = 0
    ProteinDataModule(str(d)).setup("fit")  # a second run (another rank, a resume)
    assert 0 < counter.sequences <= readers._HASH_SPOT_CHECKS  # only the spot checks


def test_prepare_can_rebuild_a_cache_holding_hashes_and_temp_leftovers(sample_fasta, cache_copy):
    d, ref = cache_copy
    (d / f".{HASHES_FILE}.tmp-abc123").write_bytes(b"left by a killed process")
    out = prepare_cache([sample_fasta], d, progress=False, force=True)
    assert_stored(out, ref)


# ------------------------------------------------------------------ stale or corrupt files


def _truncate(d: Path, ref: np.ndarray, manifest: dict) -> None:
    short = ref[:-1]  # consistent metadata, wrong length: only the length check catches it
    np.save(d / HASHES_FILE, short)
    (d / HASHES_META_FILE).write_text(json.dumps(readers.hashes_meta(manifest, short)))


def _garbage(d: Path, ref: np.ndarray, manifest: dict) -> None:
    (d / HASHES_FILE).write_bytes(os.urandom(8 * len(ref) + 128))


def _flip_value(d: Path, ref: np.ndarray, manifest: dict) -> None:
    bad = ref.copy()
    bad[1] ^= np.uint64(1)  # hashes.json still describes the original: the digest catches it
    np.save(d / HASHES_FILE, bad)


def _other_cache(d: Path, ref: np.ndarray, manifest: dict) -> None:
    # hashes of another cache of the same size (reversed order), with their own valid metadata as if
    # copied over from it: the manifest fingerprint catches it
    other = {**manifest, "created": "1999-01-01T00:00:00+00:00"}
    np.save(d / HASHES_FILE, ref[::-1].copy())
    (d / HASHES_META_FILE).write_text(json.dumps(readers.hashes_meta(other, ref[::-1].copy())))


def _old_scheme(d: Path, ref: np.ndarray, manifest: dict) -> None:
    wrong = ref ^ np.uint64(12345)  # "made by another hash function"
    meta = {**readers.hashes_meta(manifest, wrong), "scheme": "blake2b-64/protein_lm.split.v0"}
    np.save(d / HASHES_FILE, wrong)
    (d / HASHES_META_FILE).write_text(json.dumps(meta))


def _bad_json(d: Path, ref: np.ndarray, manifest: dict) -> None:
    np.save(d / HASHES_FILE, ref[::-1].copy())
    (d / HASHES_META_FILE).write_text("{not json")


def _consistent_but_wrong(d: Path, ref: np.ndarray, manifest: dict) -> None:
    # every recorded property matches (a cache whose tokens were replaced by hand): spot checks only
    wrong = np.roll(ref, 1)
    np.save(d / HASHES_FILE, wrong)
    (d / HASHES_META_FILE).write_text(json.dumps(readers.hashes_meta(manifest, wrong)))


@pytest.mark.parametrize(
    "damage, spot_checks",
    [
        (_truncate, False),
        (_garbage, False),
        (_flip_value, False),
        (_other_cache, False),
        (_old_scheme, False),
        (_bad_json, False),
        (_consistent_but_wrong, True),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else str(v),
)
def test_stale_or_corrupt_hashes_are_recomputed(cache_copy, monkeypatch, damage, spot_checks):
    d, ref = cache_copy
    if not spot_checks:  # isolate the check under test from the spot checks
        monkeypatch.setattr(readers, "_HASH_SPOT_CHECKS", 0)
    damage(d, ref, TokenCache(d).manifest)
    assert np.array_equal(TokenCache(d).content_hashes(), ref)
    assert_stored(d, ref)  # and repaired on disk


# ------------------------------------------------------------------ unwritable caches, races


def _fail(err: OSError):
    def raiser(*args, **kwargs):
        raise err

    return raiser


@pytest.mark.parametrize(
    "where, err",
    [
        ("mkstemp", PermissionError(13, "Permission denied")),  # read-only directory
        ("replace", OSError(28, "No space left on device")),  # fails after the temp file is written
    ],
)
def test_unwritable_cache_falls_back_to_memory(cache_copy, monkeypatch, where, err):
    d, ref = cache_copy
    drop_hashes(d)
    before = sorted(p.name for p in d.iterdir())
    target = tempfile if where == "mkstemp" else os
    monkeypatch.setattr(target, where, _fail(err))
    with pytest.warns(UserWarning, match="cannot save the sequence hashes"):
        dm = ProteinDataModule(str(d), val_fraction=0.1, test_fraction=0.1)
        dm.setup("fit")
    assert sorted(p.name for p in d.iterdir()) == before  # no partial or temporary file
    expected = assign_splits(ref, 0.1, 0.1)
    assert np.array_equal(dm.split_indices("val")[1], np.flatnonzero(expected == VAL))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_really_read_only_directory(cache_copy):
    d, ref = cache_copy
    drop_hashes(d)
    d.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="cannot save"):
            assert np.array_equal(TokenCache(d).content_hashes(), ref)
        assert not (d / HASHES_FILE).exists()
    finally:
        d.chmod(0o755)


def _rank(path: str, start, queue) -> None:
    start.wait()
    queue.put(TokenCache(path).content_hashes().tobytes())


def test_concurrent_first_use_by_several_processes(cache_copy):
    d, ref = cache_copy
    drop_hashes(d)
    ctx = multiprocessing.get_context("fork")
    start, queue = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(str(d), start, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()  # all ranks race to compute and save
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == ref.tobytes() for r in results)
    assert_stored(d, ref)
