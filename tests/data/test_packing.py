"""``mode: packed``: the plan, the batches, the model on packed rows, resume and refusals.

The references are the same examples in single mode (one padded row each, through the single-mode
code, which tests/data/test_datamodule.py checks against the FASTA text) and plain loops over the rows.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protein_lm.attention.exact_segments import (
    allowed_in_segments,
    positions_from_segments,
    segment_attention,
    segment_mask,
)
from protein_lm.data.datamodule import DataConfigError, ProteinDataModule
from protein_lm.data.packing import PackedPlan, pack_rows
from protein_lm.data.tokenizer import EOS_ID, PAD_ID
from protein_lm.lit_module import ProteinLMModule, token_statistics
from protein_lm.model import ModelConfig, ProteinLM
from tests.commands.test_train_errors import TINY, _one_line_error
from tests.data.test_datamodule import make_dm, random_seqs, same_batches, write_fasta
from tests.helpers.resume import fit_recording
from tests.test_resume import fit, step_losses, val_losses

L = 64  # row length of the synthetic tests: several short proteins per row, long ones cropped


@pytest.fixture()
def short_fasta(tmp_path):
    """160 proteins of 1..60 residues and 12 of 100..200 (cropped to 62 in training, windows in eval)."""
    seqs = random_seqs(160, seed=5, lo=1, hi=60) + random_seqs(12, seed=6, lo=100, hi=200)
    return write_fasta(tmp_path / "short.fasta", seqs)


def pair(path, tmp_path, **kw) -> tuple[ProteinDataModule, ProteinDataModule]:
    """A packed and a single-mode data module of the same data and settings."""
    kw = {"max_length": L, "batch_size": 3, "val_fraction": 0.2, "test_fraction": 0.0, "seed": 4, **kw}
    return make_dm(path, tmp_path, mode="packed", **kw), make_dm(path, tmp_path, mode="single", **kw)


def segments_of(batch: dict, r: int) -> list[np.ndarray]:
    """Token positions of each protein of row ``r``, in order (a loop over the row)."""
    seg, pad = batch["segment_ids"][r].tolist(), batch["padding_mask"][r].tolist()
    out: list[list[int]] = []
    for t, (s, p) in enumerate(zip(seg, pad, strict=True)):
        if p:
            continue
        if not out or seg[out[-1][-1]] != s:
            out.append([])
        out[-1].append(t)
    return [np.array(x) for x in out]


# --------------------------------------------------------------------------------------
# the packer and the plan
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [16, 64, 1000])
def test_pack_rows_is_a_complete_any_fit_packing(capacity):
    rng = np.random.default_rng(capacity)
    sizes = rng.integers(1, capacity + 1, size=500)
    sizes[:100] = rng.integers(1, max(2, capacity // 8), size=100)  # plenty of small items
    order = np.lexsort((rng.random(500), -sizes))
    rows = pack_rows(sizes, order, capacity)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(500))
    used = np.array([sizes[row].sum() for row in rows])
    assert used.max() <= capacity
    # Any-fit: a row is opened only when its first item fits no open row, so no two rows could be
    # merged; hence at most one row is half empty and padding < 50 % + one row on any input.
    two_emptiest = np.sort(used)[:2]
    assert len(rows) == 1 or two_emptiest.sum() > capacity
    # The rows' shapes depend on sizes[order] only: swapping two equal-sized items swaps them in the rows.
    values, counts = np.unique(sizes, return_counts=True)
    a, b = np.flatnonzero(sizes == values[counts >= 2][0])[:2].tolist()
    swapped = order.copy()
    ia, ib = int(np.flatnonzero(order == a)[0]), int(np.flatnonzero(order == b)[0])
    swapped[[ia, ib]] = swapped[[ib, ia]]
    rename = {a: b, b: a}
    assert pack_rows(sizes, swapped, capacity) == [[rename.get(i, i) for i in row] for row in rows]


def test_plan_is_whole_once_and_pure_in_seed_and_epoch(short_fasta, tmp_path):
    packed, _ = pair(short_fasta, tmp_path)
    ds = packed.dataset("train")
    tl = ds.token_lengths()
    plan = packed._plan("train")
    epochs = [plan(e) for e in range(3)]
    for batches in epochs:
        idx = np.concatenate([b[b >= 0] for b in batches])
        assert sorted(idx.tolist()) == list(range(len(ds))), "every example exactly once per epoch"
        assert len(batches) == len(epochs[0]), "the same number of batches every epoch"
        assert sum(len(b) < packed.rows_per_batch for b in batches) <= 1
        assert all(len(b) <= packed.rows_per_batch for b in batches)
        for b in batches:
            for row in b:
                assert tl[row[row >= 0]].sum() <= L
    as_lists = [[b.tolist() for b in batches] for batches in epochs]
    assert as_lists[0] != as_lists[1] != as_lists[2]
    fresh = make_dm(short_fasta, tmp_path, mode="packed", max_length=L, batch_size=3, val_fraction=0.2,
                    test_fraction=0.0, seed=4)._plan("train")
    assert [b.tolist() for b in fresh(1)] == as_lists[1], "a pure function of (seed, epoch)"
    other = PackedPlan(tl, max_length=L, rows_per_batch=3, shuffle=True, seed=5)
    assert [b.tolist() for b in other(1)] != as_lists[1]
    # evaluation: every window once, the same batches whatever the epoch
    val = packed._plan("val")
    assert sorted(np.concatenate([b[b >= 0] for b in val(0)]).tolist()) == list(range(len(packed.dataset("val"))))
    assert [b.tolist() for b in val(0)] == [b.tolist() for b in val(5)]


def test_rows_per_batch_from_the_token_budget(short_fasta, tmp_path):
    dm = make_dm(short_fasta, tmp_path, mode="packed", max_length=L, batch_size=3, tokens_per_batch=5 * L + 7)
    assert dm.rows_per_batch == 5
    assert max(len(b) for b in dm._plan("train")(0)) == 5
    assert all(b["input_ids"].shape == (5, L) for b in list(dm.train_dataloader())[:-1])
    with pytest.raises(DataConfigError, match="tokens_per_batch must be an integer >= 64"):
        ProteinDataModule(str(short_fasta), mode="packed", max_length=L, tokens_per_batch=L - 1)
    with pytest.raises(DataConfigError, match="applies to mode='single' or 'packed' only"):
        ProteinDataModule(str(short_fasta), mode="concat", max_length=L, tokens_per_batch=4 * L)
    with pytest.raises(DataConfigError, match="holds no packed row"):  # an evaluation budget below one row
        dm.evaluation_dataloader(str(short_fasta), tokens_per_batch=L - 1)


@pytest.mark.parametrize("max_length, slack_rows", [(1024, 1), (256, 0.04)])
def test_padding_on_the_shipped_sample(sample_fasta, tmp_path, max_length, slack_rows):
    """No packing has fewer rows than ceil(tokens / max_length); best-fit decreasing on the sample's
    lengths (median 295) gets within one row of that bound at L = 1024 (0.1 % padding) and within 4 %
    of it at L = 256, where 57 % of the proteins are cropped to whole rows and too few short ones are
    left to fill the other rows' gaps (docs/data.md)."""
    dm = make_dm(sample_fasta, tmp_path, mode="packed", max_length=max_length, batch_size=8)
    plan = dm._plan("train")
    tokens = int(dm.dataset("train").token_lengths().sum())
    bound = math.ceil(tokens / max_length)
    rows = sum(len(b) for b in plan(0))
    assert rows == plan.num_rows >= bound
    assert rows <= (bound + 1 if slack_rows == 1 else bound * (1 + slack_rows))
    assert plan.padding_fraction() == pytest.approx(1 - tokens / (rows * max_length))
    assert f"{rows:,} rows, {100 * plan.padding_fraction():.2f}% padding" in dm.describe()
    val = dm.val_dataloader()
    padded = sum(int(b["padding_mask"].sum()) for b in val)
    total = sum(b["padding_mask"].numel() for b in val)
    assert dm._plan("val").padding_fraction() == pytest.approx(padded / total)


