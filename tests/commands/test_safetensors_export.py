"""export --format safetensors: a directory any safetensors/JSON reader opens; load_model round trip."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from protein_lm.checkpoint import load_model
from protein_lm.cli import main
from protein_lm.data.tokenizer import TOKENS
from tests.helpers.tiny_models import save_tiny


def test_round_trip_gives_identical_logits_and_plain_files(tmp_path):
    src = save_tiny(tmp_path / "tiny.pt", causal=True)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(src), "--out", str(out), "--format", "safetensors"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    # Readable without protein_lm: plain JSON and safetensors.
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "protein_lm.safetensors" and config["objective"] == "causal"
    assert config["config"]["dim"] == 32 and config["alphabet"]["tokens"] == list(TOKENS)
    assert (out / "vocab.txt").read_text().splitlines() == list(TOKENS)
    tensors = load_file(str(out / "model.safetensors"))
    original, info_pt = load_model(src)
    assert tensors.keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(tensors[key], value, atol=0, rtol=0)
    loaded, info = load_model(out)
    assert info["format"] == "safetensors" and info["objective"] == "causal" and loaded.config == original.config
    ids = torch.randint(4, 24, (2, 11))
    torch.testing.assert_close(loaded(ids).logits, original(ids).logits, atol=0, rtol=0)
    # ... and the directory exports back to a .pt file.
    again = tmp_path / "again.pt"
    assert main(["export", "--checkpoint", str(out), "--out", str(again)]) == 0
    torch.testing.assert_close(load_model(again)[0](ids).logits, original(ids).logits, atol=0, rtol=0)


def test_refusals_are_one_line(tmp_path, capsys):
    src = save_tiny(tmp_path / "tiny.pt")
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "--checkpoint", str(src), "--out", str(out), "--format", "safetensors"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "tiny.pt"]  # no scratch left
    fresh = tmp_path / "fresh"
    assert main(["export", "--checkpoint", str(src), "--out", str(fresh), "--format", "safetensors"]) == 0
    config = json.loads((fresh / "config.json").read_text())
    config["alphabet"]["tokens"] = config["alphabet"]["tokens"][::-1]
    (fresh / "config.json").write_text(json.dumps(config))
    fasta = tmp_path / "a.fasta"
    fasta.write_text(">a\nMKT\n")
    assert main(["evaluate", "--checkpoint", str(fresh), "--fasta", str(fasta)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alphabet differs" in err[0]
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--fasta", str(fasta)]) == 2
    assert "not an exported model" in capsys.readouterr().err
