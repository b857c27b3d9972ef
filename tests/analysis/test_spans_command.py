"""`protein-lm spans` on dynamic-span models with learned positions: inputs are cropped to the
trained window instead of crashing on a position the model has no embedding for."""

from __future__ import annotations

import json

import torch

from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.cli import main
from protein_lm.model import ModelConfig, ProteinLM


def test_dynamic_spans_with_learned_positions_crop_to_the_window(tmp_path, sample_fasta, capsys):
    cfg = ModelConfig(dim=16, depth=2, heads=2, ff_dim=32, num_features=16, favor_backend="torch",
                      feature_seed=0, position="learned", max_length=40,
                      span={"enabled": True, "dynamic": True, "max": 16, "ramp": 4})
    torch.manual_seed(0)
    model = ProteinLM(cfg)
    ckpt = tmp_path / "dyn.pt"
    save_weights(weights_payload(cfg, "mlm", model.state_dict()), ckpt)
    out, js = tmp_path / "spans.png", tmp_path / "spans.json"
    # the sample's proteins are far longer than the 38 residues the window holds
    code = main(["spans", "--checkpoint", str(ckpt), "--out", str(out), "--json", str(js),
                 "--fasta", str(sample_fasta), "--max-sequences", "6"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(js.read_text())
    assert data["max_residues"] == 38
    assert data["num_tokens"] == 6 * 40  # every sequence cropped to 38 residues + <cls>, <eos>
    assert out.stat().st_size > 0


def test_fasta_with_static_spans_is_reported_as_ignored(tmp_path, sample_fasta, capsys):
    cfg = ModelConfig(dim=16, depth=1, heads=2, ff_dim=32, num_features=16, favor_backend="torch",
                      feature_seed=0, span={"enabled": True, "max": 16, "ramp": 4})
    ckpt = tmp_path / "static.pt"
    save_weights(weights_payload(cfg, "mlm", ProteinLM(cfg).state_dict()), ckpt)
    code = main(["spans", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.png"),
                 "--fasta", str(sample_fasta)])
    assert code == 0
    assert "--fasta ignored" in capsys.readouterr().err
