"""Attention extraction on tiny random models, and `protein-lm analyze` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from protein_lm.analysis.attention_maps import (
    accumulate_similarity,
    attention_map,
    frame,
    iter_attention_blocks,
)
from protein_lm.checkpoint import save_weights, weights_payload
from protein_lm.cli import main
from protein_lm.data.tokenizer import PAD_ID, STANDARD_AA, encode
from protein_lm.model import ModelConfig, ProteinLM

KINDS = ("performer-softmax", "performer-relu", "exact")


def tiny_model(attention: str = "performer-softmax", causal: bool = False, depth: int = 2) -> ProteinLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=16,
        depth=depth,
        heads=2,
        ff_dim=32,
        attention=attention,
        num_features=32,
        causal=causal,
        favor_backend="torch",
        feature_seed=0,
    )
    return ProteinLM(cfg).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMDEFY"]
    ids = [encode(s) for s in seqs]
    length = max(map(len, ids))
    batch = torch.full((len(ids), length), PAD_ID, dtype=torch.long)
    for i, row in enumerate(ids):
        batch[i, : len(row)] = torch.tensor(row)
    return batch, batch.eq(PAD_ID)


def assemble(model, ids, mask, max_block_elements):
    """Full (layers, B, H, L, L) from the row blocks; checks rows are covered exactly once."""
    depth, heads = len(model.blocks), model.config.heads
    b, length = ids.shape
    out = torch.full((depth, b, heads, length, length), float("nan"))
    for layer, start, block in iter_attention_blocks(model, ids, mask, max_block_elements=max_block_elements):
        rows = block.shape[2]
        assert torch.isnan(out[layer, :, :, start : start + rows]).all()
        out[layer, :, :, start : start + rows] = block.float()
    assert not torch.isnan(out).any()
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("attention", KINDS)
def test_row_blocks_match_model_attention_maps(attention, causal):
    model = tiny_model(attention, causal)
    ids, mask = padded_batch()
    blocks = assemble(model, ids, mask, max_block_elements=2 * 2 * ids.shape[1] * 5)  # 5 rows per block
    for layer, full in model.attention_maps(ids, mask):
        torch.testing.assert_close(blocks[layer], full.float(), rtol=1e-5, atol=1e-6)
    real = ~mask
    sums = blocks.sum(-1)  # (layers, B, H, L)
    torch.testing.assert_close(sums[..., real[0]][:, 0], torch.ones_like(sums[..., real[0]][:, 0]))
    assert torch.all(blocks[:, 1, :, :, mask[1]] == 0)  # padded keys get no attention
    if causal:
        future = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        assert torch.all(blocks[..., future] == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("attention", ["performer-softmax", "performer-relu"])
def test_implied_attention_times_v_is_the_favor_output(attention, causal):
    """For every layer: (implied attention from our extraction path) @ V == FavorAttention(q, k, v)."""
    model = tiny_model(attention, causal, depth=3)
    ids, mask = padded_batch()
    captured = {}

    def hook(layer):
        def fn(module, args, kwargs, output):
            q, k, v = args[:3]
            captured[layer] = (v.detach(), output.detach(), kwargs.get("key_padding_mask"))

        return fn

    handles = [
        block.attn.kernel.register_forward_hook(hook(i), with_kwargs=True)
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(ids, mask)
    for h in handles:
        h.remove()
    maps = assemble(model, ids, mask, max_block_elements=2 * 2 * ids.shape[1] * 7)
    for layer, (v, out, kpm) in captured.items():
        assert kpm is not None and torch.equal(kpm, mask)
        real = ~mask  # (B, L): compare real query positions only
        via_maps = maps[layer] @ v.float()
        torch.testing.assert_close(
            via_maps[real[:, None, :].expand(-1, 2, -1)],
            out[real[:, None, :].expand(-1, 2, -1)],
            rtol=1e-4,
            atol=1e-5,
        )
        rows = maps[layer].sum(-1)
        torch.testing.assert_close(
            rows[real[:, None, :].expand(-1, 2, -1)],
            torch.ones_like(rows[real[:, None, :].expand(-1, 2, -1)]),
        )


def test_attention_map_of_one_protein_drops_specials():
    model = tiny_model("exact")
    seq = "RPDFCLEPPYTGPCKARIIRYFYNAKAGLCQTFVYGGCRAKRNNFKSAEDCMRTCGGA"  # BPTI, 58 aa
    ids = frame(np.array(encode(seq, add_special_tokens=False)))
    assert ids.shape == (1, 60) and ids[0, 0].item() == 0 and ids[0, -1].item() == 2
    maps = attention_map(model, ids)
    assert maps.shape == (2, 2, 58, 58)
    with_specials = attention_map(model, ids, layers=[-1], residues_only=False)
    assert with_specials.shape == (1, 2, 60, 60)
    np.testing.assert_allclose(with_specials.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(maps[1], with_specials[0, :, 1:-1, 1:-1])


def test_accumulate_similarity_counts_sequences_and_block_size_does_not_matter():
    model = tiny_model("performer-softmax")
    rng = np.random.default_rng(0)
    seqs = [(f"s{i}", rng.integers(4, 24, size=n).astype(np.uint8)) for i, n in enumerate((30, 45, 12))]
    small = accumulate_similarity(model, seqs, max_block_elements=2 * 47 * 4)
    big = accumulate_similarity(model, seqs)
    assert small.num_sequences == 3
    np.testing.assert_allclose(small.mass, big.mass, rtol=1e-5)
    assert small.mass.shape == (2, 2, 20, 20) and np.all(small.mass >= 0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = tiny_model("performer-softmax")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_weights(weights_payload(model.config, "mlm", model.state_dict()), path)
    return path


def _read_matrix_csv(path):
    rows = list(csv.reader(path.open()))
    header, body = rows[0], rows[1:]
    return header, [r[0] for r in body], np.array([[float(x) for x in r[1:]] for r in body])


def test_analyze_writes_every_file(tmp_path, tiny_checkpoint, sample_fasta, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(sample_fasta), "--out", str(out)]
    assert main([*argv, "--max-sequences", "1", "--max-length", "30"]) == 0
    (out / "stale.txt").write_text("from an earlier run")
    capsys.readouterr()
    rc = main([*argv, "--max-sequences", "4", "--max-length", "80"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "4/4 proteins" in err
    names = {p.name for p in out.iterdir()}
    expected = {
        "logodds_best_head.csv",
        "logodds_aggregated.csv",
        "logodds_head_scores.csv",
        "mass.npy",
        "uniform_mass.npy",
        "summary.json",
        "similarity_vs_blosum62.png",
        "logodds_best_head_vs_blosum62.png",
        "logodds_best_head_vs_blosum62_clustered.png",
        "vig_soft.csv",
        "vig_exact.csv",
        "vig_soft_sums.npy",
        "vig_exact_sums.npy",
        "vig_exact_vs_blosum62.png",
        "vig_per_layer.png",
        "substitution.csv",
        "substitution_counts.npy",
        "substitution_vs_blosum62.png",
        "logodds_aggregated_vs_blosum62.png",
        "logodds_head_correlations.png",
    }
    assert expected <= names
    assert "stale.txt" not in names  # an earlier analysis is replaced as a whole
    assert out.stat().st_mode & 0o777 != 0o700  # not mkdtemp's private mode
    assert [n for n in names if n.startswith("attention_") and n.endswith(".png")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".analysis")]  # no temp dirs left
    for csv_name in ("logodds_best_head.csv", "logodds_aggregated.csv"):
        header, row_labels, matrix = _read_matrix_csv(out / csv_name)
        assert header == ["", *STANDARD_AA] and row_labels == list(STANDARD_AA)
        assert matrix.shape == (20, 20) and np.all(np.isfinite(matrix))
        np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    assert np.load(out / "mass.npy").shape == (2, 2, 20, 20)
    assert np.load(out / "uniform_mass.npy").shape == (20, 20)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("blosum62_pearson", "blosum62_spearman", "best_layer", "best_head", "rank_DE", "rank_FY"):
        assert summary[key] is not None, key
    assert summary["num_sequences"] == 4 and summary["null"] == "uniform"
    assert -1 <= summary["blosum62_pearson"] <= 1 and 1 <= summary["rank_DE"] <= 190
    assert (summary["best_layer"], summary["best_head"]) in {(l, h) for l in range(2) for h in range(2)}
    scores = list(csv.DictReader((out / "logodds_head_scores.csv").open()))
    assert len(scores) == 4
    best = next(
        r
        for r in scores
        if (int(r["layer"]), int(r["head"])) == (summary["best_layer"], summary["best_head"])
    )
    assert float(best["pearson"]) == pytest.approx(summary["blosum62_pearson"], abs=1e-5)
    from matplotlib.image import imread

    for png in [n for n in names if n.endswith(".png")]:
        img = imread(out / png)
        assert img.shape[0] > 300 and img.shape[1] > 300, png


def test_analyze_user_errors(tmp_path, tiny_checkpoint, sample_fasta, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(
        ["analyze", "--checkpoint", str(bad), "--fasta", str(sample_fasta), "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    assert "bad.pt" in capsys.readouterr().err
    rc = main(
        [
            "analyze",
            "--checkpoint",
            str(tiny_checkpoint),
            "--fasta",
            str(tmp_path / "missing.fa"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert not (tmp_path / "o").exists()
    other = tmp_path / "not_an_analysis"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    rc = main(
        ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(sample_fasta), "--out", str(other)]
    )
    assert rc == 2 and "not an earlier analyze output" in capsys.readouterr().err
    assert (other / "precious.txt").read_text() == "keep me"


def test_fallback_for_nonstandard_attention_gives_the_same_blocks(monkeypatch):
    """Models whose attention we cannot reproduce block-wise go through model.attention_maps, same result."""
    import protein_lm.analysis.attention_maps as am

    model = tiny_model("performer-relu", causal=True)
    ids, mask = padded_batch()
    chunked = assemble(model, ids, mask, max_block_elements=2 * 2 * ids.shape[1] * 6)
    monkeypatch.setattr(am, "_blockwise", lambda model: False)
    fallback = assemble(model, ids, mask, max_block_elements=2 * 2 * ids.shape[1] * 6)
    torch.testing.assert_close(chunked, fallback, rtol=1e-5, atol=1e-6)


def test_analyze_mass_and_correlation_match_a_direct_computation(tmp_path, tiny_checkpoint, sample_fasta):
    """mass.npy equals attention summed by residue type with plain loops over `model.attention_maps`
    (not the row-block path); the best head's Pearson equals numpy's on similarity.csv vs Biopython."""
    from Bio.Align import substitution_matrices

    from protein_lm.checkpoint import load_model
    from protein_lm.data.cache import ensure_cache
    from protein_lm.data.readers import TokenCache
    from protein_lm.data.tokenizer import CLS_ID, EOS_ID, TOKENS

    out = tmp_path / "analysis"
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--fasta", str(sample_fasta), "--out", str(out),
            "--max-sequences", "3", "--max-length", "40"]
    assert main(argv) == 0
    model, _ = load_model(tiny_checkpoint)
    cache = TokenCache(ensure_cache(sample_fasta))
    aa_index = {a: i for i, a in enumerate(STANDARD_AA)}
    layers, heads = model.config.depth, model.config.heads
    expected = np.zeros((layers, heads, 20, 20))
    for s in range(3):
        residues = cache.sequence(s)[:40].tolist()
        ids = torch.tensor([[CLS_ID, *residues, EOS_ID]])
        letters = [None, *[TOKENS[t] for t in residues], None]
        with torch.no_grad():
            for layer, attn in model.attention_maps(ids):
                attn = attn[0].double().numpy()  # (H, L, L)
                for i, a in enumerate(letters):
                    for j, b in enumerate(letters):
                        if i != j and a in aa_index and b in aa_index:
                            expected[layer, :, aa_index[a], aa_index[b]] += attn[:, i, j]
    np.testing.assert_allclose(np.load(out / "mass.npy"), expected, rtol=1e-4, atol=1e-7)

    summary = json.loads((out / "summary.json").read_text())
    _, _, sim = _read_matrix_csv(out / "logodds_best_head.csv")
    blosum = substitution_matrices.load("BLOSUM62")
    ref = np.array([[blosum[a][b] for b in STANDARD_AA] for a in STANDARD_AA], dtype=float)
    upper = np.triu_indices(20, k=1)
    assert summary["blosum62_pearson"] == pytest.approx(np.corrcoef(sim[upper], ref[upper])[0, 1], abs=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_row_blocks_are_the_softmax_of_an_explicit_loop(causal):
    """Exact layers' row blocks equal a float64 softmax over the allowed keys, written as a loop
    from the layer's own q and k (padded keys and, when causal, future keys excluded)."""
    model = tiny_model("exact", causal)
    ids, mask = padded_batch()
    blocks = assemble(model, ids, mask, max_block_elements=2 * 2 * ids.shape[1] * 3)
    with torch.no_grad():
        x = model.embed_tokens(ids)
        q, k, _ = model.blocks[0].attn.project(model.blocks[0].norm1(x))
    q, k = q.double(), k.double()
    b, h, length, d = q.shape
    for i in range(b):
        for head in range(h):
            for t in range(length):
                keys = [s for s in range(length) if not mask[i, s] and (not causal or s <= t)]
                want = torch.zeros(length, dtype=torch.float64)
                if keys:
                    scores = torch.stack([q[i, head, t] @ k[i, head, s] / d**0.5 for s in keys])
                    want[keys] = scores.softmax(0)
                torch.testing.assert_close(blocks[0, i, head, t].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [dict(span={"enabled": True, "max": 8, "init": 4.0}), dict(memory={"slots": 3}),
     dict(span={"enabled": True, "dynamic": True, "max": 8})],
    ids=["span", "memory", "dynamic-span"],
)
@pytest.mark.parametrize("attention", KINDS)
def test_wrapped_kinds_give_row_blocks_through_the_registry(attention, options):
    """Span and memory layers take the row-block path too: blocks equal the full maps, padded and
    future keys get 0, rows sum to 1 (at most 1 with memory slots, which take the rest)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, depth=2, heads=2, ff_dim=32, attention=attention, num_features=32, causal=True,
                      favor_backend="torch", feature_seed=0, **options)
    model = ProteinLM(cfg).eval()
    ids, mask = padded_batch()
    blocks = assemble(model, ids, mask, max_block_elements=2 * 2 * ids.shape[1] * 4)
    for layer, full in model.attention_maps(ids, mask):
        torch.testing.assert_close(blocks[layer], full.float(), rtol=1e-5, atol=1e-6)
    assert torch.all(blocks[:, 1, :, :, mask[1]] == 0)
    future = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
    assert torch.all(blocks[..., future] == 0)
    sums = blocks.sum(-1)[:, 0]  # (layers, H, L) of the unpadded protein
    assert torch.all(sums <= 1 + 1e-5)
    if "memory" not in options:
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-5, atol=1e-5)
