"""protein-lm embed: windows of long proteins, pooling, identical inputs, ids, output files, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from protein_lm.cli import main
from protein_lm.data.readers import Protein
from protein_lm.data.tokenizer import encode_residues
from protein_lm.embeddings import embed_proteins, read_embeddings
from protein_lm.inference import frame, window_starts
from tests.conftest import REPO
from tests.helpers.tiny_models import save_tiny, tiny_model

SEQS = {
    "sp|P1|A": "MKTAYIAKQR",
    "sp|P2|B": "MKTAY",
    "tr|Q3|C": "GAVLIPFYWSTCMNQDEKRHGAVLIPFYW",  # 29 residues: 4 windows of 10 in the tiny model
    "dup": "MKTAYIAKQR",
    "pep": "ACD",
}


def _write_fasta(path, seqs):
    path.write_text("".join(f">{k} some description\n{v}\n" for k, v in seqs.items()))
    return path


def test_window_starts_cover_the_protein_and_end_at_its_end():
    assert window_starts(5, 10, 3) == [0]
    assert window_starts(10, 10, 3) == [0]
    assert window_starts(29, 10, 3) == [0, 7, 14, 19]
    for length in range(1, 60):
        starts = window_starts(length, 10, 4)
        covered = set().union(*(range(s, min(s + 10, length)) for s in starts))
        assert covered == set(range(length)) and starts[-1] + min(10, length) == length


def test_long_protein_windows_match_an_explicit_reference():
    model = tiny_model().double()
    seq = encode_residues(SEQS["tr|Q3|C"])
    got = embed_proteins(model, [Protein("x", seq)], layers=[1, -1], window=10, overlap=3, batch_size=3)[0]
    # Reference: each window alone, states summed per residue and divided by the count, in plain loops.
    starts = [0, 7, 14, 19]
    for layer in (1, 2):
        total = np.zeros((len(seq), 32))
        count = np.zeros(len(seq))
        cls = np.zeros(32)
        for s in starts:
            ids = torch.from_numpy(frame(seq[s : s + 10]))[None]
            with torch.no_grad():
                h = model(ids, return_hidden=[layer]).hidden[layer][0].numpy()
            for j in range(10):
                total[s + j] += h[1 + j]
                count[s + j] += 1
            cls += h[0]
        want = total / count[:, None]
        np.testing.assert_allclose(got["per_tok"][layer].numpy(), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["mean"][layer].numpy(), want.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["cls"][layer].numpy(), cls / len(starts), rtol=1e-6, atol=1e-6)
    # The overlap matters: the first window alone gives different states at its last residues.
    with torch.no_grad():
        alone = model(torch.from_numpy(frame(seq[:10]))[None], return_hidden=[2]).hidden[2][0, 1:11]
    assert not torch.allclose(alone[7:].float(), got["per_tok"][2][7:10], atol=1e-4)


def test_cli_writes_ids_shards_and_index(tmp_path):
    ckpt = save_tiny(tmp_path / "tiny.pt")
    fasta = _write_fasta(tmp_path / "in.fasta", SEQS)
    out = tmp_path / "emb"
    rc = main(["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out), "--layers", "0", "-1",
               "--include", "mean", "per_tok", "cls", "--batch-size", "2", "--shard-size", "2", "--quiet"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert list(index["records"]) == list(SEQS)  # ids kept, in file order
    assert index["layers"] == [0, 2] and len(index["shards"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "in.fasta", "tiny.pt"]  # no scratch left
    emb = read_embeddings(out)
    for pid, seq in SEQS.items():
        assert emb[pid]["per_tok"][2].shape == (len(seq), 32)
        assert index["records"][pid]["length"] == len(seq)
        per_tok = emb[pid]["per_tok"][2].double()
        torch.testing.assert_close(emb[pid]["mean"][2].double(), per_tok.sum(0) / len(seq), atol=1e-6, rtol=1e-6)
    # Identical sequences give identical embeddings, whatever they were batched with.
    for kind in ("mean", "per_tok", "cls"):
        for layer in (0, 2):
            torch.testing.assert_close(emb["sp|P1|A"][kind][layer], emb["dup"][kind][layer], atol=1e-6, rtol=1e-6)
    # Layer 0 is the token embedding: it depends on the residue only.
    torch.testing.assert_close(emb["sp|P1|A"]["per_tok"][0][:5], emb["sp|P2|B"]["per_tok"][0], atol=0, rtol=0)
    # A subset read opens only what it needs and gives the same tensors.
    part = read_embeddings(out, ["pep"])
    assert list(part) == ["pep"]
    torch.testing.assert_close(part["pep"]["cls"][0], emb["pep"]["cls"][0], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["duplicate", "out_not_empty", "bad_layer"])
def test_cli_errors_are_one_line(tmp_path, capsys, case):
    ckpt = save_tiny(tmp_path / "tiny.pt")
    seqs = {"a": "MKT", "b": "GAV"} if case != "duplicate" else {"a": "MKT"}
    fasta = _write_fasta(tmp_path / "in.fasta", seqs)
    if case == "duplicate":
        with fasta.open("a") as f:
            f.write(">a again\nGGG\n")
    out = tmp_path / "emb"
    if case == "out_not_empty":
        out.mkdir()
        (out / "old.txt").write_text("x")
    layers = ["7"] if case == "bad_layer" else ["-1"]
    rc = main(["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out), "--quiet",
               "--layers", *layers])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("protein-lm embed: error:")
    assert {"duplicate": "on line 3 was already used on line 1", "out_not_empty": "not an empty directory",
            "bad_layer": "out of range"}[case] in err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".emb.")]  # no scratch left
    if case != "out_not_empty":
        assert not out.exists()


def test_shipped_model_on_the_shipped_sample(tmp_path, sample_fasta):
    from protein_lm.data.fasta import read_fasta

    records = []
    for rec in read_fasta(sample_fasta):
        records.append(rec)
        if len(records) == 6:
            break
    fasta = tmp_path / "six.fasta"
    fasta.write_text("".join(f">{r.id}\n{_letters(r.tokens)}\n" for r in records))
    out = tmp_path / "emb"
    shipped = str(REPO / "checkpoints" / "performer-softmax-bid-swissprot2014.pt")
    assert main(["embed", "--checkpoint", shipped, "--fasta", str(fasta), "--out", str(out), "--quiet",
                 "--include", "mean", "per_tok", "--layers", "-1", "3", "--batch-size", "4"]) == 0
    emb = read_embeddings(out)
    assert list(emb) == [r.id for r in records]
    from protein_lm.checkpoint import read_checkpoint

    cfg = read_checkpoint(shipped)["config"]
    depth, dim = cfg["depth"], cfg["dim"]
    for r in records:
        per_tok = emb[r.id]["per_tok"][depth]
        assert per_tok.shape == (len(r.tokens), dim) and emb[r.id]["mean"][3].shape == (dim,)
        torch.testing.assert_close(emb[r.id]["mean"][depth], per_tok.mean(0), atol=1e-5, rtol=1e-5)


def _letters(tokens) -> str:
    from protein_lm.data.tokenizer import TOKENS

    return "".join(TOKENS[int(t)] for t in tokens)
