"""Spans per layer and head after training: ``protein_lm.analysis.spans`` and ``protein-lm spans``."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from protein_lm.analysis.spans import batch_sequences, head_spans
from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.cli import main
from protein_lm.errors import UserError
from protein_lm.model import ModelConfig, ProteinLM

_TINY = dict(dim=16, depth=3, heads=4, ff_dim=32, num_features=16, favor_backend="torch", feature_seed=0)
# Spans set by hand (tokens), one row per layer; S = 40: fractions are SPANS / 40.
SPANS = [[0.0, 3.5, 12.25, 40.0], [7.0, 1.0, 20.5, 33.0], [2.0, 2.0, 9.75, 0.5]]


def _static_model(attention: str = "performer-softmax") -> ProteinLM:
    cfg = ModelConfig(attention=attention, span={"enabled": True, "max": 40, "ramp": 8}, **_TINY)
    model = ProteinLM(cfg)
    with torch.no_grad():
        for blk, row in zip(model.blocks, SPANS, strict=True):
            blk.attn.kernel.span.span_fraction.copy_(torch.tensor(row) / 40)
    return model


def _save(model: ProteinLM, path) -> str:
    save_weights(weights_payload(model.config, "mlm", model.state_dict()), path)
    return str(path)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["spans", *map(str, argv)])
    return code, capsys.readouterr().err


def test_head_spans_of_a_model_equal_the_set_spans():
    report = head_spans(_static_model("exact"))
    assert report.layers == [0, 1, 2] and not report.dynamic
    np.testing.assert_allclose(report.spans, SPANS, atol=1e-5)
    assert report.max_span == 40 and report.ramp == 8


def test_spans_command_writes_json_and_png(tmp_path, capsys):
    ckpt = _save(_static_model(), tmp_path / "m.pt")
    png, js = tmp_path / "out" / "spans.png", tmp_path / "spans.json"
    code, err = _run(capsys, "--checkpoint", ckpt, "--out", png, "--json", js)
    assert code == 0, err
    data = json.loads(js.read_text())
    np.testing.assert_allclose(data["spans"], SPANS, atol=1e-4)
    assert data["layers"] == [0, 1, 2] and data["heads"] == 4 and data["max_span"] == 40
    assert data["max"] == 40.0 and data["dynamic"] is False and data["checkpoint"] == ckpt
    # a real picture: PNG signature, not tiny, not one flat colour
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05
    assert not list(tmp_path.rglob(".*.tmp-*"))  # written atomically: no temporary files left
    code, _ = _run(capsys, "--checkpoint", ckpt, "--out", tmp_path / "heat.svg", "--kind", "heatmap")
    assert code == 0 and (tmp_path / "heat.svg").read_text().lstrip().startswith("<?xml")


def test_spans_command_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "s.png"
    for ckpt in (bad, tmp_path / "missing.ckpt"):
        code, err = _run(capsys, "--checkpoint", ckpt, "--out", out)
        assert code == 2 and err.startswith("protein-lm spans: error: ") and err.count("\n") == 1, err
        assert str(ckpt) in err
    plain = ProteinLM(ModelConfig(**_TINY))
    ckpt = _save(plain, tmp_path / "plain.pt")
    code, err = _run(capsys, "--checkpoint", ckpt, "--out", out, "--json", tmp_path / "s.json")
    assert code == 2 and "no adaptive attention span" in err and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "s.json").exists()
    code, err = _run(capsys, "--checkpoint", ckpt, "--out", tmp_path)  # a directory
    assert code == 2 and "is a directory" in err


def _dynamic_model() -> tuple[ProteinLM, torch.Tensor]:
    """Predictor weights 0: every token's span is S * sigmoid(b_h), known in closed form."""
    cfg = ModelConfig(span={"enabled": True, "dynamic": True, "max": 40, "ramp": 8}, **_TINY)
    model = ProteinLM(cfg)
    bias = torch.tensor([[-2.0, 0.0, 1.5, 3.0], [0.5, -1.0, 0.0, 2.0], [-3.0, 1.0, 0.25, -0.5]])
    with torch.no_grad():
        for blk, b in zip(model.blocks, bias, strict=True):
            blk.attn.kernel.span.span_predictor.bias.copy_(b)
    return model, 40 * torch.sigmoid(bias)


def test_dynamic_spans_need_inputs_and_average_real_tokens(tmp_path, capsys):
    model, want = _dynamic_model()
    with pytest.raises(UserError, match="depend on the input"):
        head_spans(model)
    ids, mask = batch_sequences([[5, 6, 7], [8] * 9])
    report = head_spans(model, [(ids, mask)])
    np.testing.assert_allclose(report.spans, want.numpy(), rtol=1e-5)
    assert report.dynamic and report.num_tokens == 5 + 11  # <cls> + residues + <eos>, no padding

    ckpt = _save(model, tmp_path / "dyn.pt")
    code, err = _run(capsys, "--checkpoint", ckpt, "--out", tmp_path / "d.png")
    assert code == 2 and "--fasta" in err and err.count("\n") == 1
    fasta = tmp_path / "p.fasta.gz"
    with gzip.open(fasta, "wt") as f:
        f.write(">a\nMKTAYIAKQR\n>b\nGSHM\n>c\nDEFYWLL\n")
    js = tmp_path / "d.json"
    code, err = _run(
        capsys,
        "--checkpoint",
        ckpt,
        "--out",
        tmp_path / "d.png",
        "--json",
        js,
        "--fasta",
        fasta,
        "--batch-size",
        "2",
    )
    assert code == 0, err
    data = json.loads(js.read_text())
    np.testing.assert_allclose(data["spans"], want.numpy(), rtol=1e-4)
    assert data["dynamic"] is True and data["num_tokens"] == 12 + 6 + 9


def test_dynamic_span_mean_is_token_weighted():
    """Non-zero predictor weights: the reported value is the mean of z_t over all real tokens of all
    batches, recomputed here from each block's input."""
    model, _ = _dynamic_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.kernel.span.span_predictor.weight.normal_(0, 0.5)
    batches = [batch_sequences([[5, 6, 7, 9], [8] * 9]), batch_sequences([[10] * 2])]
    sums = torch.zeros(3, 4, dtype=torch.float64)
    count = 0
    model.eval()
    inputs = {}
    for ids, mask in batches:
        inputs.clear()
        hooks = [
            blk.attn.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0]))
            for i, blk in enumerate(model.blocks)
        ]
        with torch.no_grad():
            model(ids, mask)
        for h in hooks:
            h.remove()
        real = ~mask
        for i, blk in enumerate(model.blocks):
            p = blk.attn.kernel.span.span_predictor.requires_grad_(False)
            z = 40 * torch.sigmoid(inputs[i].double() @ p.weight.double().T + p.bias.double())  # (B,L,H)
            sums[i] += z[real].sum(0)
        count += int(real.sum())
    report = head_spans(model, batches)
    np.testing.assert_allclose(report.spans, (sums / count).numpy(), rtol=1e-5)
    assert report.num_tokens == count == 6 + 11 + 4