# --------------------------------------------------------------------------------------
# the batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["mlm", "causal"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_packed_rows_hold_the_single_mode_rows(short_fasta, tmp_path, objective, split):
    packed, single = pair(short_fasta, tmp_path, objective=objective)
    epoch = 2
    n_proteins = 0
    for rows in packed._plan(split)(epoch):
        b = packed.dataset(split)[(epoch, rows)]
        idx = rows[rows >= 0]
        s = single.dataset(split)[(epoch, idx)]  # the same examples, one padded row each
        assert set(b) == {"input_ids", "labels", "padding_mask", "segment_ids", "positions"}
        assert b["input_ids"].shape == (len(rows), L) and b["segment_ids"].dtype == torch.int32
        assert b["positions"].dtype == torch.int32 and b["padding_mask"].dtype == torch.bool
        assert (b["segment_ids"].diff(dim=1) >= 0).all()
        assert (b["padding_mask"].int().diff(dim=1) >= 0).all(), "padding only at a row's tail"
        assert torch.equal(b["padding_mask"], b["input_ids"] == PAD_ID)
        assert (b["labels"][b["padding_mask"]] == -100).all()
        j = 0
        for r in range(len(rows)):
            for at in segments_of(b, r):
                n = int((~s["padding_mask"][j]).sum())
                assert len(at) == n and (np.diff(at) == 1).all(), "a protein is one run, never split"
                for key in ("input_ids", "labels"):  # same tokens, same masks, same labels
                    assert torch.equal(b[key][r, at], s[key][j, :n]), (key, r, j)
                assert b["positions"][r, at].tolist() == list(range(n))
                if objective == "causal":  # never the next protein's <cls>
                    assert b["input_ids"][r, at[-1]] == EOS_ID and b["labels"][r, at[-1]] == -100
                j += 1
        assert j == len(idx)
        n_proteins += j
    assert n_proteins == len(packed.dataset(split))


