"""Behavioural tests: each FAIR mechanism does its job on small synthetic protein-like tasks (CPU).

* copy-at-distance: sequences of residues that repeat with period P, so the next token is the one
  P - 1 positions back. Adaptive-span heads start at span 0 (ramp R covers the distance only
  weakly); the L1 penalty pulls every span down. The task needs one head to see P - 1 tokens back,
  so some head's span must grow past the distance while most heads stay short.
* fact memorisation: many random "facts" (a 3-residue key -> a residue value). A product-key
  memory in place of the last FFN, at matched per-token compute, recalls clearly more facts than
  the FFN-only model after the same number of steps.

The tiny models are built from the mechanisms' modules directly (they are what is being tested);
integration with :class:`protein_lm.model.ProteinLM` is covered by the small tests at the end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protein_lm.attention.modules.span import AdaptiveSpan
from protein_lm.attention.ops.span import adaptive_span_exact_attention
from protein_lm.layers.pkm import ProductKeyMemory, pkm_value_parameters

NUM_AA = 20


class _Block(nn.Module):
    """Pre-LN causal block: exact attention (optionally adaptive-span) + FFN or PKM."""

    def __init__(self, dim, heads, ff_hidden=0, span=None, pkm=None):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.span = AdaptiveSpan(heads, **span) if span else None
        if pkm is not None:
            self.ff = ProductKeyMemory(dim, **pkm)
        else:
            self.ff = nn.Sequential(nn.Linear(dim, ff_hidden), nn.GELU(), nn.Linear(ff_hidden, dim))

    def forward(self, x):
        b, length, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.span is not None:
            y = adaptive_span_exact_attention(q, k, v, self.span.spans(), self.span.ramp, causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, length, d))
        return x + self.ff(self.n2(x))


class _TinyLM(nn.Module):
    def __init__(self, length, dim, heads, blocks):
        super().__init__()
        self.emb, self.pos = nn.Embedding(NUM_AA, dim), nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, NUM_AA)

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))

    def aux_loss(self):
        return sum((b.span.aux_loss() for b in self.blocks if b.span is not None), torch.zeros(()))


def run_copy_task(
    period=32, length=64, ramp=32.0, loss_coef=2e-6, steps=300, seed=0, depth=2, heads=4, lr=3e-3
):
    """Train on period-``period`` sequences; return final spans ``(depth, heads)`` and loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    span = {"max_span": length, "ramp": ramp, "init_span": 0.0, "loss_coef": loss_coef}
    model = _TinyLM(length, 64, heads, [_Block(64, heads, 128, span=span) for _ in range(depth)])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        base = torch.randint(0, NUM_AA, (32, period), generator=g)
        x = base.repeat(1, length // period + 1)[:, : length + 1]
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits[:, period:].reshape(-1, NUM_AA), x[:, period + 1 :].reshape(-1))
        opt.zero_grad()
        (loss + model.aux_loss()).backward()
        opt.step()
    spans = torch.stack([b.span.current_spans() for b in model.blocks])
    return spans, float(loss.detach())


