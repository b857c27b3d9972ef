"""Train/val/test assignment by a hash of the sequence *content*.

Each sequence's residue bytes are hashed with BLAKE2b (8-byte digest, fixed key); the digest read as
a ``uint64`` and divided by 2**64 is a number ``u`` uniform in ``[0, 1)``. ``u < val_fraction`` goes to
validation, ``u < val_fraction + test_fraction`` to test, the rest to train. Identical sequences
have identical hashes, so duplicates (Swiss-Prot has ~80k) never straddle splits, and the split of
a sequence does not depend on the seed, the file order or which other sequences are present.

Hashing costs about 1 µs per sequence (Swiss-Prot 2014, 0.5 M sequences: ~0.5-1 s; UniRef50: about a
minute), so it is done once: ``prepare`` stores the hashes next to the token cache (``hashes.npy``) and
:meth:`protein_lm.data.readers.TokenCache.content_hashes` reads them back. Changing the hash
function or key changes every split and invalidates those files: bump :data:`HASH_SCHEME` with it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from protein_lm.data.readers import TokenCache

TRAIN, VAL, TEST = 0, 1, 2
EXCLUDED = -1  # in no split: its content is in an explicit evaluation set
SPLIT_NAMES = ("train", "val", "test")
_HASH_KEY = b"protein_lm.split.v1"
# Names the hash function + key; stored with persisted hashes so a change is never mixed with old files.
HASH_SCHEME = "blake2b-64/" + _HASH_KEY.decode()


def content_hashes(tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """BLAKE2b-64 of every sequence's residue bytes, as ``uint64`` (one per sequence).

    Reads the (memory-mapped) tokens through a memoryview: no copy of the corpus is made. Each
    sequence's hasher is a ``copy()`` of one keyed hasher: the same digests as
    ``blake2b(seq, digest_size=8, key=_HASH_KEY)``, ~25 % faster (the key block is compressed once).
    """
    if len(offsets) <= 1:
        return np.zeros(0, dtype=np.uint64)
    buf = memoryview(np.asarray(tokens).reshape(-1).view(np.uint8)) if len(tokens) else memoryview(b"")
    offs = np.asarray(offsets).tolist()
    fresh = hashlib.blake2b(digest_size=8, key=_HASH_KEY).copy

    def one(a: int, b: int) -> bytes:
        h = fresh()
        h.update(buf[a:b])
        return h.digest()

    digests = b"".join([one(a, b) for a, b in zip(offs[:-1], offs[1:], strict=True)])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def hash_to_unit(hashes: np.ndarray) -> np.ndarray:
    """Map ``uint64`` hashes to floats uniform in ``[0, 1)``."""
    return (hashes >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def assign_splits(hashes: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """``int8`` split code per sequence: 0 train, 1 val, 2 test (see module docstring)."""
    u = hash_to_unit(hashes)
    split = np.full(len(hashes), TRAIN, dtype=np.int8)
    split[u < val_fraction + test_fraction] = TEST
    split[u < val_fraction] = VAL
    return split


def assign_with_explicit_sets(
    hashes: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    val_hashes: np.ndarray | None = None,
    test_hashes: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Splits when explicit validation / test sets (other files) replace the hashed shares.

    An explicit set takes the place of its hashed share (those sequences train instead), and no
    sequence of the corpus whose content is in an explicit set is trained or evaluated on
    (:data:`EXCLUDED`). A test sequence whose content is also in the explicit validation set is
    dropped from the test set (it stays in validation only).

    Args:
        hashes: ``(N,)`` content hashes of the corpus.
        val_hashes, test_hashes: ``(V,)`` / ``(T,)`` content hashes of the explicit sets, or None.

    Returns:
        ``(codes, keep)``: ``(N,)`` int8 split code per corpus sequence (``EXCLUDED`` included), and
        ``{VAL: indices, TEST: indices}`` of the explicit sets' sequences kept (only those given).
    """
    codes = assign_splits(hashes, val_fraction, test_fraction)
    explicit: list[np.ndarray] = []
    keep: dict[int, np.ndarray] = {}
    for code, h in ((VAL, val_hashes), (TEST, test_hashes)):
        if h is None:
            continue
        kept = np.arange(len(h))
        if explicit:  # the explicit validation set, given before
            kept = kept[~np.isin(h, explicit[0])]
        keep[code] = kept
        codes[codes == code] = TRAIN
        explicit.append(h)
    if explicit:
        codes[np.isin(hashes, np.concatenate(explicit))] = EXCLUDED
    return codes, keep


def sample_by_hash(ids: np.ndarray, hashes: np.ndarray, cap: int | None) -> np.ndarray:
    """At most ``cap`` of ``ids``: those with the smallest content hash, in index order.

    A sample uniform in content and the same in every run, whatever the seed (``hashes`` is indexed
    by the values of ``ids``).
    """
    if cap is None or len(ids) <= cap:
        return ids
    return np.sort(ids[np.argsort(hashes[ids], kind="stable")[:cap]])


def split_caches(
    main: TokenCache,
    explicit: dict[int, TokenCache],
    val_fraction: float,
    test_fraction: float,
    caps: tuple[int | None, int | None, int | None],
) -> dict[str, tuple[TokenCache, np.ndarray]]:
    """``{split name: (cache, sequence indices)}`` for train, val and test.

    ``main``'s sequences are assigned by content hash; ``explicit[VAL]`` / ``explicit[TEST]`` (the
    ones given) replace the hashed share (:func:`assign_with_explicit_sets`). Each split is then cut
    to at most ``caps[code]`` sequences by :func:`sample_by_hash` (``None``: all).
    """
    # the hashes are stored with each cache: computed once, not per call
    codes, keep = assign_with_explicit_sets(
        main.content_hashes(), val_fraction, test_fraction,
        *(explicit[c].content_hashes() if c in explicit else None for c in (VAL, TEST)),
    )
    splits: dict[str, tuple[TokenCache, np.ndarray]] = {}
    for code, name in enumerate(SPLIT_NAMES):
        cache, ids = (explicit[code], keep[code]) if code in explicit else (main, np.flatnonzero(codes == code))
        splits[name] = (cache, sample_by_hash(ids, cache.content_hashes(), caps[code]))
    return splits
