"""`protein-lm prepare FASTA [FASTA ...] --out DIR`: FASTA(.gz) -> token cache.

Imports only numpy, Biopython and the standard library (never torch or Lightning),
so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import os

from protein_lm.data.cache import prepare
from protein_lm.data.fasta import ON_INVALID
from protein_lm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "fasta", nargs="+", help="input FASTA files, plain or gzip (records are concatenated)"
    )
    parser.add_argument("--out", "-o", required=True, help="cache directory to write (replaced atomically)")
    parser.add_argument(
        "--on-invalid",
        choices=ON_INVALID,
        default="error",
        help="a record with an invalid character: stop with an error (default) or skip and count it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes tokenising input files in parallel, one file each (default: min(4, CPUs))",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    result = prepare(
        args.fasta,
        args.out,
        on_invalid=args.on_invalid,
        progress=not args.quiet,
        workers=args.workers,
        force=args.force,
    )
    m = result.manifest
    skipped = ", ".join(f"{k} {v:,}" for k, v in m["skipped"].items() if v) or "none"
    state = "up to date (inputs unchanged)" if result.hit else f"written in {result.seconds:.1f} s"
    print(f"token cache {result.path}: {state}")
    print(f"  sequences {m['num_sequences']:,}  residues {m['num_residues']:,}  skipped: {skipped}")
    for inp in m["inputs"]:
        print(f"  input {inp['path']} ({inp['size']:,} bytes, sha256 {inp['sha256'][:16]}...)")
    return 0
