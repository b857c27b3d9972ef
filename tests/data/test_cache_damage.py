"""Token caches damaged after ``prepare`` (a manifest that is not JSON, a truncated tokens file,
missing or garbage offsets, lost ids) are refused with one line that says how to rebuild them,
and rebuilt silently where the source FASTA is known (``prepare`` again, ``evaluate --fasta FILE``)."""

from __future__ import annotations

import numpy as np
import pytest

from protein_lm.cli import main
from protein_lm.data.cache import prepare_cache
from protein_lm.data.readers import TokenCache

PROTEINS = {"P1": "MKVLAEDFGYWRTSPQNHIC", "P2": "ACDEFGHIKLMNPQRSTVWY", "P3": "WWKKDDEEFFYYLLIIVV"}


def _cache(tmp_path):
    fasta = tmp_path / "small.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in PROTEINS.items()))
    return fasta, prepare_cache([fasta], tmp_path / "cache", progress=False)


def _damage(cache, kind: str) -> None:
    if kind == "manifest not JSON":
        (cache / "manifest.json").write_text('{"format": "protein_lm.token_cache", ')
    elif kind == "tokens truncated":
        raw = (cache / "tokens.u8").read_bytes()
        (cache / "tokens.u8").write_bytes(raw[:-5])
    elif kind == "offsets missing":
        (cache / "offsets.npy").unlink()
    elif kind == "offsets garbage":
        (cache / "offsets.npy").write_bytes(b"\x93NUMPY garbage garbage")
    elif kind == "offsets not increasing":
        offsets = np.load(cache / "offsets.npy")
        offsets[1], offsets[2] = offsets[2], offsets[1]
        np.save(cache / "offsets.npy", offsets)
    elif kind == "offsets of another length":
        np.save(cache / "offsets.npy", np.load(cache / "offsets.npy")[:-1])
    elif kind == "ids lost":
        (cache / "ids.txt").write_text("P1\n")


KINDS = {
    "manifest not JSON": "manifest.json is not valid JSON",
    "tokens truncated": "tokens.u8 has 53 bytes, the manifest says 58 residues",
    "offsets missing": "offsets.npy is missing",
    "offsets garbage": "offsets.npy is not a readable numpy array",
    "offsets not increasing": "offsets.npy is not increasing",
    "offsets of another length": "offsets.npy holds int64 (3,), expected int64 (4,)",
    "ids lost": "ids.txt has 1 lines, the manifest says 3 sequences",
}


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_cache_is_a_one_line_error_that_says_how_to_rebuild(tmp_path, capsys, kind):
    fasta, cache = _cache(tmp_path)
    TokenCache(cache)  # intact: opens
    _damage(cache, kind)
    code = main(["evaluate", "--checkpoint", "checkpoints/performer-softmax-bid-swissprot2014.pt",
                 "--fasta", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"cache {cache} is damaged ({KINDS[kind]})" in err
    rebuild = (f"rerun `protein-lm prepare {fasta} --out {cache} --force`" if kind != "manifest not JSON"
               else f"rerun `protein-lm prepare FASTA --out {cache} --force`")
    assert rebuild in err


@pytest.mark.parametrize("kind", ["tokens truncated", "offsets not increasing", "ids lost"])
def test_prepare_rebuilds_a_damaged_cache_of_unchanged_inputs(tmp_path, capsys, kind):
    fasta, cache = _cache(tmp_path)
    before = {p.name: p.read_bytes() for p in cache.iterdir() if p.name != "manifest.json"}
    _damage(cache, kind)
    assert main(["prepare", str(fasta), "--out", str(cache), "--quiet"]) == 0
    assert "written in" in capsys.readouterr().out  # not "up to date"
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.name != "manifest.json"} == before
    assert [TokenCache(cache).record_id(i) for i in range(3)] == list(PROTEINS)