def test_loaders_give_the_same_batches_with_0_or_2_workers(short_fasta, tmp_path):
    kw = dict(mode="packed", max_length=L, batch_size=3, seed=1)
    a, b = make_dm(short_fasta, tmp_path, num_workers=0, **kw), make_dm(short_fasta, tmp_path, num_workers=2, **kw)
    la, lb = a.train_dataloader(), b.train_dataloader()
    la.sampler.set_epoch(1)
    lb.sampler.set_epoch(1)
    assert same_batches(list(la), list(lb))
    assert same_batches(list(a.val_dataloader()), list(b.val_dataloader()))


def test_evaluation_dataloader_packs_every_window_of_a_file(short_fasta, tmp_path):
    packed, single = pair(short_fasta, tmp_path)
    p, s = [list(dm.evaluation_dataloader(str(short_fasta), max_sequences=100, tokens_per_batch=4 * L))
            for dm in (packed, single)]
    assert all(b["input_ids"].shape[1] == L and len(b["input_ids"]) <= 4 for b in p)
    windows = sum(len(segments_of(b, r)) for b in p for r in range(len(b["input_ids"])))
    assert windows == sum(len(b["input_ids"]) for b in s), "every window once (one row each in single mode)"
    for key in ("input_ids", "labels"):  # the same windows and fixed masks, packed differently
        got, want = (sorted(torch.cat([b[key][~b["padding_mask"]] for b in x]).tolist()) for x in (p, s))
        assert got == want, key
    assert sum(int((b["labels"] != -100).sum()) for b in p) > 0


def test_ddp_ranks_get_disjoint_packed_batches(short_fasta, tmp_path):
    from protein_lm.data.sampler import ShardedBatchSampler

    dm = make_dm(short_fasta, tmp_path, mode="packed", max_length=L, batch_size=2)
    ds, plan = dm.dataset("train"), dm._plan("train")
    shards = [ShardedBatchSampler(ds, plan, num_replicas=3, rank=r, epoch=1, shuffle=True) for r in range(3)]
    got = [[rows for _, rows in s] for s in shards]
    assert len({len(g) for g in got}) == 1, "every rank gets the same number of batches"
    seen = [int(i) for g in got for rows in g for i in rows[rows >= 0]]
    assert set(seen) == set(range(len(ds)))
    repeated = 3 * len(got[0]) - len(plan(1))  # batches repeated so that the ranks come out even
    assert 0 <= repeated < 3 and len(seen) - len(ds) == sum(int((b >= 0).sum()) for b in plan(1)[:repeated])


