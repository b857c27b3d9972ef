"""`protein-lm prepare`: exit codes, one-line errors, summary, no torch at start-up."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from protein_lm.cli import main

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def test_prepare_summary_and_cache_hit(tmp_path, capsys):
    fa = write(tmp_path, "s.fa", ">a\nMKV\n>b\n\n>c\nAC*\n")
    out = tmp_path / "cache"
    assert main(["prepare", str(fa), "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "sequences 2" in text and "residues 5" in text and "empty_sequence 1" in text
    assert json.loads((out / "manifest.json").read_text())["num_residues"] == 5
    assert main(["prepare", str(fa), "--out", str(out), "-q"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["prepare", str(fa), "--out", str(out), "-q", "--force"]) == 0
    assert "written in" in capsys.readouterr().out


BAD_CASES = {
    "missing": (None, "no such file"),
    "empty": (b"", "empty file"),
    "before-header": (b"MKV\n>a\nAC\n", "line 1: sequence data before the first '>' header"),
    "invalid": (b">a\nMKV\n>b\nAC\nA%C\n", "line 5, record 'b' (header on line 3): invalid character '%'"),
    "binary": (b">a\nMK\x00\x01\x02\n", "line 2, record 'a': binary data"),
    "truncated-gz": ("truncated", "truncated gzip file"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, case, sample_fasta):
    data, expected = BAD_CASES[case]
    fa = tmp_path / f"{case}.fa"
    if data == "truncated":
        fa.write_bytes(sample_fasta.read_bytes()[:20000])
    elif data is not None:
        fa.write_bytes(data)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    code = main(["prepare", str(fa), "--out", str(out_parent / "cache"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"protein-lm prepare: error: {fa}")
    assert expected in lines[0]
    assert "Traceback" not in err
    assert list(out_parent.iterdir()) == []  # no cache, no manifest, no temp dir


def test_skip_mode_counts(tmp_path, capsys):
    fa = write(tmp_path, "s.fa", "junk\n>a\nMKV\n>b\nA#\n>c\nB1\n>d\n\n>e\nWW\n")
    out = tmp_path / "c"
    assert main(["prepare", str(fa), "--out", str(out), "--on-invalid", "skip", "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == {"empty_sequence": 1, "invalid_character": 2, "data_before_header": 1}
    assert (m["num_sequences"], m["num_residues"]) == (2, 5)
    assert "invalid_character 2" in capsys.readouterr().out


def test_gzip_and_plain_identical_via_cli(tmp_path, sample_fasta):
    plain = write(tmp_path, "sample.fasta", gzip.decompress(sample_fasta.read_bytes()))
    assert main(["prepare", str(sample_fasta), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert main(["prepare", str(plain), "--out", str(tmp_path / "b"), "-q"]) == 0
    for f in ("tokens.u8", "offsets.npy", "ids.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_prepare_does_not_import_torch(tmp_path):
    fa = write(tmp_path, "s.fa", ">a\nMKV\n")
    code = (
        "import sys\n"
        "import protein_lm.commands.prepare, protein_lm.data.cache, protein_lm.data.readers, protein_lm.data.fasta\n"
        "from protein_lm.cli import main\n"
        f"assert main(['prepare', {str(fa)!r}, '--out', {str(tmp_path / 'c')!r}, '-q']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pytorch_lightning', 'lightning'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_progress_goes_to_stderr(tmp_path, monkeypatch, capsys, sample_fasta):
    from protein_lm.data.progress import ReadProgress

    monkeypatch.setattr(ReadProgress, "DELAY", 0.0)
    monkeypatch.setattr(ReadProgress, "INTERVAL_LOG", 0.0)
    assert main(["prepare", str(sample_fasta), "--out", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    assert "prepare: swissprot_sample.fasta.gz:" in captured.err and "MB read" in captured.err
    assert "MB read" not in captured.out
