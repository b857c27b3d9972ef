"""Masked-LM substitution readout, batched accumulation, and the new `analyze` outputs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from protein_lm.analysis.attention_maps import accumulate_similarity, frame_batch, length_batches
from protein_lm.analysis.substitution import (
    SubstitutionAccumulator,
    masked_positions,
    score_batch,
    substitution_log_odds,
)
from protein_lm.analysis.vig import VigAccumulator
from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.cli import main
from protein_lm.data.tokenizer import MASK_ID, STANDARD_AA_IDS, VOCAB_SIZE
from protein_lm.model import ModelConfig, ProteinLM


class OracleModel(nn.Module):
    """Predicts ``T[true residue]`` at every masked position (it remembers the unmasked input)."""

    def __init__(self, original: torch.Tensor, table: np.ndarray, causal: bool = False):
        super().__init__()
        self.config = SimpleNamespace(causal=causal)
        self.original = original
        self.table = torch.tensor(np.log(table))

    def forward(self, input_ids, padding_mask=None):
        B, L = input_ids.shape
        logits = torch.full((B, L, VOCAB_SIZE), -1e9, dtype=torch.float64)
        for b in range(B):
            for t in range(L):
                # masked LM: the residue at t; causal: the residue at t + 1
                target = self.original[b, t] if not self.config.causal else self.original[b, min(t + 1, L - 1)]
                if int(target) in STANDARD_AA_IDS:
                    logits[b, t, list(STANDARD_AA_IDS)] = self.table[STANDARD_AA_IDS.index(int(target))]
        if not self.config.causal:
            assert (input_ids == MASK_ID).any()
        return SimpleNamespace(logits=logits)


def _table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(20), size=20)


@pytest.mark.parametrize("causal", [False, True])
def test_counts_equal_the_known_predictions(causal):
    rng = np.random.default_rng(1)
    seqs = [rng.choice(STANDARD_AA_IDS, n) for n in (30, 17, 5)]
    ids = frame_batch(seqs)
    table = _table()
    acc = SubstitutionAccumulator()
    score_batch(OracleModel(ids, table, causal), ids, ids.eq(1), acc, np.random.default_rng(0))
    types = np.array([[STANDARD_AA_IDS.index(int(t)) if int(t) in STANDARD_AA_IDS else -1 for t in r] for r in ids])
    if causal:
        scored = types[:, 1:][types[:, 1:] >= 0]  # every residue
    else:
        gen = np.random.default_rng(0)
        scored = np.concatenate([types[b][masked_positions(types[b], gen)] for b in range(len(seqs))])
    expected = np.zeros((20, 20))
    for a in scored:
        expected[a] += table[a]
    np.testing.assert_allclose(acc.counts, expected, rtol=1e-6, atol=1e-9)
    assert acc.num_positions == len(scored)
    assert acc.num_correct == int((table.argmax(1)[scored] == scored).sum())


def test_masked_positions_are_15_percent_of_standard_residues_and_seeded():
    types = np.array([-1] + [3] * 40 + [-1, 5, -1])
    a = masked_positions(types, np.random.default_rng(7))
    b = masked_positions(types, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert len(a) == round(0.15 * 41) and (types[a] >= 0).all() and len(set(a)) == len(a)
    assert len(masked_positions(np.array([-1, 2, -1]), np.random.default_rng(0))) == 1  # at least one
    assert len(masked_positions(np.array([-1, -1]), np.random.default_rng(0))) == 0


def test_log_odds_closed_form():
    counts = np.random.default_rng(3).random((20, 20)) * 10
    expected = np.zeros((20, 20))
    total = counts.sum()
    for a in range(20):
        for b in range(20):
            pa, pb = counts[a].sum() / total, counts[:, b].sum() / total
            expected[a, b] = np.log2(counts[a, b] / total / (pa * pb))
    np.testing.assert_allclose(substitution_log_odds(counts), (expected + expected.T) / 2, rtol=1e-12)
    # A model predicting the same distribution q everywhere gives exactly no structure.
    n = np.random.default_rng(5).integers(1, 50, 20).astype(float)
    q = np.random.default_rng(4).dirichlet(np.ones(20))
    assert np.abs(substitution_log_odds(np.outer(n, q))).max() < 1e-12
    assert np.isnan(substitution_log_odds(np.zeros((20, 20)))).all()


def test_length_batches_cover_every_protein_once_within_the_budget():
    seqs = [(str(i), np.zeros(n, dtype=np.int64)) for i, n in enumerate([5, 300, 12, 40, 40, 3000, 7])]
    batches = list(length_batches(seqs, 400))
    assert sorted(i for b in batches for i, _ in b) == sorted(i for i, _ in seqs)
    for b in batches:
        width = max(len(t) for _, t in b) + 2
        assert len(b) == 1 or len(b) * width <= 400


@pytest.mark.parametrize(
    "attention, causal",
    [("performer-softmax", False), ("performer-relu", False), ("exact", False), ("exact", True),
     ("performer-softmax", True)],
)
def test_batching_does_not_change_any_statistic(attention, causal):
    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(dim=16, depth=2, heads=2, ff_dim=32, num_features=32, favor_backend="torch",
                                  feature_seed=0, attention=attention, causal=causal)).eval()
    rng = np.random.default_rng(5)
    seqs = [(f"p{i}", rng.choice(STANDARD_AA_IDS, n)) for i, n in enumerate([23, 9, 41, 9, 17])]
    results = []
    for tokens in (1, 128, 10_000):
        vig, sub = VigAccumulator(2, 2), SubstitutionAccumulator()
        acc = accumulate_similarity(model, seqs, vig=vig, substitution=sub, batch_tokens=tokens, seed=3)
        results.append((acc.mass, acc.baseline, vig.sums["soft"], vig.sums["exact"], sub.counts))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, depth=2, heads=2, ff_dim=32, num_features=16, favor_backend="torch", feature_seed=0)
    model = ProteinLM(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_weights(weights_payload(model.config, "mlm", model.state_dict()), path)
    return path


def test_analyze_summary_has_the_readouts_with_chance_levels(tmp_path, tiny_checkpoint, sample_fasta):
    out = tmp_path / "an"
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(sample_fasta), "--out", str(out),
            "--max-sequences", "6", "--max-length", "60", "--permutations", "199", "--random-inits", "3"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("vig_soft_pearson", "vig_soft_p_value", "vig_exact_p_value", "substitution_pearson",
                "substitution_p_value", "logodds_best_head_p_value"):
        assert key in s, key
    assert "vig_exact_pearson" in s  # may be null: few random-model edges pass 0.3
    assert -1 <= s["vig_soft_pearson"] <= 1 and 1 / 200 <= s["vig_soft_p_value"] <= 1
    assert len(s["random_weights"]) == 3 and len({r["seed"] for r in s["random_weights"]}) == 3
    assert all("vig_soft_pearson" in r for r in s["random_weights"]) and "vig_soft_pearson_random_mean" in s
    values = [r["vig_soft_pearson"] for r in s["random_weights"]]
    assert s["vig_soft_pearson_random_mean"] == pytest.approx(np.mean(values), abs=1e-6)
    # The figure reads its headline matrix from the same numbers.
    sums = np.load(out / "vig_soft_sums.npy")
    assert sums.shape == (2, 2, 21)
    from protein_lm.analysis.vig import VigResult

    assert VigResult.from_sums(sums).pearson == pytest.approx(s["vig_soft_pearson"], abs=1e-6)
    assert len(s["vig_soft_per_layer_pearson"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pseudocount", "-1"], "--pseudocount"),
        (["--pseudocount", "nan"], "--pseudocount"),
        (["--random-inits", "0"], "--random-inits"),
        (["--permutations", "5"], "--permutations"),
        (["--vig-threshold", "1.5"], "--vig-threshold"),
        (["--batch-tokens", "0"], "--batch-tokens"),
        (["--random-inits", "1"], "--random-inits"),
        (["--seed", "-1"], "--seed"),
        (["--vig-min-total", "0"], "--vig-min-total"),
    ],
)
def test_analyze_refuses_bad_options_in_one_line(tmp_path, tiny_checkpoint, sample_fasta, capsys, extra, message):
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(sample_fasta), "--out",
            str(tmp_path / "x"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x").exists()


def test_analyze_unwritable_out_fails_before_any_work(tmp_path, tiny_checkpoint, sample_fasta, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(sample_fasta), "--out",
            str(blocker / "sub" / "an")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "analyze: trained model" not in err


def test_analyze_refuses_a_file_without_standard_residues(tmp_path, tiny_checkpoint, capsys):
    fasta = tmp_path / "odd.fasta"
    fasta.write_text(">a\nXXXXBZ\n>b\nXUO\n")
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(fasta), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "no standard amino acids" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_analyze_reports_undefined_readouts_as_null(tmp_path, tiny_checkpoint, sample_fasta):
    """Two short proteins: the exact variant keeps no head (few edges above 0.3) -> null, not a crash,
    and the figures are still drawn."""
    out = tmp_path / "an"
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(sample_fasta), "--out", str(out),
            "--max-sequences", "2", "--max-length", "20", "--permutations", "99", "--vig-min-total", "1000"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["vig_soft_pearson"] is None and s["vig_soft_p_value"] is None and s["vig_soft_rank_DE"] is None
    assert s["vig_soft_num_heads"] == 0
    assert (out / "similarity_vs_blosum62.png").stat().st_size > 0
