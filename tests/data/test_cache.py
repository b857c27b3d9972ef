"""Token cache: format, atomic writes, cache hits and rebuilds, TokenCache reading."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from protein_lm.data import cache as cache_mod
from protein_lm.data.cache import ensure_cache, prepare, prepare_cache
from protein_lm.data.fasta import read_fasta
from protein_lm.data.readers import TokenCache
from protein_lm.data.tokenizer import ALPHABET_VERSION, decode
from protein_lm.errors import FastaFormatError, UserError

SMALL = ">a desc\nMKV\nLA\n>b\n\n>c\nacd*\n>d\nJJ\n"


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def cache_bytes(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in ("tokens.u8", "offsets.npy", "ids.txt")}


def test_format_and_manifest(tmp_path):
    fa = write(tmp_path, "s.fa", SMALL)
    out = prepare_cache([fa], tmp_path / "c", progress=False)
    assert out == (tmp_path / "c").resolve()
    assert sorted(p.name for p in out.iterdir()) == [
        "hashes.json",
        "hashes.npy",
        "ids.txt",
        "manifest.json",
        "offsets.npy",
        "tokens.u8",
    ]
    offsets = np.load(out / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 5, 8, 10]
    tokens = np.fromfile(out / "tokens.u8", dtype=np.uint8)
    assert decode(tokens) == "MKVLAACDXX" and tokens.min() >= 4 and tokens.max() <= 30
    assert (out / "ids.txt").read_text() == "a\nc\nd\n"
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "protein_lm.token_cache" and m["version"] == 1
    assert m["alphabet_version"] == ALPHABET_VERSION
    assert (m["num_sequences"], m["num_residues"]) == (3, 10)
    assert m["skipped"] == {"empty_sequence": 1, "invalid_character": 0, "data_before_header": 0}
    (inp,) = m["inputs"]
    assert inp["path"] == str(fa.resolve()) and inp["size"] == fa.stat().st_size
    import hashlib

    assert inp["sha256"] == hashlib.sha256(fa.read_bytes()).hexdigest()
    assert "created" in m


def test_token_cache_reader(tmp_path):
    out = prepare_cache([write(tmp_path, "s.fa", SMALL)], tmp_path / "c", progress=False)
    c = TokenCache(out)
    assert len(c) == 3 and c.num_residues == 10
    assert [decode(c.sequence(i)) for i in range(3)] == ["MKVLA", "ACD", "XX"]
    assert decode(c[-1]) == "XX"
    assert c.lengths.tolist() == [5, 3, 2] and c.lengths.dtype == np.int64
    assert [c.record_id(i) for i in range(3)] == ["a", "c", "d"]
    assert isinstance(c.tokens, np.memmap) and c.offsets[-1] == 10
    assert c.manifest["num_sequences"] == 3
    with pytest.raises(IndexError):
        c.sequence(3)
    c2 = pickle.loads(pickle.dumps(c))  # DataLoader workers: pickled by path, re-mapped
    assert len(pickle.dumps(c)) < 2000
    assert decode(c2.sequence(0)) == "MKVLA" and c2.record_id(2) == "d"
    with pytest.raises(UserError, match="not a complete token cache"):
        TokenCache(tmp_path)


def test_gzip_and_plain_give_identical_caches(tmp_path, sample_fasta):
    plain = write(tmp_path, "sample.fasta", gzip.decompress(sample_fasta.read_bytes()))
    a = prepare_cache([sample_fasta], tmp_path / "gz", progress=False)
    b = prepare_cache([plain], tmp_path / "plain", progress=False)
    assert cache_bytes(a) == cache_bytes(b)


def test_realistic_sample_counts_and_content(tmp_path, sample_fasta):
    """Counts equal an independent plain-Python count; content equals the reference parser."""
    ids, seqs = [], []
    with gzip.open(sample_fasta, "rt") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith(">"):
                ids.append(line[1:].split()[0])
                seqs.append([])
            else:
                seqs[-1].append(line.strip())
    seqs = ["".join(s) for s in seqs]
    out = prepare_cache([sample_fasta], tmp_path / "c", progress=False)
    c = TokenCache(out)
    assert c.manifest["num_sequences"] == len(c) == len(ids) == 4000
    assert c.manifest["num_residues"] == sum(map(len, seqs)) == 1_399_646
    assert [c.record_id(i) for i in range(len(c))] == ids
    # The figures data/README.md quotes for the sample.
    assert (int(np.median(c.lengths)), int(c.lengths.max())) == (295, 3412)
    for i in range(0, 4000, 97):
        assert decode(c.sequence(i)) == seqs[i]
    for i, rec in enumerate(read_fasta(sample_fasta)):
        assert rec.id == ids[i]
        np.testing.assert_array_equal(rec.tokens, c.sequence(i))


def test_cache_hit_and_rebuild(tmp_path):
    fa = write(tmp_path, "s.fa", SMALL)
    r1 = prepare([fa], tmp_path / "c", progress=False)
    assert not r1.hit
    r2 = prepare([fa], tmp_path / "c", progress=False)
    assert r2.hit and r2.manifest == r1.manifest
    # Touched but identical content: still a hit (sha256 decides), new mtime remembered.
    os.utime(fa, ns=(1, 1))
    r3 = prepare([fa], tmp_path / "c", progress=False)
    assert r3.hit and r3.manifest["inputs"][0]["mtime_ns"] == 1
    # Changed content: rebuilt.
    fa.write_text(SMALL + ">e\nWW\n")
    r4 = prepare([fa], tmp_path / "c", progress=False)
    assert not r4.hit and r4.manifest["num_sequences"] == 4
    assert TokenCache(tmp_path / "c").record_id(3) == "e"
    # Same size, same mtime forced, different content: the fast check is fooled only
    # if both match; change the size-preserving content and mtime -> sha256 catches it.
    st = fa.stat()
    fa.write_text((SMALL + ">e\nWW\n").replace("WW", "YY"))
    os.utime(fa, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    r5 = prepare([fa], tmp_path / "c", progress=False)
    assert not r5.hit and decode(TokenCache(tmp_path / "c").sequence(3)) == "YY"
    # force rebuilds; different input list rebuilds.
    assert not prepare([fa], tmp_path / "c", progress=False, force=True).hit
    other = write(tmp_path, "t.fa", ">z\nKK\n")
    r6 = prepare([fa, other], tmp_path / "c", progress=False)
    assert not r6.hit and r6.manifest["num_sequences"] == 5


def test_on_invalid_policy_in_cache_hit(tmp_path):
    fa = write(tmp_path, "s.fa", SMALL + ">bad\nA#\n")
    r = prepare([fa], tmp_path / "c", on_invalid="skip", progress=False)
    assert r.manifest["skipped"]["invalid_character"] == 1
    assert prepare([fa], tmp_path / "c", on_invalid="skip", progress=False).hit
    with pytest.raises(FastaFormatError, match="line 11, record 'bad' \\(header on line 10\\)"):
        prepare([fa], tmp_path / "c", on_invalid="error", progress=False)
    assert TokenCache(tmp_path / "c").manifest["on_invalid"] == "skip"  # old cache untouched


@pytest.mark.parametrize(
    "bad",
    [
        ">a\nAC\n>b\nA#C\n",
        "AC\n>a\nAC\n",
        ">a\nAC\x00\n",
        ">a\n\n>b\n",
    ],
    ids=["invalid-char", "before-header", "binary", "all-empty"],
)
def test_rejected_input_leaves_nothing(tmp_path, bad):
    fa = write(tmp_path, "bad.fa", bad)
    out = tmp_path / "out" / "cache"
    with pytest.raises(UserError):
        prepare_cache([fa], out, progress=False)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temp dir left behind either


def test_crash_mid_write_leaves_old_cache_intact(tmp_path, monkeypatch):
    fa = write(tmp_path, "s.fa", SMALL)
    out = prepare_cache([fa], tmp_path / "c", progress=False)
    before = cache_bytes(out)
    fa.write_text(SMALL + ">e\nWW\n")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache_mod, "_write_offsets", boom)
    with pytest.raises(RuntimeError):
        prepare_cache([fa], out, progress=False)
    assert cache_bytes(out) == before and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "s.fa"]


def test_refuses_foreign_directory(tmp_path):
    fa = write(tmp_path, "s.fa", SMALL)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not part of a token cache"):
        prepare_cache([fa], tmp_path / "docs", progress=False)
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_several_inputs_in_order_with_workers(tmp_path, sample_fasta):
    a = write(tmp_path, "a.fa", SMALL)
    b = write(tmp_path, "b.fa", ">x\nWWW\n>y\nYY\n")
    serial = prepare_cache([a, sample_fasta, b], tmp_path / "s", progress=False, workers=1)
    parallel = prepare_cache([a, sample_fasta, b], tmp_path / "p", progress=False, workers=3)
    assert cache_bytes(serial) == cache_bytes(parallel)
    c = TokenCache(parallel)
    assert len(c) == 3 + 4000 + 2
    assert [c.record_id(i) for i in (0, 3, len(c) - 1)] == ["a", "Q1C286", "y"]
    assert [i["num_sequences"] for i in c.manifest["inputs"]] == [3, 4000, 2]


def test_constant_memory_blocks(tmp_path, monkeypatch):
    """Tiny blocks (records straddling many chunks) give the same cache as one block."""
    from protein_lm.data import fasta

    data = "".join(f">r{i}\n" + "ACDEFGHIKLMNPQRSTVWY"[: 1 + i % 20] * (1 + i % 7) + "\n" for i in range(300))
    fa = write(tmp_path, "m.fa", data)
    big = prepare_cache([fa], tmp_path / "big", progress=False)
    monkeypatch.setattr(fasta, "BLOCK_SIZE", 50)
    monkeypatch.setattr(fasta, "READ_SIZE", 50)
    small = prepare_cache([fa], tmp_path / "small", progress=False)
    assert cache_bytes(big) == cache_bytes(small)


def test_ensure_cache(tmp_path, monkeypatch):
    fa = write(tmp_path, "my.fasta", SMALL)
    monkeypatch.setenv("PROTEIN_LM_CACHE", str(tmp_path / "root"))
    c1 = ensure_cache(fa, progress=False)
    assert c1.parent == tmp_path / "root" and c1.name.startswith("my-")
    assert ensure_cache(fa, progress=False) == c1  # same file: same cache
    assert ensure_cache(c1) == c1  # a cache dir is returned as is
    c2 = ensure_cache(fa, cache_root=tmp_path / "elsewhere", progress=False)
    assert c2.parent == tmp_path / "elsewhere"
    fa.write_text(SMALL + ">e\nWW\n")
    os.utime(fa, ns=(5, 5))
    c3 = ensure_cache(fa, progress=False)
    assert c3 != c1 and len(TokenCache(c3)) == 4
    with pytest.raises(UserError, match="not a token cache"):
        ensure_cache(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        ensure_cache(tmp_path / "missing.fa")


def test_unwritable_output_is_one_line_error(tmp_path):
    fa = write(tmp_path, "s.fa", SMALL)
    with pytest.raises(UserError, match="cannot create the cache directory"):
        prepare_cache([fa], tmp_path / "s.fa" / "cache", progress=False)
