"""Benchmark `protein-lm evaluate` on extreme inputs against an ordinary one, with the shipped checkpoint.

Three FASTA files, made here (random residues, fixed seed):

* ``long``: one protein of 200,000 residues (scored as 196 windows of 1,022 residues);
* ``tiny``: 300,000 records of one residue each;
* ``ordinary``: the first 500 proteins of data/swissprot_sample.fasta.gz (the reference rate).

Each is evaluated by ``python -m protein_lm evaluate --checkpoint checkpoints/performer-softmax-bid-
swissprot2014.pt --fasta FILE`` as a subprocess (the token cache prepared beforehand, outside the
timing, in a private cache root), and its wall time and tokens/s (tokens of the batches read) are
reported. Target (docs/data.md): each extreme case under 60 s on a 2-core CPU, at the rate of the
ordinary input. Writes results/evaluate_scale.json and prints a table.

    python -m bench.evaluate_scale [--threads 2] [--out results/evaluate_scale.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "performer-softmax-bid-swissprot2014.pt"
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def make_inputs(tmp: Path) -> dict[str, Path]:
    rng = random.Random(0)
    long = tmp / "long.fasta"
    long.write_text(">long\n" + "".join(rng.choice(AMINO) for _ in range(200_000)) + "\n")
    tiny = tmp / "tiny.fasta"
    tiny.write_text("".join(f">t{i}\n{AMINO[rng.randrange(20)]}\n" for i in range(300_000)))
    ordinary = tmp / "ordinary.fasta"
    with gzip.open(REPO / "data" / "swissprot_sample.fasta.gz", "rt") as fh:
        text = fh.read()
    ordinary.write_text(">" + ">".join(text.split(">")[1:501]))
    return {"long": long, "tiny": tiny, "ordinary": ordinary}


def evaluate(fasta: Path, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "protein_lm", "evaluate", "--checkpoint", str(CHECKPOINT), "--fasta", str(fasta)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"evaluate {fasta} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout)
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("evaluate:")]
    return {"wall_s": round(wall, 2), "scoring_s": result["seconds"], "num_tokens_scored": result["num_tokens"],
            "loss": result["loss"], "last_progress_line": progress[-1] if progress else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    parser.add_argument("--out", default=str(REPO / "results" / "evaluate_scale.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads),
               "PROTEIN_LM_CACHE": str(tmp / "caches")}
        inputs = make_inputs(tmp)
        for path in inputs.values():  # caches first: the timing is of the scoring
            subprocess.run([sys.executable, "-c", f"from protein_lm.data.cache import ensure_cache; "
                            f"ensure_cache({str(path)!r}, progress=False)"], env=env, check=True)
        results = {name: evaluate(path, env) for name, path in inputs.items()}
    report = {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
              "threads": args.threads, "load_average_after": os.getloadavg(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'input':<10} {'wall s':>8} {'scoring s':>10}  last progress line")
    for name, r in results.items():
        print(f"{name:<10} {r['wall_s']:>8.1f} {r['scoring_s']:>10.1f}  {r['last_progress_line']}")


if __name__ == "__main__":
    main()
