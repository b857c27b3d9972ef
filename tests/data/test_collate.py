"""Unit tests of protein_lm.data.collate: framing, MLM 80/10/10 rates, causal shift, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from protein_lm.data.collate import (
    IGNORE_INDEX,
    causal_labels,
    frame_single,
    hash_u64,
    make_batch,
    mlm_mask,
    random_below,
    stream_key,
)
from protein_lm.data.tokenizer import CLS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_IDS, STANDARD_AA_IDS, encode


def _random_ids(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Residues 4..30 with specials sprinkled in, as a model would see them."""
    ids = rng.integers(4, 31, size=shape).astype(np.uint8)
    ids[:, 0] = CLS_ID
    ids[:, -1] = EOS_ID
    specials = rng.random(shape) < 0.05
    ids[specials] = rng.choice(np.array(SPECIAL_IDS, dtype=np.uint8), size=int(specials.sum()))
    return ids


def test_frame_single_layout():
    tokens = np.asarray(encode("ACDEFGHIK", add_special_tokens=False), dtype=np.uint8)
    ids = frame_single(tokens, np.array([0, 2, 5]), np.array([3, 1, 4]))
    expected = [
        [CLS_ID, *encode("ACD", False), EOS_ID, PAD_ID],
        [CLS_ID, *encode("D", False), EOS_ID, PAD_ID, PAD_ID, PAD_ID],
        [CLS_ID, *encode("GHIK", False), EOS_ID],
    ]
    assert ids.tolist() == expected


def test_mlm_rates_on_many_tokens():
    rng = np.random.default_rng(1)
    ids = _random_ids(rng, (64, 4096))  # 262k tokens
    inputs, labels = mlm_mask(ids, np.arange(64), stream_key(3, 0, 1), mask_prob=0.15)
    ids64 = ids.astype(np.int64)
    residue = (ids64 >= 4) & (ids64 <= 30)
    selected = labels != IGNORE_INDEX
    assert not (selected & ~residue).any(), "a special or pad token was selected"
    assert (inputs[~selected] == ids64[~selected]).all(), "an unselected token changed"
    assert (labels[selected] == ids64[selected]).all()
    rate = selected.sum() / residue.sum()
    assert abs(rate - 0.15) < 0.004, rate
    sel_in, sel_orig = inputs[selected], ids64[selected]
    masked = sel_in == MASK_ID
    random_aa = ~masked & (sel_in != sel_orig)
    kept = sel_in == sel_orig
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01
    # a random standard AA equals the original with probability ~1/20 (when the original is standard)
    assert abs(random_aa.sum() / n - 0.1 * (1 - 1 / 20 * np.isin(sel_orig, STANDARD_AA_IDS).mean())) < 0.006
    assert masked.sum() + random_aa.sum() + kept.sum() == n
    assert abs(kept.sum() / n - (0.1 + 0.1 / 20 * np.isin(sel_orig, STANDARD_AA_IDS).mean())) < 0.006
    assert np.isin(sel_in[random_aa], STANDARD_AA_IDS).all()
    # every standard AA shows up as a replacement, roughly uniformly
    counts = np.bincount(sel_in[random_aa], minlength=33)[list(STANDARD_AA_IDS)]
    assert counts.min() > 0.6 * counts.mean()


@pytest.mark.parametrize("prob", [0.05, 0.3])
def test_mlm_mask_prob_is_honoured(prob):
    ids = np.full((32, 4096), 5, dtype=np.uint8)
    _, labels = mlm_mask(ids, np.arange(32), stream_key(0, 0, 1), mask_prob=prob)
    assert abs((labels != IGNORE_INDEX).mean() - prob) < 0.01


def test_masking_is_per_example_pure():
    """An example's mask depends on its id, not on which batch (or row) it sits in."""
    rng = np.random.default_rng(0)
    ids = _random_ids(rng, (8, 300))
    key = stream_key(7, 2, 1)
    full_in, full_lab = mlm_mask(ids, np.arange(100, 108), key)
    part_in, part_lab = mlm_mask(ids[[5, 2]], np.array([105, 102]), key)
    assert (full_in[[5, 2]] == part_in).all() and (full_lab[[5, 2]] == part_lab).all()
    other_in, _ = mlm_mask(ids, np.arange(100, 108), stream_key(7, 3, 1))
    assert (other_in != full_in).any(), "a new epoch must give new masks"


def test_causal_labels_are_shifted_ids():
    ids = frame_single(np.arange(4, 30, dtype=np.uint8), np.array([0, 3]), np.array([5, 2]))
    labels = causal_labels(ids)
    assert labels[:, -1].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    real_next = ids[:, 1:] != PAD_ID
    assert (labels[:, :-1][real_next] == ids[:, 1:][real_next]).all()
    assert (labels[:, :-1][~real_next] == IGNORE_INDEX).all()
    batch = make_batch(ids, np.arange(2), "causal", 0, 0.15)
    assert batch["input_ids"].tolist() == ids.astype(np.int64).tolist()
    assert batch["padding_mask"].tolist() == (ids == PAD_ID).tolist()


def test_hash_uniform_and_distinct():
    h = hash_u64(stream_key(0, 0, 0), np.arange(16), np.arange(4096, dtype=np.uint64))
    assert len(np.unique(h)) == h.size
    u = (h >> np.uint64(11)).astype(np.float64) / 2**53
    hist = np.histogram(u, bins=16, range=(0, 1))[0]
    assert hist.min() > 0.9 * hist.mean()
    r = random_below(stream_key(0, 0, 2), np.arange(20000), np.full(20000, 7))
    assert r.min() == 0 and r.max() == 6
    assert np.bincount(r).min() > 0.9 * 20000 / 7
