"""Attention kinds by name: a new kind is one registry line, and the model, ``attention_maps`` and the
row-block analysis use it with no per-kind code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from protein_lm.analysis.attention_maps import iter_attention_blocks
from protein_lm.attention import registry
from protein_lm.model import ModelConfig, ProteinLM


class _Uniform(nn.Module):
    """Every query spreads its attention evenly over the keys it may see (a kind no code knows)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def _weights(self, q, key_padding_mask, rows):
        length = q.shape[-2]
        t = torch.arange(rows.start, rows.stop)[:, None]
        s = torch.arange(length)[None, :]
        w = torch.ones(q.shape[0], 1, len(rows), length, dtype=torch.float64)
        if self.causal:
            w = w * (s <= t)
        if key_padding_mask is not None:
            w = w * ~key_padding_mask[:, None, None, :]
        return (w / w.sum(-1, keepdim=True).clamp_min(1)).expand(-1, q.shape[1], -1, -1)

    def forward(self, q, k, v, key_padding_mask=None):
        return (self._weights(q, key_padding_mask, range(q.shape[-2])) @ v.double()).to(v.dtype)

    def attention_probs(self, q, k, key_padding_mask=None, rows=None):
        return self._weights(q, key_padding_mask, range(q.shape[-2]) if rows is None else rows).float()


def test_a_registered_kind_runs_in_the_model_and_the_analysis(monkeypatch):
    monkeypatch.setitem(registry.KINDS, "uniform", registry.AttentionKind("uniform", lambda c, i: _Uniform(c.causal)))
    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(dim=16, depth=2, heads=2, ff_dim=32, attention="uniform", causal=True)).eval()
    assert not model.config.is_performer and isinstance(model.blocks[1].attn.kernel, _Uniform)
    ids = torch.randint(4, 24, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    assert model(ids, mask).logits.shape == (2, 9, 33)
    blocks = {}
    for layer, start, block in iter_attention_blocks(model, ids, mask, max_block_elements=2 * 2 * 9 * 4):
        blocks.setdefault(layer, []).append((start, block))
    for layer, full in model.attention_maps(ids, mask):
        got = torch.cat([b for _, b in sorted(blocks[layer], key=lambda x: x[0])], dim=2)
        assert len(blocks[layer]) == 3  # 4 rows per block: the analysis asked the module for row blocks
        torch.testing.assert_close(got, full)
        # by hand: query 5 of the padded row sees keys 0..5, query 8 only the 6 real keys 0..5
        assert torch.allclose(full[1, 0, 5, :6], torch.full((6,), 1 / 6)) and full[1, 0, 8, 6:].sum() == 0
        assert torch.allclose(full[0, 1, 2], torch.tensor([1 / 3] * 3 + [0.0] * 6))


def test_unknown_kind_is_one_line_naming_the_kinds():
    with pytest.raises(ValueError, match=r"^attention must be one of 'performer-softmax', 'performer-relu', 'exact', got 'linformer'$") as err:
        ModelConfig(attention="linformer")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("exact", lambda c, i: nn.Identity())