# --------------------------------------------------------------------------------------
# the model on packed rows
# --------------------------------------------------------------------------------------


def _model(attention: str, objective: str, position: str, **extra) -> ProteinLM:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=4, ff_dim=64, num_features=16, attention=attention,
                      causal=objective == "causal", position=position, max_length=L, favor_backend="torch",
                      feature_seed=3, **extra)
    model = ProteinLM(cfg).double()
    with torch.no_grad():
        model.head_bias.normal_(0.0, 0.5)
    return model


def _loss_and_grads(model: ProteinLM, batch: dict, packed: bool):
    kw = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]} if packed else {}
    model.zero_grad()
    logits = model(batch["input_ids"], batch["padding_mask"], **kw).logits
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=-100, reduction="sum")  # float64
    count = (batch["labels"] != -100).sum()
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss_sum.detach(), grads


CASES = [(att, obj, pos) for att in ("exact", "performer-softmax", "performer-relu")
         for obj in ("mlm", "causal") for pos in ("rotary", "learned")]


@pytest.mark.parametrize("attention, objective, position", CASES)
def test_packed_loss_metrics_and_gradients_equal_padded(short_fasta, tmp_path, attention, objective, position):
    packed, single = pair(short_fasta, tmp_path, objective=objective, batch_size=4)
    rows = max(packed._plan("train")(1), key=lambda r: (r >= 0).sum())  # the batch with most proteins
    assert (rows >= 0).sum(axis=1).max() >= 3, "rows must hold several proteins for the test to mean much"
    b = packed.dataset("train")[(1, rows)]
    s = single.dataset("train")[(1, rows[rows >= 0])]
    model = _model(attention, objective, position)
    pl, ploss, pgrad = _loss_and_grads(model, b, packed=True)
    sl, sloss, sgrad = _loss_and_grads(model, s, packed=False)
    j = 0
    for r in range(len(rows)):
        for at in segments_of(b, r):
            torch.testing.assert_close(pl[r, at], sl[j, : len(at)], atol=1e-10, rtol=1e-10)
            j += 1
    torch.testing.assert_close(ploss, sloss, atol=1e-10, rtol=1e-12)
    assert float(sloss) > 0 and set(pgrad) == set(sgrad)
    for name, g in sgrad.items():
        torch.testing.assert_close(pgrad[name], g, atol=1e-10, rtol=1e-8, msg=name)
    # the module's metrics: the same sums, correct predictions and token counts
    for got, want in zip(token_statistics(pl, b["labels"]), token_statistics(sl, s["labels"]), strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-6)


def test_product_key_memory_keeps_packed_equal_to_padded(short_fasta, tmp_path):
    packed, single = pair(short_fasta, tmp_path)
    rows = packed._plan("train")(0)[0]
    b, s = packed.dataset("train")[(0, rows)], single.dataset("train")[(0, rows[rows >= 0])]
    model = _model("exact", "mlm", "rotary", pkm={"layers": [-1], "num_keys": 8, "topk": 4, "heads": 2,
                                                 "key_dim": 16})
    _, ploss, pgrad = _loss_and_grads(model, b, packed=True)
    _, sloss, sgrad = _loss_and_grads(model, s, packed=False)
    torch.testing.assert_close(ploss, sloss, atol=1e-10, rtol=1e-12)
    for name, g in sgrad.items():
        torch.testing.assert_close(pgrad[name], g, atol=1e-10, rtol=1e-8, msg=name)


