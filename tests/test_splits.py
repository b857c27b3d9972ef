"""Unit tests of protein_lm.data.splits: content hashing and split assignment."""

from __future__ import annotations

import numpy as np

from protein_lm.data.splits import TEST, TRAIN, VAL, assign_splits, content_hashes


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
