"""Inputs that are valid but suspicious, or odd files: nucleotide records, duplicate and empty ids,
CR-only line endings, dangling links, pipes; `evaluate`'s option ranges; and the evaluation of
many tiny records / one very long protein (packed batches, unscored rows skipped) checked against
a plain per-example loop."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from protein_lm.attention.ops.favor import favor_bidirectional
from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.cli import main
from protein_lm.data.cache import prepare_cache
from protein_lm.data.datamodule import ProteinDataModule
from protein_lm.data.readers import TokenCache
from protein_lm.lit_module import token_statistics
from protein_lm.model import ModelConfig, ProteinLM

PROTEIN = "MKVLAEDFGYWRTSPQNHICDDEKFY"
DNA = "ACGTTGCAACGTAGCTAGCTAGGATCCA"  # 28 letters, all A/C/G/T


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_nucleotide_duplicate_and_empty_ids_are_warned_once_per_file_with_counts(tmp_path, capsys):
    a = tmp_path / "a.fasta"
    a.write_text(f">p1\n{PROTEIN}\n>dna1\n{DNA}\n>p1\n{PROTEIN}K\n>dna2\n{DNA.lower()}\n>\n{PROTEIN}\n>p1\nGAG\n")
    b = tmp_path / "b.fasta"
    b.write_text(f">q\n{PROTEIN}\n")
    code, _, err = _run(capsys, "prepare", a, b, "--out", tmp_path / "cache", "--quiet")
    assert code == 0
    warnings = [ln for ln in err.splitlines() if ln.startswith("protein-lm: warning:")]
    assert warnings == [
        f"protein-lm: warning: {a}: 2 records look like nucleotide sequences (only A/C/G/T/U/N, first 'dna1'); "
        "they are kept as protein: is this the right file?",
        f"protein-lm: warning: {a}: 2 records repeat the id of an earlier record; outputs keyed by id will hold "
        "several entries for it",
        f"protein-lm: warning: {a}: 1 records have an empty id (a bare '>')",
    ]  # GAG (3 residues) is too short to count as nucleotide; b.fasta is clean: no line for it
    cache = TokenCache(tmp_path / "cache")
    assert len(cache) == 7  # all kept
    recorded = cache.manifest["inputs"][0]
    assert (recorded["nucleotide_records"], recorded["duplicate_ids"], recorded["empty_ids"]) == (2, 2, 1)
    code, _, err = _run(capsys, "prepare", a, b, "--out", tmp_path / "cache", "--quiet")  # cache hit: silent
    assert code == 0 and "warning" not in err


def test_cr_only_line_endings_are_read_like_lf(tmp_path):
    lf = tmp_path / "lf.fasta"
    lf.write_text(f">a desc\n{PROTEIN[:10]}\n{PROTEIN[10:]}\n>b\n{PROTEIN[::-1]}\n")
    cr = tmp_path / "cr.fasta"
    cr.write_bytes(lf.read_bytes().replace(b"\n", b"\r"))
    one, two = (TokenCache(prepare_cache([p], tmp_path / p.stem, progress=False)) for p in (lf, cr))
    assert len(two) == 2 and [two.record_id(i) for i in range(2)] == ["a", "b"]
    assert np.array_equal(np.asarray(one.tokens), np.asarray(two.tokens))
    assert np.array_equal(np.asarray(one.offsets), np.asarray(two.offsets))


def test_dangling_symlink_names_the_link_and_its_target(tmp_path, capsys):
    link = tmp_path / "data.fasta"
    link.symlink_to(tmp_path / "moved-away.fasta")
    code, _, err = _run(capsys, "prepare", link, "--out", tmp_path / "cache")
    assert code == 2
    assert err.strip() == (f"protein-lm prepare: error: {link}: a symbolic link to {tmp_path / 'moved-away.fasta'}, "
                           "which does not exist")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_pipe_is_refused_with_what_to_do(tmp_path, capsys):
    fifo = tmp_path / "in.fasta"
    os.mkfifo(fifo)
    code, _, err = _run(capsys, "prepare", fifo, "--out", tmp_path / "cache")
    assert code == 2 and f"{fifo}: a pipe: the token cache records each input's size" in err
    assert "zcat x.gz > x.fasta" in err and len(err.strip().splitlines()) == 1


# -- evaluate ---------------------------------------------------------------------------


def _tiny_model(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, depth=2, heads=2, ff_dim=32, num_features=16, favor_backend="torch", feature_seed=0,
                      max_length=64)
    model = ProteinLM(cfg).eval()
    return model, save_weights(weights_payload(cfg, "mlm", model.state_dict()), tmp_path / "tiny.pt")


@pytest.mark.parametrize("option, value, message", [
    ("--max-length", "0", "--max-length must be >= 3 (<cls>, one residue, <eos>), got 0"),
    ("--max-length", "2", "--max-length must be >= 3 (<cls>, one residue, <eos>), got 2"),
    ("--seed", "-1", "--seed must be >= 0, got -1"),
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--max-sequences", "0", "--max-sequences must be >= 1, got 0"),
])
def test_evaluate_option_ranges(tmp_path, capsys, sample_fasta, option, value, message):
    _, ckpt = _tiny_model(tmp_path)
    code, _, err = _run(capsys, "evaluate", "--checkpoint", ckpt, "--fasta", sample_fasta, option, value)
    assert code == 2 and err.strip() == f"protein-lm evaluate: error: {message}"


def test_evaluate_of_tiny_records_and_a_long_protein_equals_a_per_example_loop(tmp_path, capsys):
    """Packed batches (hundreds of rows) and skipped unscored rows give the numbers of one example at a time."""
    model, ckpt = _tiny_model(tmp_path)
    rng = np.random.default_rng(0)
    amino = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    records = [amino[rng.integers(20)] for _ in range(600)] + ["".join(rng.choice(amino, 700))]
    fasta = tmp_path / "mixed.fasta"
    fasta.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(records)))
    code, out, err = _run(capsys, "evaluate", "--checkpoint", ckpt, "--fasta", fasta, "--max-length", "32",
                          "--quiet", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads(out)

    # Reference: the same examples (same windows, same seeded masks), one per forward, in float64 sums.
    dm = ProteinDataModule(data_dir=str(fasta), mode="single", max_length=32, objective="mlm", batch_size=1,
                           seed=0, pin_memory=False)
    loader = dm.evaluation_dataloader(str(fasta))
    dataset = loader.dataset
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = dataset[(0, np.array([i]))]
            logits = model(batch["input_ids"], batch["padding_mask"]).logits
            loss_sum, right, n = token_statistics(logits.double(), batch["labels"])
            total, correct, count = total + float(loss_sum), correct + int(right), count + int(n)
    assert len(dataset) == 600 + 24  # 700 residues in windows of 30
    assert result["num_tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["accuracy"] == pytest.approx(correct / count, abs=1e-6)  # float32; one token = 1/count


def test_evaluate_packs_tiny_records_into_few_batches(tmp_path):
    fasta = tmp_path / "tiny.fasta"
    fasta.write_text("".join(f">t{i}\nM\n" for i in range(5000)))
    dm = ProteinDataModule(data_dir=str(fasta), mode="single", max_length=64, objective="mlm", batch_size=8,
                           seed=0, pin_memory=False)
    loader = dm.evaluation_dataloader(str(fasta), tokens_per_batch=8 * 64, max_rows=100)
    sizes = [len(b["input_ids"]) for b in loader]
    assert sum(sizes) == 5000 and max(sizes) == 100 and len(sizes) == 50  # 8 x 64 / 3 = 170 > 100 rows


@pytest.mark.parametrize("length", [3, 40, 200])
def test_favor_bidirectional_short_row_order_matches_float64(length):
    """Both product orders (chosen by length) equal the formula computed in float64."""
    g = torch.Generator().manual_seed(length)
    phi_q = torch.rand(2, 3, length, 256, generator=g)
    phi_k = torch.rand(2, 3, length, 256, generator=g)
    v = torch.randn(2, 3, length, 64, generator=g)
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, length // 2 + 1:] = True
    out = favor_bidirectional(phi_q, phi_k, v, pad)
    keep = (~pad)[:, None, :, None].double()
    scores = phi_q.double() @ (phi_k.double() * keep).transpose(-1, -2)
    reference = (scores @ (v.double() * keep)) / scores.sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)


def test_distinct_rows_rebuilds_every_row_and_its_padding():
    from protein_lm.commands.evaluate import distinct_rows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 7, (200, 3), generator=g)
    ids[::7, 2] = 1  # some padded rows
    pad = ids.eq(1)
    rows, row_pad, inverse = distinct_rows(ids, pad)
    assert rows.shape[0] == len({tuple(r) for r in ids.tolist()}) < 200  # brute-force count of distinct rows
    assert torch.equal(rows[inverse], ids) and torch.equal(row_pad[inverse], pad)
    unique = torch.arange(12).reshape(4, 3)
    same, same_pad, order = distinct_rows(unique, unique.eq(-1))
    assert same is unique and torch.equal(order, torch.arange(4))
