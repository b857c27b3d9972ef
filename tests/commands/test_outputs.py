"""Bad output paths and devices: one-line errors (exit 2), checked before long work, nothing half-written."""

from __future__ import annotations

import pytest
import torch

from protein_lm.cli import main
from protein_lm.errors import UserError
from protein_lm.outputs import write_atomically
from tests.conftest import REPO

SHIPPED = str(REPO / "checkpoints" / "performer-softmax-bid-swissprot2014.pt")


def test_write_atomically_leaves_no_partial_file_on_failure(tmp_path):
    out = tmp_path / "result.json"

    def explode(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="No space left"):
        write_atomically(out, explode, "--json")
    assert list(tmp_path.iterdir()) == []
    write_atomically(out, lambda tmp: tmp.write_text("ok"), "--json")
    assert out.read_text() == "ok" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_export_to_a_directory_is_one_line_error(tmp_path, capsys):
    target = tmp_path / "existing_dir"
    target.mkdir()
    assert main(["export", "--checkpoint", SHIPPED, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_dir"]


def test_evaluate_checks_json_path_before_scoring(tmp_path, capsys, monkeypatch, sample_fasta):
    import protein_lm.commands.evaluate as evaluate_cmd

    def must_not_run(*args, **kwargs):
        raise AssertionError("scoring started although --json cannot be written")

    monkeypatch.setattr(evaluate_cmd, "evaluate", must_not_run)
    rc = main(["evaluate", "--checkpoint", SHIPPED, "--fasta", str(sample_fasta), "--json", str(tmp_path)])
    assert rc == 2 and "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda:banana"])
def test_bad_device_is_one_line_error(device, capsys, sample_fasta):
    rc = main(["evaluate", "--checkpoint", SHIPPED, "--fasta", str(sample_fasta), "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and "--device" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_one_line_error(capsys, sample_fasta):
    rc = main(["evaluate", "--checkpoint", SHIPPED, "--fasta", str(sample_fasta), "--device", "cuda"])
    assert rc == 2 and "CUDA is not available" in capsys.readouterr().err


def test_evaluate_missing_fasta_names_the_option(tmp_path, capsys):
    rc = main(["evaluate", "--checkpoint", SHIPPED, "--fasta", str(tmp_path / "missing.fa")])
    err = capsys.readouterr().err
    assert rc == 2 and "--fasta" in err and "missing.fa" in err and "Traceback" not in err


def test_prepare_same_input_twice_names_the_file(tmp_path, capsys):
    fasta = tmp_path / "a.fa"
    fasta.write_text(">x\nMKV\n")
    rc = main(["prepare", str(fasta), str(fasta), "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "a.fa" in err and "twice" in err
    assert not (tmp_path / "cache").exists()