def test_positions_given_or_derived_and_the_segment_rule():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]], dtype=torch.int32)
    expected = []
    for row in seg.tolist():  # a loop over the runs
        pos, prev, p = [], None, 0
        for s in row:
            p = 0 if s != prev else p + 1
            pos.append(p)
            prev = s
        expected.append(pos)
    assert positions_from_segments(seg).tolist() == expected
    model = _model("exact", "mlm", "rotary")
    ids = torch.randint(4, 30, seg.shape)
    a = model(ids, segment_ids=seg).logits
    b = model(ids, segment_ids=seg, positions=torch.tensor(expected)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="give segment_ids too"):
        model(ids, positions=torch.tensor(expected))


@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_equals_the_dense_mask(causal):
    """The CUDA path's mask_mod and BlockMask against the boolean mask (forward: flex runs unfused on CPU)."""
    torch.manual_seed(0)
    seg = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4 + [3] * 4, [0] * 13 + [1] * 11], dtype=torch.int32)
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[0, 20:] = True  # the padding tail: segment 3
    q, k, v = (torch.randn(2, 3, 24, 8, dtype=torch.float64) for _ in range(3))
    dense = segment_attention(q, k, v, segment_mask(seg, pad, causal, backend="dense"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": meant here
        flex = segment_attention(q, k, v, segment_mask(seg, pad, causal, backend="flex"))
    torch.testing.assert_close(flex, dense, atol=1e-12, rtol=1e-12)
    # the dense mask itself, from a loop
    allowed = allowed_in_segments(seg, pad, causal)
    for b in range(2):
        for t in range(24):
            for s in range(24):
                want = bool(seg[b, t] == seg[b, s]) and not bool(pad[b, s]) and (s <= t or not causal)
                assert bool(allowed[b, 0, t, s]) == want
    assert (dense[0, :, 20:] == 0).all(), "a padded query with no key to attend gets 0"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_flex_path_on_cuda_matches_the_dense_reference(causal):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, depth=2, heads=4, ff_dim=128, attention="exact", causal=causal, max_length=256)
    model = ProteinLM(cfg).cuda()
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 100, 3, 90, 23]))[None].repeat(2, 1)
    seg = seg.to(torch.int32).cuda()
    pad = seg == 4
    ids = torch.randint(4, 30, seg.shape, device="cuda").masked_fill(pad, PAD_ID)
    out = model(ids, pad, segment_ids=seg).logits
    pos = positions_from_segments(seg)
    segments = model.segments(seg, pos, pad, backend="dense")
    x = model.embed_tokens(ids, pos)
    for block in model.blocks:
        x = block(x, pad, segments)
    ref = F.linear(model.norm(x), model.embed.weight, model.head_bias)
    torch.testing.assert_close(out[~pad], ref[~pad], atol=2e-4, rtol=2e-4)
    out[~pad].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------
# training and evaluation through the LightningModule; resume
# --------------------------------------------------------------------------------------


def test_validation_metrics_packed_equal_single(short_fasta, tmp_path):
    import pytorch_lightning as pl

    packed, single = pair(short_fasta, tmp_path)
    torch.manual_seed(0)
    module = ProteinLMModule(ModelConfig(dim=32, depth=2, heads=4, ff_dim=64, attention="exact", max_length=L))
    results = []
    for dm in (packed, single):
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        results.append(trainer.validate(module, datamodule=dm, verbose=False)[0])
    p, s = results
    assert p["val/num_tokens"] == s["val/num_tokens"] > 0
    batch = next(iter(packed.val_dataloader()))
    predicted = module.predict_step(batch, 0)
    assert torch.equal(predicted["segment_ids"], batch["segment_ids"])
    for key in ("val/loss", "val/accuracy"):
        assert p[key] == pytest.approx(s[key], abs=1e-5), key


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_lightning_resume_in_packed_mode_matches_uninterrupted_run(short_fasta, tmp_path):
    kw = dict(mode="packed", max_length=L, batch_size=3, max_train_sequences=60, max_eval_sequences=6, seed=2,
              num_workers=2)
    ckpts = tmp_path / "ckpt"
    full = fit_recording(make_dm(short_fasta, tmp_path, **kw), ckpts)
    per_epoch = len(full) // 3
    assert per_epoch >= 4 and [e for e, _ in full] == [e for e in range(3) for _ in range(per_epoch)]
    assert full[:per_epoch] != full[per_epoch : 2 * per_epoch], "each epoch has its own rows and order"
    mid = per_epoch + per_epoch // 2
    for name, done in [(f"step={mid}", mid), ("epoch=0", per_epoch), (f"step={per_epoch - 1}", per_epoch - 1)]:
        resumed = fit_recording(make_dm(short_fasta, tmp_path, **kw), tmp_path / f"r-{name}",
                                ckpt_path=ckpts / f"{name}.ckpt")
        assert resumed == full[done:], f"resume from {name} diverged"


