"""Component tests of ProteinDataModule: batches, splits, windows, masking, determinism, resume.

Expected values are computed from the FASTA text with a tiny independent reader, not through the
cache or the data module, so a bug there cannot hide itself.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from protein_lm.data.datamodule import DataConfigError, ProteinDataModule
from protein_lm.data.tokenizer import (
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    RESIDUES,
    STANDARD_AA,
    STANDARD_AA_IDS,
    TOKENS,
    VOCAB_SIZE,
    decode,
)
from tests.helpers.resume import fit_recording

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def read_fasta(path: Path) -> list[str]:
    """Independent minimal FASTA reader (upper-cased sequences, file order)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    seqs, cur = [], None
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if cur is not None:
                    seqs.append("".join(cur))
                cur = []
            elif line:
                cur.append(line.upper())
    if cur is not None:
        seqs.append("".join(cur))
    return seqs


def write_fasta(path: Path, seqs: list[str]) -> Path:
    with open(path, "w") as f:
        for i, s in enumerate(seqs):
            f.write(f">seq{i}\n")
            for j in range(0, len(s), 60):
                f.write(s[j : j + 60] + "\n")
    return path


def random_seqs(
    n: int, seed: int, lo: int = 1, hi: int = 300, alphabet: str = STANDARD_AA + "XBZUO"
) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list(alphabet))
    return ["".join(rng.choice(letters, size=int(rng.integers(lo, hi + 1)))) for _ in range(n)]


def residues_of(row: torch.Tensor) -> str:
    """Residue letters of a framed row (drops <cls>, <eos>, <pad>)."""
    return "".join(TOKENS[i] for i in row.tolist() if 4 <= i <= 30)


