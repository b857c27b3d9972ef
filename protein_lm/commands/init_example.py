"""``protein-lm init-example DIR``: a working directory with the shipped configs, sample data and model.

After ``pip install`` (not editable) the repository's ``configs/``, ``data/`` and ``checkpoints/`` are
not in your working directory; this copies them (from the install, see :mod:`protein_lm.examples`)
into ``DIR``, so that ``cd DIR && protein-lm fit --config configs/quickstart.yaml`` works as
documented.
"""

from __future__ import annotations

import argparse
import shutil


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="new (or empty) directory to create")


def run(args: argparse.Namespace) -> int:
    from protein_lm.examples import example_files, example_root
    from protein_lm.outputs import write_dir_atomically

    root = example_root()
    files = example_files(root)

    def copy(tmp) -> None:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)

    out = write_dir_atomically(args.dir, copy, "init-example")
    print(f"copied {len(files)} files from {root} into {out}; next:\n"
          f"  cd {out}\n"
          "  protein-lm fit --config configs/quickstart.yaml\n"
          "  protein-lm embed --checkpoint checkpoints/performer-softmax-bid-swissprot2014.pt "
          "--fasta data/swissprot_sample.fasta.gz --out embeddings/")
    return 0