PACKED_RUN = ["--data.mode", "packed", "--data.max_length", "96", "--data.batch_size", "3"]


def test_sigkill_then_resume_in_packed_mode_matches_uninterrupted_run(tmp_path):
    """The Performer debug model (dropout and redraws on) trained on packed rows, killed after step 7."""
    a, b = tmp_path / "a", tmp_path / "b"
    straight = fit(a, *PACKED_RUN)
    assert "mode=packed" in straight.stdout + straight.stderr
    killed = fit(b, *PACKED_RUN, "--trainer.callbacks+=helpers.callbacks.KillAtStep", "--trainer.callbacks.step",
                 "7", check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    fit(b, *PACKED_RUN, "--ckpt_path", "last")
    ref, resumed = step_losses(a), step_losses(b)
    assert sorted(ref) == list(range(14))
    for step in range(14):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6, rel=0), f"step {step}"
    assert val_losses(b) == pytest.approx(val_losses(a), abs=1e-6) and len(val_losses(a)) == 2


# --------------------------------------------------------------------------------------
# options that cannot keep proteins apart
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (["--model.config.attention", "exact", "--model.config.span.enabled", "true"],
     "--data.mode packed cannot be used with --model.config.span.enabled true: adaptive spans mask by distance"),
    (["--model.config.span.enabled", "true", "--model.config.span.dynamic", "true"],
     "--data.mode packed cannot be used with --model.config.span.enabled true"),
    (["--model.config.memory.slots", "4"],
     "--data.mode packed cannot be used with --model.config.memory.slots 4: the persistent-memory kernels"),
    (["--model.config.memory.slots", "4", "--model.config.memory.replace_ffn", "true"],
     "--model.config.memory.slots 4"),
])
def test_options_that_would_mix_proteins_are_refused(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    line = _one_line_error(capsys, ["fit", *TINY, "--data.mode", "packed", "--output_dir", out, *options], "fit")
    assert message in line and line.endswith("use --data.mode single")
    assert not out.exists()


def test_the_model_refuses_segments_it_cannot_respect():
    model = ProteinLM(ModelConfig(dim=32, depth=1, heads=4, ff_dim=64, attention="exact", memory={"slots": 2}))
    ids = torch.randint(4, 30, (1, 10))
    seg = torch.tensor([[0] * 4 + [1] * 6])
    with pytest.raises(ValueError, match="not supported with memory.slots=2"):
        model(ids, segment_ids=seg)
    model(ids)  # one protein per row is fine


def test_repeated_ids_are_separate_proteins_for_every_attention_kind():
    """A segment is a run of equal ids: 0 0 1 1 0 0 is three proteins, for exact as for FAVOR."""
    torch.manual_seed(0)
    ids = torch.randint(4, 24, (1, 6))
    for attention in ("exact", "performer-softmax"):
        model = ProteinLM(ModelConfig(dim=16, depth=1, heads=2, ff_dim=32, num_features=8, attention=attention,
                                      max_length=16)).double().eval()
        repeated = model(ids, segment_ids=torch.tensor([[0, 0, 1, 1, 0, 0]])).logits
        runs = model(ids, segment_ids=torch.tensor([[0, 0, 1, 1, 2, 2]])).logits
        torch.testing.assert_close(repeated, runs, rtol=0, atol=0)
        # and the third protein alone gives the same outputs as in the packed row
        alone = model(ids[:, 4:]).logits
        torch.testing.assert_close(runs[:, 4:], alone, rtol=1e-10, atol=1e-10)