def unmasked(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The original ids of an MLM batch (labels hold the originals where something changed)."""
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def all_batches(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in loader]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.fixture()
def synth_fasta(tmp_path: Path) -> tuple[Path, list[str]]:
    """600 random sequences (some long) with 40 planted duplicate groups of 3 copies each."""
    seqs = random_seqs(480, seed=0) + random_seqs(40, seed=1, lo=400, hi=900)
    dups = random_seqs(40, seed=2)
    rng = np.random.default_rng(3)
    for d in dups:
        for _ in range(3):
            seqs.insert(int(rng.integers(0, len(seqs) + 1)), d)
    return write_fasta(tmp_path / "synth.fasta", seqs), seqs


def make_dm(path: Path, tmp_path: Path, **kw) -> ProteinDataModule:
    kw.setdefault("cache_root", str(tmp_path / "cache"))
    dm = ProteinDataModule(str(path), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["single", "concat"])
@pytest.mark.parametrize("objective", ["mlm", "causal"])
def test_batch_shapes_and_dtypes(synth_fasta, tmp_path, mode, objective):
    path, _ = synth_fasta
    L = 128
    dm = make_dm(path, tmp_path, mode=mode, objective=objective, max_length=L, batch_size=6, val_fraction=0.2)
    assert dm.vocab_size == VOCAB_SIZE == 33
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batches = all_batches(loader)
        assert batches
        for b in batches:
            assert set(b) == {"input_ids", "labels", "padding_mask"}
            assert b["input_ids"].dtype == torch.int64 and b["labels"].dtype == torch.int64
            assert b["padding_mask"].dtype == torch.bool
            B, W = b["input_ids"].shape
            assert b["labels"].shape == b["padding_mask"].shape == (B, W)
            assert 1 <= B <= 6 and W <= L
            assert ((b["input_ids"] >= 0) & (b["input_ids"] < VOCAB_SIZE)).all()
            assert torch.equal(b["padding_mask"], b["input_ids"] == PAD_ID)
            assert (b["labels"][b["padding_mask"]] == -100).all()
            if mode == "concat":
                assert W == L and not b["padding_mask"].any()
            else:
                ids = unmasked(b) if objective == "mlm" else b["input_ids"]
                assert (ids[:, 0] == CLS_ID).all()
                n_real = (~b["padding_mask"]).sum(1)
                assert (ids[torch.arange(B), n_real - 1] == EOS_ID).all()
                assert W == int(n_real.max()), "padding is dynamic: to the longest row"
                # padding only at the end of a row
                assert (b["padding_mask"].int().diff(dim=1) >= 0).all()


def test_masking_rates_on_real_data(sample_fasta, tmp_path):
    dm = make_dm(sample_fasta, tmp_path, max_length=512, batch_size=32)
    sel = eligible = masked = randomised = kept = 0
    special_selected = 0
    for b in dm.train_dataloader():
        orig = unmasked(b)
        s = b["labels"] != -100
        residue = (orig >= 4) & (orig <= 30)
        special_selected += int((s & ~residue).sum())
        sel += int(s.sum())
        eligible += int(residue.sum())
        inp = b["input_ids"][s]
        masked += int((inp == MASK_ID).sum())
        rnd = (inp != MASK_ID) & (inp != orig[s])
        randomised += int(rnd.sum())
        kept += int((inp == orig[s]).sum())
        assert torch.isin(inp[rnd], torch.tensor(STANDARD_AA_IDS)).all()
        # specials are never touched
        assert torch.equal(b["input_ids"][~residue], orig[~residue])
    assert eligible > 1e5
    assert special_selected == 0
    assert abs(sel / eligible - 0.15) < 0.005
    assert abs(masked / sel - 0.8) < 0.01
    assert abs(randomised / sel - 0.1 * 19 / 20) < 0.01  # 1/20 of random draws hit the original
    assert abs(kept / sel - (0.1 + 0.1 / 20)) < 0.01


def test_causal_labels_are_shifted_input_ids(synth_fasta, tmp_path):
    path, _ = synth_fasta
    for mode in ("single", "concat"):
        dm = make_dm(path, tmp_path, mode=mode, objective="causal", max_length=64, batch_size=4)
        for b in list(dm.train_dataloader())[:5] + list(dm.val_dataloader()):
            ids, labels, pad = b["input_ids"], b["labels"], b["padding_mask"]
            assert (labels[:, -1] == -100).all()
            target_real = ~pad[:, 1:]
            assert torch.equal(labels[:, :-1][target_real], ids[:, 1:][target_real])
            assert (labels[:, :-1][~target_real] == -100).all()
            assert not (ids == MASK_ID).any()


# --------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------


def split_contents(dm: ProteinDataModule) -> dict[str, list[str]]:
    """Sequence strings of each split, decoded from the loaders' batches (eval) and the cache (train)."""
    out = {}
    for name in ("train", "val", "test"):
        cache, ids = dm.split_indices(name)
        out[name] = [decode(cache.sequence(int(i))) for i in ids]
    return out


def test_no_content_in_two_splits(synth_fasta, tmp_path):
    path, seqs = synth_fasta
    dm = make_dm(path, tmp_path, val_fraction=0.2, test_fraction=0.2, max_length=2000)
    parts = split_contents(dm)
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(seqs), (
        "every sequence in one split"
    )
    sets = {k: set(v) for k, v in parts.items()}
    assert (
        not (sets["train"] & sets["val"])
        and not (sets["train"] & sets["test"])
        and not (sets["val"] & sets["test"])
    )
    # the planted duplicates (3 copies each) exist and all copies landed together
    counts = Counter(seqs)
    planted = [s for s, c in counts.items() if c >= 3]
    assert len(planted) >= 40
    for s in planted:
        homes = [k for k, v in parts.items() if s in v]
        assert len(homes) == 1 and parts[homes[0]].count(s) == counts[s]
    # split sizes follow the fractions (loosely: 600 sequences)
    n = len(seqs)
    assert 0.1 * n < len(parts["val"]) < 0.3 * n and 0.1 * n < len(parts["test"]) < 0.3 * n
    # val content also checked through the val loader's batches (windows cover whole sequences here)
    dm_c = make_dm(path, tmp_path, objective="causal", val_fraction=0.2, test_fraction=0.2, max_length=2000)
    seen_val = {residues_of(row) for b in dm_c.val_dataloader() for row in b["input_ids"]}
    assert seen_val == sets["val"]


def test_split_is_independent_of_seed_and_real_data_has_no_leak(sample_fasta, tmp_path):
    a = make_dm(sample_fasta, tmp_path, seed=0)
    b = make_dm(sample_fasta, tmp_path, seed=5)
    for name in ("train", "val", "test"):
        assert np.array_equal(a.split_indices(name)[1], b.split_indices(name)[1])
    parts = split_contents(a)
    sets = {k: set(v) for k, v in parts.items()}
    assert (
        not (sets["train"] & sets["val"])
        and not (sets["train"] & sets["test"])
        and not (sets["val"] & sets["test"])
    )
    total = sum(len(v) for v in parts.values())
    assert total == 4000
    assert 0.03 < len(parts["val"]) / total < 0.07


def test_explicit_val_and_test_fasta(synth_fasta, tmp_path):
    path, seqs = synth_fasta
    ood = random_seqs(30, seed=9, lo=20, hi=80) + seqs[:5]  # 5 that also occur in the main file
    val_path = write_fasta(tmp_path / "ood_val.fasta", ood)
    test_path = write_fasta(tmp_path / "ood_test.fasta", random_seqs(20, seed=10) + [ood[0]])
    dm = make_dm(
        path,
        tmp_path,
        val_fasta=str(val_path),
        test_fasta=str(test_path),
        val_fraction=0.1,
        test_fraction=0.1,
    )
    parts = split_contents(dm)
    assert sorted(parts["val"]) == sorted(ood)
    assert ood[0] not in parts["test"] and len(parts["test"]) == 20, (
        "a test sequence also in val stays in val only"
    )
    for s in seqs[:5]:
        assert s not in parts["train"], "explicit val content must not be trained on"
    assert not (set(parts["train"]) & set(parts["test"]))
    # the explicit sets replace the hashed shares: the rest of the main file trains
    assert len(parts["train"]) == sum(1 for s in seqs if s not in set(ood) | set(parts["test"]))


# --------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------


def test_concat_windows_decode_to_sequences_in_order(synth_fasta, tmp_path):
    path, _ = synth_fasta
    L = 100
    dm = make_dm(path, tmp_path, mode="concat", objective="mlm", max_length=L, batch_size=3, val_fraction=0.2)
    for split in ("val", "test"):
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        stream = torch.cat([unmasked(b).reshape(-1) for b in loader]).tolist()
        assert all(len(row) == L for b in loader for row in b["input_ids"])
        cache, ids = dm.split_indices(split)
        expected = [decode(cache.sequence(int(i))) for i in ids]
        full = "".join(s + "<eos>" for s in expected)
        text = decode(stream)
        assert len(stream) == (sum(len(s) + 1 for s in expected) // L) * L
        assert full.startswith(text), "windows must be consecutive slices of s1<eos>s2<eos>..."
        pieces = text.split("<eos>")
        assert pieces[:-1] == expected[: len(pieces) - 1]
        lost = sum(len(s) + 1 for s in expected) - len(stream)
        assert 0 <= lost < L, "at most one partial window is dropped"
    # training windows: exactly L, and in window order they are the stream rotated by an offset
    ds = dm.dataset("train")
    cache, ids = dm.split_indices("train")
    full_ids = []
    for i in ids:
        full_ids += cache.sequence(int(i)).tolist() + [EOS_ID]
    for epoch in (0, 1):
        batch = ds[(epoch, np.arange(len(ds)))]
        got = unmasked(batch).reshape(-1).tolist()
        off = ds.offset(epoch)
        rotated = (full_ids[off:] + full_ids[:off])[: len(got)]
        assert got == rotated
        assert batch["input_ids"].shape == (len(ds), L)
    assert ds.offset(0) != ds.offset(1)


def test_eval_windows_cover_every_residue_once(synth_fasta, tmp_path):
    path, _ = synth_fasta
    L = 50
    dm = make_dm(path, tmp_path, objective="mlm", max_length=L, batch_size=7, val_fraction=0.3)
    cache, ids = dm.split_indices("val")
    seqs = [decode(cache.sequence(int(i))) for i in ids]
    assert max(map(len, seqs)) > 3 * L, "fixture must hold sequences longer than a window"
    w = L - 2
    expected = Counter(s[j : j + w] for s in seqs for j in range(0, len(s), w))
    got, scored = Counter(), 0
    for b in dm.val_dataloader():
        orig = unmasked(b)
        for row in orig:
            got[residues_of(row)] += 1
        assert (orig[:, 0] == CLS_ID).all()
        scored += int(((orig >= 4) & (orig <= 30)).sum())
    assert got == expected
    assert scored == sum(map(len, seqs))
    # evaluation batches are fixed: the same across epochs and calls
    assert same_batches(all_batches(dm.val_dataloader()), all_batches(dm.val_dataloader()))


def test_train_crops_are_substrings_and_vary(synth_fasta, tmp_path):
    path, seqs = synth_fasta
    L = 64
    dm = make_dm(path, tmp_path, objective="causal", max_length=L, batch_size=8)
    ds = dm.dataset("train")
    long = np.flatnonzero(ds.lengths > L)[:10]
    crops = {}
    for epoch in range(3):
        b = ds[(epoch, long)]
        for i, row in zip(long, b["input_ids"], strict=True):
            r = residues_of(row)
            assert len(r) == L - 2 and (row[0] == CLS_ID) and (row[L - 1] == EOS_ID)
            full = decode(dm.split_indices("train")[0].sequence(int(ds.example_ids[i])))
            assert r in full
            crops.setdefault(int(i), set()).add(r)
    assert sum(len(v) > 1 for v in crops.values()) >= 8, "crop offsets must change with the epoch"


# --------------------------------------------------------------------------------------
# determinism and resume
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["single", "concat"])
def test_same_batches_with_0_or_2_workers(synth_fasta, tmp_path, mode):
    path, _ = synth_fasta
    kw = dict(mode=mode, max_length=96 if mode == "single" else 400, batch_size=5, seed=3)
    dm0 = make_dm(path, tmp_path, num_workers=0, **kw)
    dm2 = make_dm(path, tmp_path, num_workers=2, **kw)
    for epoch in (0, 1):
        dm0.set_epoch(epoch)
        l0 = dm0.train_dataloader()
        l0.sampler.set_epoch(epoch)
        l2 = dm2.train_dataloader()
        l2.sampler.set_epoch(epoch)
        a, b = all_batches(l0), all_batches(l2)
        assert same_batches(a, b)
    assert same_batches(all_batches(dm0.val_dataloader()), all_batches(dm2.val_dataloader()))
    # and the order really depends on (seed, epoch)
    e0 = all_batches(make_dm(path, tmp_path, **kw).train_dataloader())
    l = make_dm(path, tmp_path, **kw).train_dataloader()
    l.sampler.set_epoch(1)
    assert not same_batches(e0, all_batches(l))
    assert not same_batches(e0, all_batches(make_dm(path, tmp_path, **{**kw, "seed": 4}).train_dataloader()))


@pytest.mark.parametrize("mode", ["single", "concat"])
def test_resume_skips_exactly_the_consumed_batches(synth_fasta, tmp_path, mode):
    path, _ = synth_fasta
    kw = dict(mode=mode, max_length=80, batch_size=4, seed=1)
    ref = make_dm(path, tmp_path, **kw)
    loader = ref.train_dataloader()
    loader.sampler.set_epoch(2)
    full = all_batches(loader)
    assert len(full) > 6
    k = 5
    # a "killed" run: consumed k batches of epoch 2, then checkpointed
    run = make_dm(path, tmp_path, **kw)
    run.set_epoch(2)
    it = iter(run.train_dataloader())
    for _ in range(k):
        next(it)
        run.mark_batch_done()
    state = run.state_dict()
    assert state == {"epoch": 2, "batches_done": k}
    resumed = make_dm(path, tmp_path, num_workers=2, **kw)
    resumed.load_state_dict(state)
    rl = resumed.train_dataloader()
    assert len(rl) == len(full), "len() stays the full epoch (Lightning counts from batches_done)"
    tail = all_batches(rl)
    assert same_batches(tail, full[k:])
    # the skip ends with its epoch: the next epoch is complete and equals an uninterrupted epoch 3
    rl.sampler.set_epoch(3)
    loader.sampler.set_epoch(3)
    assert same_batches(all_batches(rl), all_batches(loader))


def test_ddp_shards_are_disjoint_and_even(synth_fasta, tmp_path):
    path, _ = synth_fasta
    dm = make_dm(path, tmp_path, max_length=96, batch_size=4)
    ds = dm.dataset("train")
    from protein_lm.data.sampler import ShardedBatchSampler

    plan = dm._plan("train")
    shards = [ShardedBatchSampler(ds, plan, num_replicas=3, rank=r, epoch=1, shuffle=True) for r in range(3)]
    got = [[tuple(idx.tolist()) for _, idx in s] for s in shards]
    assert len({len(g) for g in got}) == 1, "every rank gets the same number of batches"
    flat = [i for g in got for b in g for i in b]
    assert set(flat) == set(range(len(ds)))
    n_batches = len(plan(1))
    padded = 3 * len(got[0]) - n_batches
    assert 0 <= padded < 3
    assert len(set(got[0]) & set(got[1])) <= padded


def test_tokens_per_batch(synth_fasta, tmp_path):
    path, _ = synth_fasta
    budget = 1024
    dm = make_dm(path, tmp_path, max_length=256, tokens_per_batch=budget, batch_size=1)
    ds = dm.dataset("train")
    counts = []
    for epoch in (0, 1):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        seen = []
        for _, idx in loader.sampler:
            seen += idx.tolist()
            b = ds[(epoch, idx)]
            assert b["input_ids"].numel() <= budget
        assert sorted(seen) == list(range(len(ds)))
        counts.append(len(loader))
    assert counts[0] == counts[1]
    assert counts[0] < len(ds) / 2, "short sequences share batches"


def test_max_sequences_caps(synth_fasta, tmp_path):
    path, _ = synth_fasta
    dm = make_dm(path, tmp_path, max_train_sequences=17, max_eval_sequences=5)
    assert len(dm.split_indices("train")[1]) == 17 and len(dm.split_indices("val")[1]) == 5
    again = make_dm(path, tmp_path, max_train_sequences=17, max_eval_sequences=5, seed=9)
    assert np.array_equal(dm.split_indices("train")[1], again.split_indices("train")[1])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mode": "pairs"}, "'pairs'"),
        ({"objective": "bert"}, "'bert'"),
        ({"max_length": 2}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction"),
        ({"val_fraction": -0.1}, "-0.1"),
        ({"mask_prob": 1.5}, "1.5"),
        ({"mode": "concat", "tokens_per_batch": 4096}, "tokens_per_batch"),
        ({"tokens_per_batch": 100}, "tokens_per_batch"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fasta": "/nonexistent/val.fasta"}, "/nonexistent/val.fasta"),
    ],
)
def test_bad_arguments_raise_clear_errors(sample_fasta, kwargs, needle):
    with pytest.raises(DataConfigError, match=None) as err:
        ProteinDataModule(str(sample_fasta), **kwargs)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataConfigError, match="no such file"):
        ProteinDataModule(str(tmp_path / "nope.fasta"))