def run_fact_task(use_pkm, facts=4000, steps=800, seed=0, dim=32, heads=2, lr=3e-3, value_lr=5e-2, pkm=None):
    """Memorise ``facts`` random 3-residue -> residue facts; return recall accuracy and #params."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randperm(NUM_AA**3, generator=g)[:facts]
    keys = torch.stack([codes // NUM_AA**2, (codes // NUM_AA) % NUM_AA, codes % NUM_AA], dim=1)
    values = torch.randint(0, NUM_AA, (facts,), generator=g)
    data = torch.cat([keys, values[:, None]], dim=1)  # (facts, 4): predict token 3 from 0..2
    pkm = pkm or {"num_keys": 32, "topk": 8, "heads": 2, "key_dim": 32}
    blocks = [_Block(dim, heads, 4 * dim), _Block(dim, heads, 4 * dim, pkm=pkm if use_pkm else None)]
    model = _TinyLM(4, dim, heads, blocks)
    values_p = pkm_value_parameters(model)
    ids = {id(p) for p in values_p}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr}]
    if values_p:
        groups.append({"params": values_p, "lr": value_lr})
    opt = torch.optim.Adam(groups)
    for _ in range(steps):
        batch = data[torch.randint(0, facts, (256,), generator=g)]
        logits = model(batch[:, :3])[:, -1]
        loss = F.cross_entropy(logits, batch[:, 3])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(data[:, :3])[:, -1].argmax(-1) == data[:, 3]).float().mean())
    return acc, sum(p.numel() for p in model.parameters())


def test_copy_at_distance_span_grows_for_one_head_only():
    """Spans start at 0; the copying head's grows until its mask at distance d is ~1, most stay short.

    The soft mask still gives weight ``m(d) = (R + z - d) / R`` inside the ramp, so the L1 penalty
    settles the copying head just around ``d``: we require ``m_z(d) >= 0.9`` (``z >= d - 0.1 R``).
    """
    period, ramp = 32, 32.0
    distance = period - 1  # the next token equals the one period - 1 positions back
    spans, loss = run_copy_task(period=period, ramp=ramp)
    flat = spans.flatten()
    assert loss < 0.1, f"copy task not learned (loss {loss:.3f})"
    assert flat.max() >= distance - 0.1 * ramp, f"no head reached distance {distance}: spans {spans.tolist()}"
    assert (flat < distance / 2).float().mean() >= 0.5, (
        f"most heads should stay short: spans {spans.tolist()}"
    )


def test_pkm_recalls_more_facts_than_ffn():
    """4,000 facts, 800 steps: a product-key memory in place of the last FFN (about half its
    multiply-adds per token: query 2x(32x32), sub-keys 2x2x32x16, values 2x8x32) recalls more."""
    acc_ffn, _ = run_fact_task(use_pkm=False)
    acc_pkm, _ = run_fact_task(use_pkm=True)
    assert acc_pkm > acc_ffn + 0.15, f"PKM recall {acc_pkm:.3f} vs FFN {acc_ffn:.3f}"


# --------------------------------------------------------------------------- ProteinLM integration

_SMALL = {"dim": 32, "depth": 2, "heads": 4, "ff_dim": 64, "num_features": 16, "favor_backend": "torch"}
_PKM = {"layers": [-1], "num_keys": 8, "topk": 4, "heads": 2, "key_dim": 16}
_FAIR = {
    "span": {"span": {"enabled": True, "max": 64, "ramp": 8, "init": 4}},
    "memory": {"memory": {"slots": 4}},
    "all_attention": {"memory": {"slots": 4, "replace_ffn": True}},
    "span+memory": {"span": {"enabled": True, "max": 64, "ramp": 8}, "memory": {"slots": 3}},
    "pkm": {"pkm": _PKM},
    "pkm_beside_bn": {"pkm": {**_PKM, "layers": [0], "mode": "beside", "query_norm": "batchnorm"}},
}


@pytest.mark.parametrize(
    ("attention", "causal"), [("exact", False), ("performer-softmax", True), ("performer-relu", False)]
)
@pytest.mark.parametrize("fair", sorted(_FAIR))
def test_model_options_train_and_respect_padding(attention, causal, fair):
    from protein_lm.model import ModelConfig, ProteinLM

    torch.manual_seed(0)
    cfg = ModelConfig(attention=attention, causal=causal, **_SMALL, **_FAIR[fair])
    model = ProteinLM(cfg)
    x = torch.randint(4, 24, (2, 40))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, -7:] = True
    out = model(x, pad)
    (out.logits[~pad].logsumexp(-1).sum() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    x2 = x.clone()
    x2[1, -7:] = 7
    torch.testing.assert_close(model(x, pad).logits[~pad], model(x2, pad).logits[~pad], atol=1e-5, rtol=1e-4)
    (_, maps), *_ = list(model.attention_maps(x, pad, layers=[0]))
    assert maps.shape == (2, 4, 40, 40)
    rows = maps[0].sum(-1)  # batch row 0 has no padding
    if "memory" in _FAIR[fair]:
        assert (rows < 1 - 1e-6).all() and (rows > 0).all()  # the rest of each row sits on the memory slots
    else:
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-4, rtol=0)
    if fair == "all_attention":
        assert all(block.ffn is None for block in model.blocks)


@pytest.mark.parametrize("attention", ["exact", "performer-softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_full_span_equals_base_model(attention, causal):
    """A span covering the whole sequence (mask 1 everywhere) reproduces the plain model."""
    from protein_lm.model import ModelConfig, ProteinLM

    torch.manual_seed(0)
    base = ProteinLM(ModelConfig(attention=attention, causal=causal, **_SMALL)).eval()
    span = ProteinLM(
        ModelConfig(
            attention=attention, causal=causal, span={"enabled": True, "max": 64, "init": 64}, **_SMALL
        )
    ).eval()
    state = {k.replace(".kernel.", ".kernel.favor."): v for k, v in base.state_dict().items()}
    missing, unexpected = span.load_state_dict(state, strict=False)
    assert not unexpected and all("span" in k for k in missing)
    x = torch.randint(4, 24, (2, 30))
    torch.testing.assert_close(span(x).logits, base(x).logits, atol=1e-5, rtol=1e-4)


def test_model_aux_loss_param_groups_and_statistics():
    from protein_lm.model import ModelConfig, ProteinLM

    cfg = ModelConfig(
        span={"enabled": True, "max": 100, "init": 10, "loss_coef": 1e-3},
        attention="exact",
        **_SMALL,
        pkm=_PKM,
    )
    model = ProteinLM(cfg)
    x = torch.randint(4, 24, (3, 20))
    out = model(x)
    torch.testing.assert_close(out.aux_loss, torch.tensor(1e-3 * 10 * 4 * 2))  # lambda * z * heads * layers
    names = {n for n, p in model.named_parameters() if getattr(p, "optim_overrides", {}).get("weight_decay") == 0}
    assert sum("span_fraction" in n for n in names) == 2 and sum("values.weight" in n for n in names) == 1
    for name, p in model.named_parameters():
        if "span_fraction" in name:
            assert p.optim_overrides == {"weight_decay": 0.0}
        if name.endswith("values.weight"):
            assert p.optim_overrides == {
                "lr": cfg.pkm.value_lr,
                "weight_decay": 0.0,
                "lr_schedule": "constant",
            }
    stats = model.statistics()
    assert stats["span/0/mean"] == pytest.approx(10.0) and stats["span/max"] == pytest.approx(10.0)
    assert not any(k.startswith("pkm/") for k in stats)  # no usage counted before a reset
    model.reset_statistics()
    model.eval()
    with torch.no_grad():
        model(x)
    usage = model.statistics()
    assert 0 < usage["pkm/0/used"] <= 1 and usage["pkm/0/top99"] >= usage["pkm/0/top50"] >= 1
    assert "pkm/mean" not in usage and "pkm/max" not in usage


_CONFIGS = [
    "performer_adaptive_span.yaml",
    "exact_adaptive_span.yaml",
    "performer_persistent_memory.yaml",
    "exact_all_attention_persistent_memory.yaml",
    "performer_pkm.yaml",
]


@pytest.mark.parametrize("name", _CONFIGS)
def test_fair_configs_build_a_model_that_runs(name):
    """The shipped FAIR configs name real ModelConfig fields and build a model that runs."""
    from pathlib import Path

    from protein_lm.commands.config_files import load_config
    from protein_lm.model import ModelConfig, ProteinLM

    cfg, _, _ = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    model = ProteinLM(ModelConfig(**cfg["model"]["config"]))
    out = model(torch.randint(4, 24, (2, 16)))
    assert out.logits.shape == (2, 16, 33) and torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("name", _CONFIGS)
def test_fair_configs_finite_and_invariant_to_long_padding(name):
    """Regression: with >= span + ramp trailing pads, the Performer span path turned every output
    into NaN ("non-finite training loss" at step 0). Each shipped FAIR config (small dims) must give
    a finite loss / gradients and, at real positions, the logits of the unpadded sequence."""
    from pathlib import Path

    from protein_lm.commands.config_files import load_config
    from protein_lm.model import ModelConfig, ProteinLM

    cfg, _, _ = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    options = cfg["model"]["config"]
    small = {**_SMALL, "pkm": {**options["pkm"], "key_dim": 16}} if "pkm" in options else _SMALL
    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(**{**options, **small}))
    real, pad = 24, 100  # 100 pads >> span.init + span.ramp = 32 (the configs' reach)
    x = torch.randint(4, 24, (2, real))
    xp = torch.cat([x, torch.randint(0, 33, (2, pad))], dim=1)
    mask = torch.zeros(2, real + pad, dtype=torch.bool)
    mask[:, real:] = True
    mask[0, real - 5 :] = True  # ragged: row 0 has 19 real tokens
    x[0, real - 5 :] = 1  # unpadded run: other tokens under row 0's mask than xp has
    out = model(xp, mask)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)
    target = torch.randint(4, 24, (2, real + pad))
    loss = F.cross_entropy(out.logits[~mask], target[~mask]) + out.aux_loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        got = model(xp, mask).logits[:, :real]
        want = model(x, mask[:, :real]).logits
    keep = ~mask[:, :real]
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
