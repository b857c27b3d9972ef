"""Unit tests of protein_lm.data.splits: content hashing and split assignment."""

from __future__ import annotations

import numpy as np

from protein_lm.data.splits import (
    EXCLUDED,
    TEST,
    TRAIN,
    VAL,
    assign_splits,
    assign_with_explicit_sets,
    content_hashes,
    sample_by_hash,
)


def _pack(seqs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.frombuffer(b"".join(seqs), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return tokens, offsets


def test_identical_content_identical_hash_anywhere():
    rng = np.random.default_rng(0)
    base = [bytes(rng.integers(4, 31, rng.integers(1, 200)).astype(np.uint8)) for _ in range(500)]
    seqs = base + base[::-1]  # every sequence twice, at different positions
    tokens, offsets = _pack(seqs)
    h = content_hashes(tokens, offsets)
    assert (h[:500] == h[500:][::-1]).all()
    assert len(np.unique(h[:500])) == len(set(base))


def test_split_fractions_and_determinism():
    rng = np.random.default_rng(1)
    seqs = [bytes(rng.integers(4, 31, 50).astype(np.uint8)) for _ in range(20000)]
    tokens, offsets = _pack(seqs)
    h = content_hashes(tokens, offsets)
    split = assign_splits(h, 0.1, 0.05)
    assert abs((split == VAL).mean() - 0.1) < 0.01
    assert abs((split == TEST).mean() - 0.05) < 0.01
    assert abs((split == TRAIN).mean() - 0.85) < 0.01
    # the split of a sequence does not depend on which other sequences are present
    sub = [seqs[i] for i in range(0, 20000, 7)]
    t2, o2 = _pack(sub)
    assert (assign_splits(content_hashes(t2, o2), 0.1, 0.05) == split[::7]).all()
    assert (assign_splits(h, 0.0, 0.0) == TRAIN).all()


def test_explicit_sets_replace_the_hashed_shares():
    """Against a per-sequence loop: explicit val / test take the place of the hashed shares, corpus
    sequences with their content are excluded, test sequences also in val are dropped from test."""
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 2**64, 400, dtype=np.uint64)  # distinct contents
    corpus = pool[rng.integers(0, 400, 1000)]
    val, test = pool[rng.choice(400, 30, replace=False)], pool[rng.choice(400, 20, replace=False)]
    for v, t in ((val, test), (val, None), (None, test), (None, None)):
        codes, keep = assign_with_explicit_sets(corpus, 0.1, 0.1, v, t)
        hashed = assign_splits(corpus, 0.1, 0.1)
        explicit = {int(h) for h in (*(v if v is not None else ()), *(t if t is not None else ()))}
        for i, h in enumerate(corpus.tolist()):
            want = int(hashed[i])
            if (want == VAL and v is not None) or (want == TEST and t is not None):
                want = TRAIN
            if h in explicit:
                want = EXCLUDED
            assert codes[i] == want
        assert sorted(keep) == [c for c in (VAL, TEST) if (v, t)[c - 1] is not None]
        if v is not None:
            assert keep[VAL].tolist() == list(range(len(v)))
        if t is not None:
            vals = set(v.tolist()) if v is not None else set()
            assert keep[TEST].tolist() == [j for j, h in enumerate(t.tolist()) if h not in vals]


def test_sample_by_hash_takes_the_smallest_hashes_in_index_order():
    rng = np.random.default_rng(4)
    hashes = rng.integers(0, 2**64, 300, dtype=np.uint64)
    ids = np.sort(rng.choice(300, 120, replace=False))
    got = sample_by_hash(ids, hashes, 25)
    assert got.tolist() == sorted(sorted(ids.tolist(), key=lambda i: int(hashes[i]))[:25])
    assert sample_by_hash(ids, hashes, None) is ids and sample_by_hash(ids, hashes, 120) is ids