def test_constructor_args_are_plain_types():
    """LightningCLI/jsonargparse sets every argument from YAML: only str/int/float/bool/None."""
    import inspect

    sig = inspect.signature(ProteinDataModule.__init__)
    allowed = {"str", "int", "float", "bool", "None"}
    for name, p in sig.parameters.items():
        if name == "self":
            continue
        parts = {t.strip() for t in str(p.annotation).split("|")}
        assert parts <= allowed, (name, p.annotation)


def test_alphabet_residue_block_matches_collate():
    # collate treats ids 4..30 as residues; this must be the tokenizer's residue block
    assert [TOKENS[i] for i in range(4, 31)] == list(RESIDUES)


# --------------------------------------------------------------------------------------
# exact resume under a real Lightning Trainer (the contract the LightningModule relies on)
# --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_matches_uninterrupted_run(synth_fasta, tmp_path, num_workers):
    path, _ = synth_fasta
    kw = dict(max_length=64, batch_size=4, max_train_sequences=36, max_eval_sequences=4, seed=2)
    ckpts = tmp_path / "ckpt"
    full = fit_recording(make_dm(path, tmp_path, num_workers=num_workers, **kw), ckpts)
    per_epoch = 9
    assert len(full) == 3 * per_epoch
    assert [e for e, _ in full] == [0] * 9 + [1] * 9 + [2] * 9
    assert full[:9] != full[9:18], "each epoch has its own order"
    # resume from: mid-epoch 1, the last batch of epoch 0, and the end-of-epoch-0 checkpoint
    checkpoints = [("step=13", 13), ("step=9", 9), ("step=4", 4), ("epoch=0", 9), ("val-step=13", 13)]
    checkpoints += [("val-step=4", 4), ("val-step=8", 8), ("val-step=17", 17)]
    for name, done in checkpoints:
        ckpt = ckpts / f"{name}.ckpt"
        state = torch.load(ckpt, weights_only=False)["ProteinDataModule"]
        assert state == {"epoch": done // per_epoch, "batches_done": done % per_epoch}, (name, state)
        resumed = fit_recording(
            make_dm(path, tmp_path, num_workers=num_workers, **kw), tmp_path / f"r-{name}", ckpt_path=ckpt
        )
        assert resumed == full[done:], f"resume from {name} diverged"


def test_evaluation_dataloader_scores_whole_file_reproducibly(synth_fasta, tmp_path):
    path, seqs = synth_fasta
    dm = ProteinDataModule(str(path), cache_root=str(tmp_path / "cache"), max_length=100, batch_size=8)
    a = all_batches(dm.evaluation_dataloader(str(path), max_sequences=50))
    b = all_batches(dm.evaluation_dataloader(str(path), max_sequences=50))
    assert same_batches(a, b)
    scored = sum(int(((unmasked(x) >= 4) & (unmasked(x) <= 30)).sum()) for x in a)
    assert scored == sum(len(s) for s in seqs[:50])
    assert sum(int((x["labels"] != -100).sum()) for x in a) > 0
