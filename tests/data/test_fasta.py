"""FASTA reading: input policy, errors that name file/record/line, fast path == reference path."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from protein_lm.data import fasta
from protein_lm.data.fasta import is_gzip, read_fasta, tokenize_fasta
from protein_lm.data.tokenizer import decode, encode_residues
from protein_lm.errors import FastaFormatError


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def fast_records(path: Path, on_invalid: str = "error", counts: Counter | None = None):
    """(id, residues) of every record via the fast path."""
    out = []
    for block in tokenize_fasta(path, on_invalid, counts):
        ids = block.ids.decode().split("\n")[:-1]
        bounds = np.concatenate([[0], np.cumsum(block.lengths)])
        assert len(ids) == block.lengths.size
        for i, rid in enumerate(ids):
            out.append((rid, decode(block.tokens[bounds[i] : bounds[i + 1]])))
    return out


def ref_records(path: Path, on_invalid: str = "error", counts: Counter | None = None):
    return [(r.id, decode(r.tokens)) for r in read_fasta(path, on_invalid, counts)]


@pytest.fixture(params=[None, 7, 64], ids=["big-blocks", "7-byte-blocks", "64-byte-blocks"])
def block_size(request, monkeypatch):
    """Run a test with the normal block size and with tiny blocks (records split across chunks)."""
    if request.param:
        monkeypatch.setattr(fasta, "BLOCK_SIZE", request.param)
        monkeypatch.setattr(fasta, "READ_SIZE", request.param)
    return request.param


# ---------------------------------------------------------------------------------------
# Tolerated quirks, with exact counts
# ---------------------------------------------------------------------------------------

QUIRKS = (
    "\n\n"  # blank lines before the first header
    ">low lower case sequence\n"
    "acdefghik\n"
    "lmnpq\n"
    ">crlf\r\n"
    "MKV\r\n"
    "LLA\r\n"
    "\n"  # blank line inside a record
    ">star stop codon\n"
    "MKT*\n"
    ">jay\n"
    "AJJB\n"
    ">empty1\n"
    ">empty2 only a star\n"
    "*\n"
    ">spaces\n"
    "AC DE\tFG \n"
    ">last-no-newline\n"
    "WY"
)
QUIRKS_EXPECTED = [
    ("low", "ACDEFGHIKLMNPQ"),
    ("crlf", "MKVLLA"),
    ("star", "MKT"),
    ("jay", "AXXB"),
    ("spaces", "ACDEFG"),
    ("last-no-newline", "WY"),
]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_quirks_exact(tmp_path, block_size, compress):
    data = QUIRKS.encode()
    p = write(tmp_path, "q.fa", gzip.compress(data) if compress else data)
    for reader in (ref_records, fast_records):
        counts = Counter()
        assert reader(p, counts=counts) == QUIRKS_EXPECTED
        assert counts == Counter(empty_sequence=2)


def test_gzip_detected_by_magic_not_suffix(tmp_path):
    gz = write(tmp_path, "noext", gzip.compress(b">a\nACD\n"))
    plain = write(tmp_path, "looks.gz", b">a\nACD\n")
    assert is_gzip(gz) and not is_gzip(plain)
    assert ref_records(gz) == ref_records(plain) == fast_records(gz) == fast_records(plain) == [("a", "ACD")]


def test_utf8_bom_is_ignored(tmp_path, block_size):
    p = write(tmp_path, "bom.fa", b"\xef\xbb\xbf>a\nAC\n>b\nDE\n")
    assert ref_records(p) == fast_records(p) == [("a", "AC"), ("b", "DE")]
    gz = write(tmp_path, "bom.fa.gz", gzip.compress(p.read_bytes()))
    assert fast_records(gz) == [("a", "AC"), ("b", "DE")]


def test_multi_member_gzip(tmp_path):
    p = write(tmp_path, "m.fa.gz", gzip.compress(b">a\nAC\n") + gzip.compress(b">b\nDE\n"))
    assert fast_records(p) == ref_records(p) == [("a", "AC"), ("b", "DE")]


def test_id_is_header_up_to_first_whitespace(tmp_path):
    p = write(tmp_path, "h.fa", ">sp|P1|X_HUMAN Some protein OS=Homo\nAC\n>  lead\nDE\n>\nKL\n>a>b\nMM\n")
    expected = [("sp|P1|X_HUMAN", "AC"), ("lead", "DE"), ("", "KL"), ("a>b", "MM")]
    assert ref_records(p) == fast_records(p) == expected


def test_fast_path_equals_reference_on_sample(sample_fasta):
    ref = ref_records(sample_fasta)
    assert len(ref) == 4000
    assert fast_records(sample_fasta) == ref


def test_sample_counts_match_plain_python(sample_fasta):
    """An independent count with nothing but gzip and str methods."""
    n, residues = 0, 0
    for line in gzip.open(sample_fasta, "rt"):
        line = line.strip()
        if line.startswith(">"):
            n += 1
        else:
            residues += len(line)
    recs = list(read_fasta(sample_fasta))
    assert len(recs) == n == 4000
    assert sum(r.tokens.size for r in recs) == residues == 1_399_646


# ---------------------------------------------------------------------------------------
# Bad input: one line naming file, record and line
# ---------------------------------------------------------------------------------------

BAD = {
    "invalid-char": (
        ">ok\nACDE\n>bad desc\nACDE\nFG#H\n>c\nKL\n",
        "line 5, record 'bad'",
        "invalid character '#' at column 3",
    ),
    "invalid-digit": (">x\nAC1\n", "line 2, record 'x'", "invalid character '1'"),
    "inner-star": (">x\nAC*D\n", "line 2, record 'x'", "invalid character '*'"),
    "double-star": (">x\nACD**\n", "line 2, record 'x'", "invalid character '*'"),
    "gt-in-sequence": (">x\nAC\nD>E\n", "line 3, record 'x'", "invalid character '>'"),
    "before-header": ("ACDE\n>x\nKL\n", "line 1", "sequence data before the first '>' header"),
    "before-header-after-blank": (
        "\n\nACDE\n>x\nKL\n",
        "line 3",
        "sequence data before the first '>' header",
    ),
    "nul": (">x\nAC\n>y\nA\x00C\n", "line 4, record 'y'", "binary data"),
    "not-utf8": (b">x\nAC\n>y\nA\xff\xfeC\n", "line 4, record 'y'", "binary data"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_message(tmp_path, block_size, case):
    data, where, what = BAD[case]
    p = write(tmp_path, f"{case}.fa", data)
    for reader in (ref_records, fast_records):
        with pytest.raises(FastaFormatError) as info:
            reader(p)
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith(f"{p}: {where}"), msg
        assert what in msg, msg


def test_binary_file(tmp_path):
    rng = np.random.default_rng(0)
    p = write(tmp_path, "model.bin", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    p.write_bytes(b"\x89PNG" + p.read_bytes())
    with pytest.raises(FastaFormatError, match=r"model\.bin: line \d+: binary data"):
        fast_records(p)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(FastaFormatError, match=r"nope\.fa: no such file"):
        list(read_fasta(tmp_path / "nope.fa"))
    empty = write(tmp_path, "empty.fa", b"")
    with pytest.raises(FastaFormatError, match=r"empty\.fa: empty file"):
        fast_records(empty)
    with pytest.raises(FastaFormatError, match="is a directory"):
        fast_records(tmp_path)
    only_headers = write(tmp_path, "headers.fa", ">a\n>b\n")
    with pytest.raises(FastaFormatError, match="no FASTA records with a non-empty sequence"):
        fast_records(only_headers)


def test_unreadable_file(tmp_path, monkeypatch):
    p = write(tmp_path, "secret.fa", ">a\nAC\n")
    p.chmod(0)
    monkeypatch.setattr(fasta.os, "access", lambda *a, **k: False)  # also when tests run as root
    with pytest.raises(FastaFormatError, match="permission denied"):
        fast_records(p)


def test_truncated_gzip(tmp_path, sample_fasta):
    data = sample_fasta.read_bytes()
    p = write(tmp_path, "cut.fa.gz", data[: len(data) // 2])
    for reader in (ref_records, fast_records):
        with pytest.raises(FastaFormatError) as info:
            reader(p)
        msg = str(info.value)
        assert msg.startswith(f"{p}: line ") and ", record '" in msg and "truncated gzip" in msg, msg


def test_corrupt_gzip(tmp_path, sample_fasta):
    data = bytearray(sample_fasta.read_bytes())
    for i in range(5000, 5100):
        data[i] ^= 0x5A
    p = write(tmp_path, "bad.fa.gz", bytes(data))
    with pytest.raises(FastaFormatError, match=r"bad\.fa\.gz: line \d+.*corrupt gzip data"):
        fast_records(p)


# ---------------------------------------------------------------------------------------
# on_invalid="skip"
# ---------------------------------------------------------------------------------------

SKIPPY = (
    "junk before any header\n"
    ">a\nACDE\n"
    ">b\nAC#DE\n"  # invalid
    ">c\n\n"  # empty
    ">d\nKL1\n"  # invalid
    ">e\nMKT*\n"
    ">f\nA*C\n"  # invalid
)


def test_skip_counts_per_reason(tmp_path, block_size):
    p = write(tmp_path, "s.fa", SKIPPY)
    for reader in (ref_records, fast_records):
        counts = Counter()
        assert reader(p, "skip", counts) == [("a", "ACDE"), ("e", "MKT")]
        assert counts == Counter(invalid_character=3, empty_sequence=1, data_before_header=1)


def test_tokens_follow_tokenizer_policy(tmp_path):
    seq = "mkvlA\tJ*"
    p = write(tmp_path, "t.fa", f">x\n{seq}\n")
    (rec,) = read_fasta(p)
    np.testing.assert_array_equal(rec.tokens, encode_residues(seq))
    assert rec.tokens.dtype == np.uint8 and rec.line == 1


def test_gzip_padding_garbage_and_bounded_chunks(tmp_path, monkeypatch):
    padded = write(tmp_path, "pad.fa.gz", gzip.compress(b">a\nAC\n") + b"\x00" * 16)
    assert fast_records(padded) == [("a", "AC")]
    garbage = write(tmp_path, "junk.fa.gz", gzip.compress(b">a\nAC\n") + b"not gzip at all")
    with pytest.raises(FastaFormatError, match="corrupt gzip data"):
        fast_records(garbage)
    # 2 MB of one letter compresses ~1000:1; inflated chunks stay bounded by BLOCK_SIZE.
    bomb = write(tmp_path, "bomb.fa.gz", gzip.compress(b">a\n" + b"A" * 2_000_000 + b"\n"))
    monkeypatch.setattr(fasta, "BLOCK_SIZE", 65536)
    sizes = [len(c) for c in fasta._Chunks(bomb)]
    assert max(sizes) <= 65536 and sum(sizes) == 2_000_004
    assert fast_records(bomb) == [("a", "A" * 2_000_000)]
