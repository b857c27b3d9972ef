"""Golden ids against ESM-2's published alphabet, and the documented input policy."""

from __future__ import annotations

import numpy as np
import pytest

from protein_lm.data import tokenizer as T

# ESM-2's vocabulary in id order, written out from the ESM alphabet specification
# (prepend <cls> <pad> <eos> <unk>, 25 residue letters + '.', '-', then <null_1>, <mask>).
ESM2_TOKENS = [
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
]


def test_vocabulary_is_esm2_in_order():
    assert list(T.TOKENS) == ESM2_TOKENS
    assert T.VOCAB_SIZE == 33
    assert (T.CLS_ID, T.PAD_ID, T.EOS_ID, T.UNK_ID, T.MASK_ID) == (0, 1, 2, 3, 32)


def test_golden_ids_human_haemoglobin_alpha_start():
    # P69905 begins MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF...
    ids = T.encode("MVLSPADKTNVKAAWGKVGAH")
    assert ids == [0, 20, 7, 4, 8, 14, 5, 13, 15, 11, 17, 7, 15, 5, 5, 22, 6, 15, 7, 6, 5, 21, 2]
    assert T.encode("MVLSPADKTNVKAAWGKVGAH", add_special_tokens=False) == ids[1:-1]


def test_policy_lower_case_whitespace_crlf_stop_and_j():
    assert T.encode("mk tA\r\nyI*") == T.encode("MKTAYI")
    assert T.encode("MJ", add_special_tokens=False) == [20, T.TOKEN_TO_ID["X"]]
    assert T.clean_sequence("acd e*") == "ACDE"


@pytest.mark.parametrize(
    ("raw", "char", "position"),
    [("MK1V", "1", 2), ("M*K", "*", 1), ("MK\n V#", "#", 5), ("MK**", "*", 2)],
)
def test_invalid_characters_report_the_raw_position(raw, char, position):
    with pytest.raises(T.InvalidSequenceError) as err:
        T.encode(raw)
    assert err.value.char == char and err.value.position == position
    assert f"position {position + 1}" in str(err.value)


def test_decode_round_trip_and_bad_ids():
    seq = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
    ids = T.encode(seq)
    assert T.decode(ids) == "<cls>" + seq + "<eos>"
    assert T.decode(ids, skip_special_tokens=True) == seq
    with pytest.raises(ValueError, match="outside the vocabulary"):
        T.decode([0, 33])


def test_byte_table_agrees_with_encode_for_every_byte():
    for b in range(256):
        try:
            expected = T.encode(bytes([b]).decode("latin-1"), add_special_tokens=False)
        except T.InvalidSequenceError:
            expected = None
        got = int(T.BYTE_TO_ID[b])
        if expected is None or expected == []:  # invalid, or whitespace / a lone '*' (dropped)
            assert got == 255 or chr(b) in " \t\r\n\v\f*"
        else:
            assert [got] == expected
    assert T.encode_residues("ACD").dtype == np.uint8
