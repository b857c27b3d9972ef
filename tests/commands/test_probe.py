"""protein-lm probe: FLIP split parsing, resolved-residue masking, heads, baselines, JSON, errors."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from protein_lm.cli import main
from protein_lm.probe import fit_logistic, load_flip_secondary_structure, q3, stack
from tests.helpers.tiny_models import save_tiny

RESIDUES = "ACDEFGHIKLMNPQRSTVWY"


def _state(residue: str) -> str:
    """A rule the one-hot baseline can learn exactly: the state is a function of the residue."""
    return "H" if residue in "AELMQKR" else "E" if residue in "VIYFWT" else "C"


def _make_split(path, n_train=30, n_val=6, n_test=10, seed=0, bad_length=False):
    rng = np.random.default_rng(seed)
    seqs, labels, masks = [], [], []
    sets = ["SET=train VALIDATION=False"] * n_train + ["SET=train VALIDATION=True"] * n_val + ["SET=test VALIDATION=False"] * n_test
    for i, attrs in enumerate(sets):
        n = int(rng.integers(8, 30))
        seq = "".join(rng.choice(list(RESIDUES), n))
        mask = "".join(rng.choice(["0", "1"], n, p=[0.2, 0.8]))
        # unresolved residues get the wrong state: they must be neither trained on nor scored
        lab = "".join(_state(r) if m == "1" else "HEC"[("HEC".index(_state(r)) + 1) % 3] for r, m in zip(seq, mask, strict=True))
        if bad_length and i == 3:
            lab = lab[:-1]
        seqs.append(f">c{i}\n{seq}\n")
        labels.append(f">c{i} {attrs}\n{lab}\n")
        masks.append(f">c{i}\n{mask}\n")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("splits/sequences.fasta", "".join(seqs))
        zf.writestr("splits/sampled.fasta", "".join(labels))
        zf.writestr("splits/mask.fasta", "".join(masks))
    return path


def test_split_parsing_and_resolved_residues(tmp_path):
    chains = load_flip_secondary_structure(_make_split(tmp_path / "ss.zip"))
    assert [c.split for c in chains].count("train") == 30
    assert [c.split for c in chains].count("val") == 6 and [c.split for c in chains].count("test") == 10
    test = [c for c in chains if c.split == "test"]
    x, y = stack(test, [torch.arange(len(c.tokens), dtype=torch.float32)[:, None] for c in test])
    assert len(y) == sum(int(c.resolved.sum()) for c in test)
    # the kept rows are exactly the resolved positions, in order
    want = [p for c in test for p in range(len(c.tokens)) if c.resolved[p]]
    assert x[:, 0].tolist() == want


def test_q3_and_the_logistic_head_on_separable_data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(300, 3, generator=g)
    head = fit_logistic(x, y, l2=1e-4)
    pred = head(x).argmax(-1)
    assert q3(pred, y) == sum(int(p == t) for p, t in zip(pred.tolist(), y.tolist(), strict=True)) / 300
    assert q3(pred, y) == 1.0
    assert q3(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 2])) == 0.5


def test_cli_reports_model_random_and_onehot(tmp_path):
    data = _make_split(tmp_path / "ss.zip")
    ckpt = save_tiny(tmp_path / "tiny.pt")
    out = tmp_path / "probe.json"
    assert main(["probe", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet",
                 "--heads", "linear", "mlp", "--max-train", "20"]) == 0
    report = json.loads(out.read_text())
    chains = load_flip_secondary_structure(data)
    resolved_test = sum(int(c.resolved.sum()) for c in chains if c.split == "test")
    assert report["splits"]["test"] == {"chains": 10, "residues": resolved_test}
    assert report["splits"]["train"]["chains"] == 20 and report["layer"] == 2
    assert set(report["results"]) == {"model", "random", "onehot"}
    # The labels are a function of the residue: the one-hot linear probe learns the rule exactly
    # (it would not if the unresolved, deliberately mislabelled residues were scored).
    assert report["results"]["onehot"]["linear"]["q3_test"] == 1.0
    for by_head in report["results"].values():
        for r in by_head.values():
            assert 0.0 <= r["q3_test"] <= 1.0 and 0.0 <= r["q3_val"] <= 1.0


def test_bad_split_is_a_one_line_error(tmp_path, capsys):
    data = _make_split(tmp_path / "ss.zip", bad_length=True)
    ckpt = save_tiny(tmp_path / "tiny.pt")
    assert main(["probe", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chain c3: sequence, labels and mask lengths differ" in err[0]
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("name", ["missing.zip", "not_a_zip.zip"])
def test_missing_or_wrong_archive(tmp_path, capsys, name):
    (tmp_path / "not_a_zip.zip").write_text("hello")
    ckpt = save_tiny(tmp_path / "tiny.pt")
    assert main(["probe", "--checkpoint", str(ckpt), "--data", str(tmp_path / name), "--out", str(tmp_path / "p.json")]) == 2
    assert "protein-lm probe: error: --data" in capsys.readouterr().err
