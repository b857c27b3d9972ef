"""Old module paths of the data package (``protein_lm.datamodule``, ``protein_lm.cache``, ...) keep working:
an old-style config with ``class_path: protein_lm.datamodule.ProteinDataModule`` instantiates, a
checkpoint written under that path loads in a process that imports only the new one, and users get one
DeprecationWarning per old path (the package's own modules none)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from protein_lm import _moved
from protein_lm.data import cache, datamodule, readers, sampler

REPO = Path(__file__).resolve().parents[1]


def test_every_old_path_returns_the_new_objects():
    import protein_lm.cache as old_cache
    import protein_lm.datamodule as old_dm
    from protein_lm.collate import make_batch
    from protein_lm.tokenizer import VOCAB_SIZE

    from protein_lm.data.collate import make_batch as new_make_batch
    from protein_lm.data.tokenizer import VOCAB_SIZE as NEW_VOCAB_SIZE

    assert old_dm.ProteinDataModule is datamodule.ProteinDataModule
    assert old_dm.ShardedBatchSampler is sampler.ShardedBatchSampler  # names that moved to a sibling module
    assert old_cache.TokenCache is readers.TokenCache and old_cache.prepare_cache is cache.prepare_cache
    assert make_batch is new_make_batch and VOCAB_SIZE == NEW_VOCAB_SIZE == 33
    for old, new in _moved.MOVED.items():  # every entry names importable modules
        assert sys.modules[old] is not None and all(__import__(m, fromlist=["_"]) for m in new)
    with pytest.raises(AttributeError, match="moved to protein_lm.data.datamodule"):
        _ = old_dm.no_such_name


def test_an_old_path_is_a_read_only_view(monkeypatch):
    import protein_lm.cache as old_cache

    real = cache.default_cache_root
    monkeypatch.setattr(old_cache, "default_cache_root", lambda: Path("/patched"))
    assert old_cache.default_cache_root() == Path("/patched") and cache.default_cache_root is real
    monkeypatch.undo()  # removes the stand-in's own attribute: reads go through to the new module again
    assert old_cache.default_cache_root is real is cache.default_cache_root


OLD_CONFIG = """\
trainer:
  accelerator: cpu
  max_steps: 1
  limit_val_batches: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  config: {{dim: 32, depth: 1, heads: 2, ff_dim: 64, attention: exact}}
  warmup_steps: 1
data:
  class_path: protein_lm.datamodule.ProteinDataModule
  init_args:
    data_dir: {fasta}
    max_length: 64
    batch_size: 4
    max_train_sequences: 16
    max_eval_sequences: 8
"""

# A fresh interpreter: warnings are counted from the first import on, and only the new path is imported
# before the checkpoint is loaded (Lightning resolves its `_class_path` through sys.modules alone).
LOAD = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import protein_lm.model  # uses an old path itself: no warning for the user
        internal = [str(w.message) for w in caught if w.category is DeprecationWarning]
        from protein_lm.data.datamodule import ProteinDataModule
        dm = ProteinDataModule.load_from_checkpoint(sys.argv[1])
        from protein_lm.datamodule import BatchPlan  # the same old path again: no second warning
        from protein_lm.cache import TokenCache
        from protein_lm.cache import prepare_cache
    print(json.dumps({
        "type": f"{type(dm).__module__}.{type(dm).__name__}", "max_length": dm.max_length,
        "resume": list(dm._resume), "internal": internal,
        "warnings": [(str(w.message), w.filename) for w in caught if w.category is DeprecationWarning],
    }))
""")


@pytest.mark.filterwarnings("ignore:.*LightningCLI.s args parameter")
def test_old_class_path_config_and_checkpoint(tmp_path, sample_fasta):
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.cli import LightningCLI

    from protein_lm.lit_module import ProteinLMModule

    config = tmp_path / "old.yaml"
    config.write_text(OLD_CONFIG.format(fasta=sample_fasta))
    # how such configs are used: LightningCLI with data modules chosen by class path
    cli = LightningCLI(ProteinLMModule, pl.LightningDataModule, subclass_mode_data=True, run=False,
                       save_config_callback=None, args=["--config", str(config),
                                                       "--trainer.default_root_dir", str(tmp_path)])
    assert type(cli.datamodule) is datamodule.ProteinDataModule and cli.datamodule.max_length == 64
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = tmp_path / "old.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["datamodule_hyper_parameters"]["_class_path"] == "protein_lm.datamodule.ProteinDataModule"

    proc = subprocess.run([sys.executable, "-c", LOAD, str(ckpt)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["type"] == "protein_lm.data.datamodule.ProteinDataModule" and got["max_length"] == 64
    assert got["resume"] == [saved["ProteinDataModule"]["epoch"], saved["ProteinDataModule"]["batches_done"]]
    assert got["internal"] == []
    messages = [m for m, _ in got["warnings"]]
    assert messages == [
        "protein_lm.datamodule is deprecated: import from protein_lm.data.datamodule "
        "(and name that module in configs' class_path)",
        "protein_lm.cache is deprecated: import from protein_lm.data.cache (and name that module in configs' "
        "class_path)",
    ], got["warnings"]
    # each points at the code that used the old path: Lightning's loader, then this script
    assert got["warnings"][0][1].endswith("saving.py") and got["warnings"][1][1] == "<string>"
