"""ProteinLM: shapes, padding invariance, causality, attention maps, redraw, overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from protein_lm.data.tokenizer import CLS_ID, EOS_ID, MASK_ID, PAD_ID, STANDARD_AA_IDS
from protein_lm.lit_module import token_statistics
from protein_lm.model import ModelConfig, ProteinLM

ATTENTIONS = ["exact", "performer-softmax", "performer-relu"]


def tiny(attention: str, causal: bool = False, **kw) -> ProteinLM:
    """A 2-layer model in eval mode; ``kw`` overrides any ``ModelConfig`` field."""
    sizes = dict(dim=32, depth=2, heads=4, ff_dim=64, num_features=32, feature_seed=0, favor_backend="torch")
    cfg = ModelConfig(**{**sizes, "attention": attention, "causal": causal, **kw})
    torch.manual_seed(0)
    return ProteinLM(cfg).eval()


def random_ids(b: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    aa = torch.tensor(STANDARD_AA_IDS)
    ids = aa[torch.randint(len(aa), (b, length), generator=g)]
    ids[:, 0] = CLS_ID
    ids[:, -1] = EOS_ID
    return ids


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_shapes_and_padding_invariance(attention, causal):
    model = tiny(attention, causal)
    ids = random_ids(2, 12)
    out = model(ids)
    assert out.logits.shape == (2, 12, 33)
    assert out.aux_loss.shape == () and float(out.aux_loss) == 0.0
    padded = torch.cat([ids, torch.full((2, 5), PAD_ID)], dim=1)
    mask = padded.eq(PAD_ID)
    out_pad = model(padded, mask)
    torch.testing.assert_close(out_pad.logits[:, :12], out.logits, atol=1e-5, rtol=1e-5)
    # Without an explicit mask, <pad> ids are treated as padding.
    torch.testing.assert_close(model(padded).logits, out_pad.logits)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal_model_never_sees_the_future(attention):
    model = tiny(attention, causal=True)
    ids = random_ids(2, 16, seed=1)
    base = model(ids).logits
    for t in (3, 9, 15):
        changed = ids.clone()
        changed[:, t] = torch.where(
            changed[:, t] == STANDARD_AA_IDS[0], STANDARD_AA_IDS[1], STANDARD_AA_IDS[0]
        )
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-4  # the change is visible from t on


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bidirectional_model_sees_both_sides(attention):
    model = tiny(attention, causal=False)
    ids = random_ids(1, 16, seed=2)
    changed = ids.clone()
    changed[:, 10] = MASK_ID
    assert (model(changed).logits[:, :10] - model(ids).logits[:, :10]).abs().max() > 1e-4


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_maps_rows_sum_to_one_and_reproduce_the_output(attention, causal):
    model = tiny(attention, causal)
    ids = torch.cat([random_ids(2, 10, seed=3), torch.full((2, 3), PAD_ID)], dim=1)
    ids[1, 8:] = PAD_ID
    mask = ids.eq(PAD_ID)
    maps = dict(model.attention_maps(ids, mask))
    assert sorted(maps) == [0, 1]
    for attn in maps.values():
        assert attn.shape == (2, 4, 13, 13)
        real_rows = attn[0, :, :10].sum(-1)
        torch.testing.assert_close(real_rows, torch.ones_like(real_rows), atol=1e-5, rtol=0)
        assert attn[1, :, :, 8:].abs().max() == 0  # padded keys get no weight
        if causal:
            assert attn.triu(1).abs().max() == 0
    # The layer-0 map times V is the layer's attention output (implied attention for Performer).
    block = model.blocks[0]
    x = model.embed_tokens(ids)
    q, k, v = block.attn.project(block.norm1(x))
    expected = block.attn.kernel(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close((maps[0] @ v)[0, :, :10], expected[0, :, :10], atol=1e-4, rtol=1e-4)
    # Selecting layers (negative indices count from the end) returns only those.
    assert [i for i, _ in model.attention_maps(ids, mask, layers=[-1])] == [1]
    assert torch.is_grad_enabled()


def test_redraw_projections_is_reproducible_and_changes_output():
    model = tiny("performer-softmax")
    ids = random_ids(1, 12)
    before = model(ids).logits
    assert model.redraw_projections(torch.Generator().manual_seed(5)) == 2
    after = model(ids).logits
    assert (after - before).abs().max() > 0
    other = tiny("performer-softmax")
    other.redraw_projections(torch.Generator().manual_seed(5))
    torch.testing.assert_close(other(ids).logits, after)
    assert tiny("exact").redraw_projections(torch.Generator().manual_seed(5)) == 0


def test_rotary_model_runs_past_max_length_and_learned_does_not():
    ids = random_ids(1, 40)
    assert tiny("performer-softmax", max_length=16)(ids).logits.shape == (1, 40, 33)
    with pytest.raises(ValueError, match="max_length"):
        tiny("exact", position="learned", max_length=16)(ids)


def test_config_validation_and_round_trip():
    cfg = ModelConfig(dim=32, depth=1, heads=4, ff_dim=64)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="linformer")
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"dimm": 3})


def test_aux_losses_of_submodules_are_summed():
    model = tiny("exact")

    class Penalty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.z = torch.nn.Parameter(torch.tensor(2.0))

        def aux_loss(self):
            return 0.5 * self.z

    model.blocks[0].extra = Penalty()
    model.blocks[1].extra = Penalty()
    out = model(random_ids(1, 8))
    assert float(out.aux_loss.detach()) == pytest.approx(2.0)
    out.aux_loss.backward()
    assert model.blocks[0].extra.z.grad == pytest.approx(0.5)


# ---------------------------------------------------------------------------- overfitting

UNIGRAM_ENTROPY = math.log(20)  # ~3.0 nats: uniform over the 20 residues of the synthetic data


def _mlm_batch(ids: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    select = (torch.rand(ids.shape, generator=g) < 0.25) & (ids != CLS_ID) & (ids != EOS_ID)
    labels = torch.where(select, ids, torch.full_like(ids, -100))
    return torch.where(select, torch.full_like(ids, MASK_ID), ids), labels


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("objective", ["mlm", "causal"])
def test_tiny_model_overfits_a_handful_of_sequences(attention, objective):
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64,
        depth=2,
        heads=4,
        ff_dim=128,
        attention=attention,
        num_features=64,
        causal=objective == "causal",
        feature_seed=0,
        favor_backend="torch",
    )
    model = ProteinLM(cfg).train()
    seqs = random_ids(4, 24, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    if objective == "mlm":  # a fixed masking of the handful of sequences: memorise the masked residues
        inputs, labels = _mlm_batch(seqs, torch.Generator().manual_seed(0))
    else:
        inputs, labels = seqs, torch.cat([seqs[:, 1:], torch.full((4, 1), -100)], dim=1)
    for _ in range(150):
        loss_sum, _, count = token_statistics(model(inputs).logits, labels)
        loss = loss_sum / count
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss_sum, correct, count = token_statistics(model(inputs).logits, labels)
    final = float(loss_sum / count)
    assert final < 0.25 * UNIGRAM_ENTROPY, (
        f"{attention}/{objective}: loss {final:.3f} did not fall far enough"
    )


def test_rotary_matches_complex_rotation_and_depends_only_on_offset():
    """RoPE against an independent complex-number formula; q.k then depends on i - j only."""
    from protein_lm.model import RotaryEmbedding

    torch.manual_seed(0)
    d, length = 8, 12
    rope = RotaryEmbedding(d)
    q = torch.randn(1, 1, length, d)
    k = torch.randn(1, 1, length, d)
    rq, rk = rope(q, k)
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(q[0, 0, :, : d // 2].double(), q[0, 0, :, d // 2 :].double()) * torch.exp(
        1j * pos * theta
    )
    torch.testing.assert_close(rq[0, 0].double(), torch.cat((z.real, z.imag), -1), atol=1e-5, rtol=1e-5)
    # Same vector at every position: the score matrix is Toeplitz (offset-only) and not constant.
    same_q, same_k = rope(q[:, :, :1].expand(1, 1, length, d), k[:, :, :1].expand(1, 1, length, d))
    scores = (same_q @ same_k.transpose(-1, -2))[0, 0]
    for offset in range(-length + 1, length):
        diag = torch.diagonal(scores, offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-4, rtol=1e-4)
    assert scores.std() > 1e-2


@pytest.mark.parametrize("attention", ["performer-softmax", "performer-relu", "exact"])
def test_positions_reach_the_attention(attention):
    """Without positions a bidirectional model is permutation-equivariant; with RoPE it is not."""
    torch.manual_seed(0)
    ids = torch.randint(4, 24, (1, 16))
    perm = torch.randperm(16)
    for position, equivariant in (("none", True), ("rotary", False)):
        torch.manual_seed(1)
        model = ProteinLM(
            ModelConfig(
                dim=32,
                depth=2,
                heads=2,
                ff_dim=64,
                attention=attention,
                num_features=32,
                position=position,
                feature_seed=0,
            )
        ).eval()
        with torch.no_grad():
            a = model(ids).logits[0, perm]
            b = model(ids[:, perm]).logits[0]
        assert torch.allclose(a, b, atol=1e-4) == equivariant, (attention, position)


def _triton_performer(causal: bool, dim: int, heads: int, max_length: int) -> ProteinLM:
    """A 2-layer Performer-softmax model on CUDA with the fused Triton kernels (d_ff = 2 dim, m = dim)."""
    sizes = dict(dim=dim, heads=heads, ff_dim=2 * dim, num_features=dim, max_length=max_length)
    return tiny("performer-softmax", causal, favor_backend="triton", **sizes).cuda().train()


@pytest.mark.gpu
@pytest.mark.parametrize(("causal", "mode"), [(False, None), (True, None), (False, "reduce-overhead")])
def test_gpu_compiled_model_matches_eager_and_keeps_triton_kernels(causal, mode):
    """`ProteinLM.compiled(mode)` (what `fit --model.compile true|MODE` runs): same logits and
    gradients as the eager model, with the fused FAVOR+ kernels still launched (not a silent PyTorch
    fallback), in one graph per pass."""
    import torch._dynamo

    from protein_lm.attention.ops import favor_triton

    model = _triton_performer(causal, dim=128, heads=4, max_length=512)
    cfg = model.config
    ids = random_ids(2, 300).cuda()
    launched = []
    real_forward = favor_triton._forward  # what the registered op runs, eager or compiled

    def spy(*args):
        plan = next(a for a in args if isinstance(a, favor_triton._Plan))
        launched.append(plan.causal)
        return real_forward(*args)

    results = []
    favor_triton._forward = spy
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # CUDA graphs: the 1st call warms up, the 2nd records, the 3rd replays (no Python launches)
    calls = 3 if mode == "reduce-overhead" else 1
    try:
        for fn, n in ((model, 1), (model.compiled(mode), calls)):
            for _ in range(n):
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = fn(ids).logits.float()
                logits.square().mean().backward()
            results.append((logits.detach().clone(), model.embed.weight.grad.detach().clone()))
            launched.append("end")
    finally:
        favor_triton._forward = real_forward
    eager, compiled = launched[: cfg.depth + 1], launched[cfg.depth + 1 : -1]
    assert eager == [causal] * cfg.depth + ["end"]  # each layer's kernels ran once
    assert compiled and set(compiled) == {causal}  # ... and inside the compiled graph too
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no graph break
    (le, ge), (lc, gc) = results
    assert ((lc - le).norm() / le.norm()).item() < 2e-2
    assert ((gc - ge).norm() / ge.norm()).item() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_compiled_model_follows_changing_lengths(causal):
    """Single-protein batches change length from batch to batch: after the first change the compiled
    model goes symbolic in L (the kernels' op computes its causal split count symbolically, without a
    graph break) and keeps matching the eager model without compiling again for every new length."""
    import torch._dynamo

    model = _triton_performer(causal, dim=64, heads=2, max_length=2048)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.compiled()
    for length in (300, 200, 1100, 257):
        ids = random_ids(2, length).cuda()
        pad = torch.zeros(2, length, dtype=torch.bool, device="cuda")
        pad[1, length // 2 :] = True  # a shorter second protein, as collate pads it
        grads = []
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fn(ids, pad).logits.float()
            logits[~pad].square().mean().backward()
            grads.append((logits[~pad].detach(), model.embed.weight.grad.detach().clone()))
        (le, ge), (lc, gc) = grads
        assert ((lc - le).norm() / le.norm()).item() < 2e-2, length
        assert ((gc - ge).norm() / ge.norm()).item() < 5e-2, length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then symbolic in L


@pytest.mark.parametrize("attention", ["exact", "performer-softmax"])
def test_return_hidden_matches_walking_the_blocks(attention):
    model = tiny(attention, depth=3)
    ids = random_ids(2, 10, seed=3)
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, return_hidden=[0, 1, 2, -1, -4])
        x = model.embed_tokens(ids)
        walked = [x]
        for block in model.blocks:
            x = block(x, None)
            walked.append(x)
        walked[-1] = model.norm(walked[-1])
    assert plain.hidden is None
    assert set(out.hidden) == {0, 1, 2, -1, -4}
    for given, layer in [(0, 0), (1, 1), (2, 2), (-1, 3), (-4, 0)]:
        torch.testing.assert_close(out.hidden[given], walked[layer], atol=0, rtol=0)
    torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
    with pytest.raises(IndexError, match="out of range"):
        model(ids, return_hidden=[4])
    with pytest.raises(IndexError, match="out of range"):
        model(ids, return_hidden=[-5])
