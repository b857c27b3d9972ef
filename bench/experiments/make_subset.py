"""Random subset of a prepared corpus, as FASTA, for GPU runs that must carry their data.

The GPU results in docs/results.md used a 45 M-residue subset of Swiss-Prot 2014 because a device
call carries at most 64 MiB:

    # /data/swissprot2014_goasp.fasta.gz: 516,371 entries (docs/data.md, "The benchmark corpus")
    protein-lm prepare /data/swissprot2014_goasp.fasta.gz --out /data/cache_full
    python -m bench.experiments.make_subset /data/cache_full /data/subset45M.fasta.gz --residues 45000000 --seed 2014
    protein-lm prepare /data/subset45M.fasta.gz --out .gpu/sp45m     # 124,428 sequences, 44,999,047 residues

Sequences are taken in a random order (numpy ``default_rng(seed).permutation``) until the residue
budget is reached, then written in their original order.
"""

from __future__ import annotations

import argparse
import gzip

import numpy as np

from protein_lm.data.readers import TokenCache
from protein_lm.data.tokenizer import TOKENS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="prepared token cache of the full corpus")
    p.add_argument("out", help="output FASTA(.gz)")
    p.add_argument("--residues", type=int, default=45_000_000)
    p.add_argument("--seed", type=int, default=2014)
    args = p.parse_args()
    cache = TokenCache(args.cache)
    order = np.random.default_rng(args.seed).permutation(len(cache))
    keep = np.sort(order[np.cumsum(cache.lengths[order]) <= args.residues])
    letters = np.array([ord(t) if len(t) == 1 else ord("?") for t in TOKENS], dtype=np.uint8)
    opener = gzip.open if args.out.endswith(".gz") else open
    with opener(args.out, "wb") as f:
        for i in keep:
            f.write(b">" + cache.record_id(int(i)).encode() + b"\n" + letters[cache.sequence(int(i))].tobytes() + b"\n")
    print(f"{args.out}: {len(keep):,} sequences, {int(cache.lengths[keep].sum()):,} residues")


if __name__ == "__main__":
    main()
