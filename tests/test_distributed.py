"""DDP and FSDP with 2 CPU processes (gloo) against 1 process on the same global batch.

Two ranks with data.batch_size B train on the data module's batches 2s and 2s + 1 at step s
(rank r takes every other batch); one process that accumulates 2 micro-batches of B sees the
same two batches at step s. The runs must therefore agree batch for batch — the same batches, the
same per-batch losses, the same weights — with dropout on (seeded by the micro-batch's index
among all ranks), weight decay large enough to matter (groups found by real shape under FSDP),
gradient clipping always active (over all shards under FSDP) and a projection redraw mid-run.

Runs (``protein-lm fit``, tiny model, 4 optimiser steps, no validation), each ≈ 10 s:

* ``ref``: one process, ``accumulate_grad_batches 2``, weights kept after step 2;
* ``ddp_a``: DDP, steps 1-2; ``ddp_b``: resumed from ``ddp_a``'s ``last.ckpt`` to step 4;
* ``fsdp_a``: :class:`protein_lm.distributed.BlockFSDP`, sharded checkpoints, steps 1-2;
  ``fsdp_b``: resumed from that sharded checkpoint, saving full checkpoints, to step 4.

So "resume is exact" means: the resumed steps 3-4 equal the uninterrupted reference's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from protein_lm.checkpoint import load_model, read_checkpoint
from protein_lm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
TINY = [
    "--config", "configs/debug.yaml", "--wandb", "false", "--trainer.accelerator", "cpu",
    "--model.max_steps", str(STEPS), "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--model.config.dim", "32", "--model.config.depth", "2", "--model.config.heads", "2",
    "--model.config.ff_dim", "64", "--model.config.num_features", "16", "--model.config.dropout", "0.1",
    "--model.weight_decay", "0.5", "--trainer.gradient_clip_val", "0.05", "--model.redraw_interval", "2",
    "--model.warmup_steps", "1",
    "--data.max_length", "64", "--data.batch_size", "4", "--data.max_train_sequences", "64",
    "--data.max_eval_sequences", "8", "--checkpoint.every_n_train_steps", "2",
]
FSDP = ["--config", "configs/strategy_fsdp.yaml"]


def _fit(out: Path, steps: int, *extra: str, timeout: float = 600) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK"):
        env.pop(name, None)  # a run must pick its own free port and ranks
    cmd = [sys.executable, "-m", "protein_lm", "fit", *TINY, "--output_dir", str(out), "--trainer.max_steps",
           str(steps), *extra, "--trainer.callbacks+=helpers.callbacks.RecordSteps",
           f"--trainer.callbacks.out_dir={out / 'record'}", "--trainer.callbacks.weights_at", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "record").glob("rank*.json"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    out = {name: root / name for name in ("ref", "ddp_a", "ddp_b", "fsdp_a", "fsdp_b")}
    _fit(out["ref"], STEPS, "--trainer.devices", "1", "--trainer.accumulate_grad_batches", "2")
    two = ["--trainer.devices", "2"]
    _fit(out["ddp_a"], 2, *two, "--trainer.strategy", "ddp")
    _fit(out["ddp_b"], STEPS, *two, "--trainer.strategy", "ddp", "--ckpt_path",
         str(out["ddp_a"] / "checkpoints" / "last.ckpt"))
    _fit(out["fsdp_a"], 2, *FSDP, *two, "--trainer.strategy.init_args.state_dict_type", "sharded")
    _fit(out["fsdp_b"], STEPS, *FSDP, *two, "--trainer.strategy.init_args.state_dict_type", "full",
         "--ckpt_path", str(out["fsdp_a"] / "checkpoints" / "last.ckpt"))
    return out


def _as_reference_order(records: list[dict]) -> list[dict]:
    """The two ranks' micro-batches in the order one accumulating process sees them: rank r's k-th
    batch is micro-batch 2k + r."""
    assert [r["world_size"] for r in records] == [2, 2]
    per_rank = [r["batches"] for r in records]
    assert len(per_rank[0]) == len(per_rank[1])
    return [b for pair in zip(*per_rank, strict=True) for b in pair]


def _assert_same_batches_and_losses(mine: list[dict], ref: list[dict]) -> None:
    assert [b["batch"] for b in mine] == [b["batch"] for b in ref]
    assert [b["loss"] for b in mine] == pytest.approx([b["loss"] for b in ref], rel=1e-5, abs=1e-6)


def _assert_same_weights(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(ref)
    for key, value in ref.items():
        torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-5, atol=2e-6, msg=key)


def _ref_weights(runs: dict[str, Path], step: int) -> dict[str, torch.Tensor]:
    if step == STEPS:
        return read_checkpoint(runs["ref"] / "checkpoints" / "last.ckpt")["state_dict"]
    return torch.load(runs["ref"] / "record" / f"weights_step{step}.pt", weights_only=True)


def test_reference_run_is_not_trivial(runs):
    """The comparisons below mean something: weights moved, dropout and clipping were active."""
    (ref,) = _records(runs["ref"])
    assert ref["world_size"] == 1 and len(ref["batches"]) == 2 * STEPS
    assert len({b["batch"] for b in ref["batches"]}) == 2 * STEPS
    before, after = _ref_weights(runs, 2), _ref_weights(runs, STEPS)
    assert max(float((before[k] - after[k]).abs().max()) for k in after) > 1e-3
    assert ref["groups"]["decay"] > 0 and ref["groups"]["no_decay"] > 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_on_the_same_global_batch(runs, strategy):
    (ref,) = _records(runs["ref"])
    first = _as_reference_order(_records(runs[f"{strategy}_a"]))
    _assert_same_batches_and_losses(first, ref["batches"][:4])
    # Weight-decay groups: the same parameters, however FSDP shards them (sizes summed over ranks).
    groups = [r["groups"] for r in _records(runs[f"{strategy}_a"])]
    if strategy == "ddp":
        assert groups == [ref["groups"], ref["groups"]]
    else:
        assert {k: groups[0][k] + groups[1][k] for k in groups[0]} == ref["groups"]
        assert groups[0] != ref["groups"]  # each rank holds a shard, not the whole model


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resumed_two_process_run_continues_exactly(runs, strategy):
    (ref,) = _records(runs["ref"])
    resumed = _as_reference_order(_records(runs[f"{strategy}_b"]))
    _assert_same_batches_and_losses(resumed, ref["batches"][4:])
    final = read_checkpoint(runs[f"{strategy}_b"] / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS
    _assert_same_weights(final["state_dict"], _ref_weights(runs, STEPS))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_logged_train_tokens_are_summed_over_ranks(runs, strategy):
    records = _records(runs[f"{strategy}_a"])
    per_step = [a["scored"] + b["scored"] for a, b in zip(records[0]["batches"], records[1]["batches"], strict=True)]
    assert records[0]["batches"][0]["scored"] != records[1]["batches"][0]["scored"]  # else the check is weak
    for rec in records:  # every rank holds the synced value
        assert [b["logged_tokens"] for b in rec["batches"]] == per_step
    rows = list(csv.DictReader(open(runs[f"{strategy}_a"] / "csv" / "version_0" / "metrics.csv")))
    logged = [float(r["train/tokens"]) for r in rows if r.get("train/tokens")]
    assert logged == per_step


def test_sharded_fsdp_checkpoint_is_a_directory_read_as_full_weights(runs, tmp_path):
    sharded = runs["fsdp_a"] / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2  # one shard file per rank
    assert not list(sharded.parent.glob("*.part")) and not list(sharded.parent.glob("*.old"))
    ckpt = read_checkpoint(sharded)
    assert ckpt["format"] == "lightning" and ckpt["global_step"] == 2
    _assert_same_weights(ckpt["state_dict"], _ref_weights(runs, 2))
    # DDP's step-2 checkpoint holds the same weights.
    _assert_same_weights(ckpt["state_dict"], read_checkpoint(runs["ddp_a"] / "checkpoints" / "last.ckpt")["state_dict"])
    # `export` turns it into one weights file that loads anywhere.
    from protein_lm.cli import main

    assert main(["export", "--checkpoint", str(sharded), "--out", str(tmp_path / "model.pt")]) == 0
    model, info = load_model(tmp_path / "model.pt")
    assert info["global_step"] == 2
    _assert_same_weights(model.state_dict(), _ref_weights(runs, 2))


def test_full_fsdp_checkpoint_evaluates_like_the_one_process_model(runs, tmp_path, sample_fasta):
    from protein_lm.cli import main

    full = runs["fsdp_b"] / "checkpoints" / "last.ckpt"
    assert full.is_file()  # state_dict_type full: one file, gathered on rank 0
    scores = {}
    for name, ckpt in (("fsdp", full), ("ref", runs["ref"] / "checkpoints" / "last.ckpt")):
        out = tmp_path / f"{name}.json"
        with redirect_stdout(io.StringIO()):
            assert main(["evaluate", "--checkpoint", str(ckpt), "--fasta", str(sample_fasta), "--max-sequences", "8",
                         "--json", str(out), "--quiet"]) == 0
        scores[name] = json.loads(out.read_text())
    assert scores["fsdp"]["num_tokens"] == scores["ref"]["num_tokens"] > 0
    assert scores["fsdp"]["loss"] == pytest.approx(scores["ref"]["loss"], rel=1e-5)


def test_sharded_checkpoint_without_fsdp_is_a_one_line_error(runs, capsys):
    from protein_lm.cli import main

    sharded = runs["fsdp_a"] / "checkpoints" / "last.ckpt"
    code = main(["validate", *TINY, "--output_dir", str(runs["fsdp_a"] / "validate"), "--ckpt_path", str(sharded)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("protein-lm validate: error: --ckpt_path")
    assert "sharded FSDP checkpoint" in err[-1] and "strategy_fsdp.yaml" in err[-1]


# ---------------------------------------------------------------- sharded reader, no processes


def _sharded_dir(path: Path, model_state: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model_state}, checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": 3, "hyper_parameters": {"config": {}, "objective": "mlm"}}, path / "meta.pt")
    return path


def test_sharded_reader_returns_the_saved_tensors(tmp_path):
    from protein_lm.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint

    state = {"model.embed.weight": torch.randn(5, 3), "model.head_bias": torch.arange(5.0)}
    path = _sharded_dir(tmp_path / "ckpt", state)
    assert is_sharded_checkpoint(path) and not is_sharded_checkpoint(tmp_path)
    data = read_sharded_checkpoint(path)
    assert data["global_step"] == 3 and set(data["state_dict"]) == set(state)
    for key, value in state.items():
        assert torch.equal(data["state_dict"][key], value)


def test_sharded_reader_refuses_weights_stored_as_pickled_objects(tmp_path):
    from protein_lm.sharded_checkpoint import read_sharded_checkpoint

    path = _sharded_dir(tmp_path / "ckpt", {"model.embed.weight": torch.zeros(2), "model.extra": {"any": "object"}})
    with pytest.raises(UserError, match="pickled objects, not tensors"):
        read_sharded_checkpoint(path)


def test_sharded_reader_refuses_pickled_entries_whatever_their_key(tmp_path):
    """DCP picks entries by their planner path, which the file sets: a renamed key must not slip in."""
    from protein_lm.sharded_checkpoint import read_sharded_checkpoint

    marker = tmp_path / "code_ran"
    path = _sharded_dir(tmp_path / "ckpt", {"model.embed.weight": torch.zeros(2), "evil": _RunsCode(marker)})
    meta_file = path / ".metadata"
    metadata = pickle.loads(meta_file.read_bytes())
    metadata.planner_data["evil"] = ("model", "evil")
    meta_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match="pickled objects, not tensors"):
        read_sharded_checkpoint(path)
    assert not marker.exists()


def test_a_save_killed_mid_swap_is_restored_before_resuming(tmp_path):
    from protein_lm.distributed import restore_interrupted_saves

    (tmp_path / "last.ckpt.old").mkdir()  # the previous checkpoint, moved aside; the new one never came
    (tmp_path / "last.ckpt.old" / "meta.pt").write_bytes(b"x")
    (tmp_path / "best.ckpt").mkdir()
    (tmp_path / "best.ckpt.old").mkdir()  # both present: the swap finished its move, keep the new one
    assert restore_interrupted_saves(tmp_path) == [tmp_path / "last.ckpt"]
    assert (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"x"
    assert (tmp_path / "best.ckpt.old").exists() and not (tmp_path / "last.ckpt.old").exists()


def test_incomplete_sharded_checkpoint_is_a_one_line_error(tmp_path):
    from protein_lm.sharded_checkpoint import read_sharded_checkpoint

    path = _sharded_dir(tmp_path / "ckpt", {"model.embed.weight": torch.zeros(2)})
    for shard in path.glob("*.distcp"):
        shard.unlink()
    with pytest.raises(UserError, match="incomplete .*missing"):
        read_sharded_checkpoint(path)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_sharded_reader_never_unpickles_code_from_the_metadata(tmp_path):
    from protein_lm.sharded_checkpoint import read_sharded_checkpoint

    path = _sharded_dir(tmp_path / "ckpt", {"model.embed.weight": torch.zeros(2)})
    marker = tmp_path / "code_ran"
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UserError, match="not a checkpoint's metadata"):
        read_sharded_checkpoint(path)
    assert not marker.exists()
    # Unpickled without the restriction, the same file runs the code: the test can fail.
    pickle.loads((path / ".metadata").read_bytes())
    assert marker.exists()


# ---------------------------------------------------------------- helpers, no processes


def test_weight_decay_groups_use_the_shape_a_parameter_had_before_fsdp_flattened_it():
    from protein_lm.distributed import remember_shapes
    from protein_lm.lit_module import param_groups
    from protein_lm.model import ModelConfig, ProteinLM

    model = ProteinLM(ModelConfig(dim=16, depth=1, heads=2, ff_dim=32, num_features=8))
    expected = {g["name"]: [id(p) for p in g["params"]] for g in param_groups(model, 0.1)}
    assert len(expected["decay"]) == 4  # qkv, out, fc1, fc2 weights
    remember_shapes(model)
    for param in model.parameters():  # what FSDP does to each parameter (a flat piece of it)
        param.data = param.data.reshape(-1)[: max(1, param.numel() // 2)].clone()
    flat = {g["name"]: [id(p) for p in g["params"]] for g in param_groups(model, 0.1)}
    assert flat == expected


class _Trainer:
    def __init__(self, strategy):
        self.strategy = strategy


def test_muon_and_learned_spans_are_refused_under_fsdp_only():
    from pytorch_lightning.strategies import DDPStrategy

    from protein_lm.distributed import BlockFSDP, check_supported
    from protein_lm.model import ModelConfig

    plain, span = ModelConfig(), ModelConfig(span={"enabled": True})
    with pytest.raises(UserError, match="muon needs whole weight matrices"):
        check_supported(_Trainer(BlockFSDP()), "muon", plain)
    with pytest.raises(UserError, match="span.enabled: the span penalty"):
        check_supported(_Trainer(BlockFSDP()), "adamw", span)
    check_supported(_Trainer(BlockFSDP()), "adamw", plain)
    check_supported(_Trainer(BlockFSDP()), "adamw", ModelConfig(span={"enabled": True, "dynamic": True}))
    for trainer in (_Trainer(DDPStrategy()), None):
        check_supported(trainer, "muon", span)


def test_strategy_settings_that_mean_fsdp():
    from jsonargparse import Namespace

    from protein_lm.distributed import BlockFSDP, names_fsdp

    assert names_fsdp("fsdp") and names_fsdp("fsdp_cpu_offload") and names_fsdp(BlockFSDP())
    assert names_fsdp(Namespace(class_path="protein_lm.distributed.BlockFSDP", init_args=Namespace()))
    assert names_fsdp(Namespace(class_path="pytorch_lightning.strategies.FSDPStrategy"))
    assert not names_fsdp("ddp") and not names_fsdp(None) and not names_fsdp("auto")
    assert not names_fsdp(Namespace(class_path="pytorch_lightning.strategies.DDPStrategy"))
    assert not names_fsdp(Namespace(class_path="no.such.Strategy"))


# ---------------------------------------------------------------- 2 GPUs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("strategy", ["fsdp_overlay", "lightning_fsdp"])
def test_fsdp_on_two_gpus_matches_ddp_and_its_checkpoint_loads(tmp_path, strategy):
    """FSDP on 2 GPUs (float32, so the comparison is tight) against DDP on the same 2 GPUs."""
    gpu = ["--trainer.accelerator", "gpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
           "--model.config.favor_backend", "torch"]
    runs = {"ddp": tmp_path / "ddp", strategy: tmp_path / strategy}
    _fit(runs["ddp"], STEPS, *gpu, "--trainer.strategy", "ddp")
    chosen = FSDP if strategy == "fsdp_overlay" else ["--trainer.strategy", "fsdp"]  # Lightning's own
    _fit(runs[strategy], STEPS, *chosen, *gpu)
    ddp, fsdp = (_as_reference_order(_records(runs[name])) for name in ("ddp", strategy))
    _assert_same_batches_and_losses(fsdp, ddp)
    final = read_checkpoint(runs[strategy] / "checkpoints" / "last.ckpt")
    reference = read_checkpoint(runs["ddp"] / "checkpoints" / "last.ckpt")["state_dict"]
    for key, value in reference.items():  # GPU reductions run in another order: a looser tolerance
        torch.testing.assert_close(final["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    load_model(runs[strategy] / "checkpoints" / "last.ckpt")
