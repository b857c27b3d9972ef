"""protein-lm score: PLL, causal log-likelihood and variant scores against explicit float64 loops."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from protein_lm.cli import main
from protein_lm.data.readers import Protein
from protein_lm.data.tokenizer import MASK_ID, TOKEN_TO_ID, encode_residues
from protein_lm.inference import frame, window_starts
from protein_lm.scoring import read_mutations, score_mutations, score_sequences
from tests.conftest import REPO
from tests.helpers.tiny_models import save_tiny, tiny_model

SEQS = {"pep": "ACD", "short": "MKTAYIAKQR", "long": "GAVLIPFYWSTCMNQDEKRHGAVLIPFYW"}  # long: 29 > window 10


def _proteins():
    return [Protein(k, encode_residues(v)) for k, v in SEQS.items()]


def _logp(model, row):
    with torch.no_grad():
        return model(torch.from_numpy(row)[None]).logits[0].double().log_softmax(-1)


def _reference_window(p, n, causal, window=10, overlap=5):
    """The window giving residue p the most context, found by scanning every window."""
    best, best_margin = None, -1
    for s in window_starts(n, window, overlap):
        end = s + min(window, n)
        if s <= p < end:
            margin = p - s if causal else min(p - s, end - 1 - p)
            if margin > best_margin:
                best, best_margin = s, margin
    return best


def test_pll_matches_an_explicit_masking_loop():
    model = tiny_model().double()
    proteins = _proteins()
    got = score_sequences(model, proteins, window=10, overlap=5, batch_size=4)
    for prot, value in zip(proteins, got, strict=True):
        x, n, want = prot.tokens, len(prot.tokens), 0.0
        for p in range(n):
            s = _reference_window(p, n, causal=False)
            row = frame(x[s : s + 10])
            row[1 + p - s] = MASK_ID
            want += float(_logp(model, row)[1 + p - s, int(x[p])])
        assert value == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[0] < 0 and len(set(got)) == 3


def test_causal_log_likelihood_matches_prefix_by_prefix_scoring():
    model = tiny_model(causal=True).double()
    proteins = _proteins()
    got = score_sequences(model, proteins, window=10, overlap=5, batch_size=3)
    for prot, value in zip(proteins, got, strict=True):
        x, n, want = prot.tokens, len(prot.tokens), 0.0
        for p in range(n):
            s = _reference_window(p, n, causal=True)
            prefix = frame(x[s:p])[:-1]  # <cls> and the residues of this window left of p
            want += float(_logp(model, prefix)[-1, int(x[p])])
        assert value == pytest.approx(want, rel=1e-10, abs=1e-10)


def _write(tmp_path, rows):
    fasta = tmp_path / "wt.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in SEQS.items()))
    muts = tmp_path / "m.csv"
    muts.write_text("id,mutation\n" + "".join(f"{i},{m}\n" for i, m in rows))
    return fasta, muts


def test_variant_scores_match_explicit_masked_and_wildtype_marginals(tmp_path):
    model = tiny_model().double()
    proteins = {p.id: p for p in _proteins()}
    rows = [("short", "K2P"), ("short", "M1A:Q9E"), ("pep", "D3W"), ("long", "R19A:H20T"), ("long", "G1A")]
    _, path = _write(tmp_path, rows)
    mutations = read_mutations(path, proteins)
    got = score_mutations(model, proteins, mutations, window=10, overlap=5, batch_size=2)
    for (pid, text), scores in zip(rows, got, strict=True):
        x = proteins[pid].tokens
        subs = [(int(s[1:-1]) - 1, TOKEN_TO_ID[s[0]], TOKEN_TO_ID[s[-1]]) for s in text.split(":")]
        starts = [s for s in window_starts(len(x), 10, 5)
                  if all(s <= p < s + min(10, len(x)) for p, _, _ in subs)]
        s = max(starts, key=lambda s: (min(min(p - s, s + min(10, len(x)) - 1 - p) for p, _, _ in subs), -s))
        row = frame(x[s : s + 10])
        masked = row.copy()
        for p, _, _ in subs:
            masked[1 + p - s] = MASK_ID
        lm, lw = _logp(model, masked), _logp(model, row)
        want_mm = sum(float(lm[1 + p - s, mt] - lm[1 + p - s, wt]) for p, wt, mt in subs)
        want_wm = sum(float(lw[1 + p - s, mt] - lw[1 + p - s, wt]) for p, wt, mt in subs)
        assert scores["masked_marginal"] == pytest.approx(want_mm, rel=1e-12, abs=1e-12)
        assert scores["wildtype_marginal"] == pytest.approx(want_wm, rel=1e-12, abs=1e-12)
    # The two scorings differ (masking changes the context).
    assert got[1]["masked_marginal"] != pytest.approx(got[1]["wildtype_marginal"])


def test_causal_variant_score_is_the_log_likelihood_difference(tmp_path):
    model = tiny_model(causal=True).double()
    proteins = {p.id: p for p in _proteins()}
    _, path = _write(tmp_path, [("short", "A4G:K8R")])
    got = score_mutations(model, proteins, read_mutations(path, proteins), window=10, overlap=5)
    mutant = proteins["short"].tokens.copy()
    mutant[3], mutant[7] = TOKEN_TO_ID["G"], TOKEN_TO_ID["R"]
    wt, mt = score_sequences(model, [proteins["short"], Protein("m", mutant)], window=10, overlap=5)
    assert got[0]["delta_log_likelihood"] == pytest.approx(mt - wt, rel=1e-12)


def test_cli_scores_the_shipped_sample_and_a_3_residue_peptide(tmp_path, sample_fasta):
    import gzip

    ckpt = save_tiny(tmp_path / "tiny.pt")
    with gzip.open(sample_fasta, "rt") as f:
        text = f.read()
    records = text.split(">")[1:4]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(">" + r for r in records) + ">pep\nACD\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [r.split()[0] for r in records] + ["pep"]
    for r in rows:
        assert float(r["pll_per_residue"]) == pytest.approx(float(r["pll"]) / int(r["length"]), abs=1e-5)
        assert float(r["pll"]) < 0
    assert rows[-1]["length"] == "3"
    muts = tmp_path / "m.csv"
    muts.write_text("id,mutation\npep,A1G\npep,C2W:D3E\n")
    out2 = tmp_path / "variants.csv"
    assert main(["score", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out2),
                 "--mutations", str(muts), "--quiet"]) == 0
    rows = list(csv.DictReader(out2.open()))
    assert [(r["id"], r["mutation"]) for r in rows] == [("pep", "A1G"), ("pep", "C2W:D3E")]
    assert set(rows[0]) == {"id", "mutation", "masked_marginal", "wildtype_marginal"}
    assert np.isfinite([float(r["masked_marginal"]) for r in rows]).all()


@pytest.mark.parametrize("mutation,message", [
    ("K2P:X3A", "has T at position 3, not X"),
    ("short,Q11A", "position 11 is outside short (1..10)"),
    ("nope,A1G", "id 'nope' is not in the FASTA file"),
    ("short,K2", "expected substitutions like A23P"),
    ("short,K2P:K2A", "mutated twice"),
])
def test_bad_mutation_rows_are_one_line_errors_naming_the_line(tmp_path, capsys, mutation, message):
    ckpt = save_tiny(tmp_path / "tiny.pt")
    row = mutation if "," in mutation else f"short,{mutation}"
    fasta, muts = _write(tmp_path, [("short", "K2P")])
    muts.write_text(muts.read_text() + row + "\n")
    out = tmp_path / "v.csv"
    rc = main(["score", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out),
               "--mutations", str(muts), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("protein-lm score: error:")
    assert f"{muts} line 3" in err and message in err
    assert not out.exists()


def test_shipped_model_scores_short_sample_proteins_and_variants(tmp_path, sample_fasta):
    from protein_lm.data.fasta import read_fasta
    from protein_lm.data.tokenizer import TOKENS

    short = []
    for rec in read_fasta(sample_fasta):
        if len(rec.tokens) <= 70:
            short.append(rec)
        if len(short) == 2:
            break
    fasta = tmp_path / "short.fasta"
    fasta.write_text("".join(f">{r.id}\n{''.join(TOKENS[int(t)] for t in r.tokens)}\n" for r in short))
    first = short[0]
    wt = TOKENS[int(first.tokens[4])]
    mt = "W" if wt != "W" else "A"
    muts = tmp_path / "m.csv"
    muts.write_text(f"id,mutation\n{first.id},{wt}5{mt}\n{first.id},{wt}5{wt}\n")
    shipped = str(REPO / "checkpoints" / "performer-softmax-bid-swissprot2014.pt")
    out = tmp_path / "s.csv"
    assert main(["score", "--checkpoint", shipped, "--fasta", str(fasta), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [r.id for r in short]
    # an under-trained model still beats uniform guessing over the 33 tokens
    assert all(-np.log(33) < float(r["pll_per_residue"]) < 0 for r in rows)
    out = tmp_path / "v.csv"
    assert main(["score", "--checkpoint", shipped, "--fasta", str(fasta), "--out", str(out), "--quiet",
                 "--mutations", str(muts)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert float(rows[1]["masked_marginal"]) == 0.0 == float(rows[1]["wildtype_marginal"])  # a synonymous "variant"
    assert float(rows[0]["masked_marginal"]) != 0.0
