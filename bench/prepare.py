"""Benchmark `protein-lm prepare` on the full corpus against `zcat FILE > /dev/null`.

Measures, alternating the two so that load drift on a shared machine hits both alike:

* wall time, CPU time (user+sys) and peak RSS of `python -m protein_lm prepare FILE --out
  OUT --force -q` run as a subprocess (rusage of that child via os.wait4);
* the same for `zcat FILE > /dev/null` (the floor: decompressing with gzip's own tool);
* one cache-hit run (inputs unchanged) at the end.

Targets: prepare wall <= 2x zcat wall; peak RSS < 1 GB.
Writes results/prepare.json and prints a table last.

    python -m bench.prepare --fasta CORPUS/swissprot2014_goasp.fasta.gz --out CORPUS/cache_full [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS_HELP = "the Swiss-Prot 2014 corpus, swissprot2014_goasp.fasta.gz (docs/data.md: 'The benchmark corpus')"


def run_measured(cmd: list[str] | str, shell: bool = False, env: dict | None = None) -> dict:
    """Run a command; return wall seconds, CPU seconds and peak RSS (MB) of that child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=shell, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {cmd}\n{err}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),  # Linux: KiB
    }


STAGES = """
import json, sys, time
from pathlib import Path
from protein_lm.data import fasta
path = Path(sys.argv[1])
out = {}
for name, it in (("inflate_only", lambda: fasta._Chunks(path)),
                 ("tokenize_no_write", lambda: fasta.tokenize_fasta(path)),
                 ("reference_path_no_write", lambda: fasta.read_fasta(path))):
    t, c = time.perf_counter(), time.process_time()
    for _ in it():
        pass
    out[name] = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(time.process_time() - c, 3)}
print(json.dumps(out))
"""


def stages(fasta: Path, env: dict) -> dict:
    """In-process breakdown, no writes: gzip inflate alone (reader thread), the fast path
    (inflate + block tokenisation) and the reference path (SimpleFastaParser per record)."""
    res = subprocess.run([sys.executable, "-c", STAGES, str(fasta)], env=env, capture_output=True, check=True)
    return json.loads(res.stdout)


def cache_stats(out: Path) -> dict:
    """Statistics of the written cache (to compare with the corpus's published statistics, docs/data.md)."""
    import numpy as np

    from protein_lm.data.readers import TokenCache
    from protein_lm.data.tokenizer import TOKEN_TO_ID

    c = TokenCache(out)
    lengths = c.lengths
    counts = np.bincount(np.asarray(c.tokens), minlength=33)
    return {
        "num_sequences": len(c),
        "num_residues": c.num_residues,
        "length_min": int(lengths.min()),
        "length_median": float(np.median(lengths)),
        "length_mean": round(float(lengths.mean()), 1),
        "length_max": int(lengths.max()),
        "num_length_le_1022": int((lengths <= 1022).sum()),
        "rare_residues": {a: int(counts[TOKEN_TO_ID[a]]) for a in "XBUZO"},
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "note": "shared machine (other jobs running); see loadavg",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fasta", type=Path, required=True, help=CORPUS_HELP)
    ap.add_argument("--out", type=Path, required=True, help="where the cache is written (kept for later runs)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path, default=REPO / "results" / "prepare.json")
    args = ap.parse_args()
    if not args.fasta.exists():
        raise SystemExit(f"{args.fasta}: not found (see docs/data.md: 'The benchmark corpus')")

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    prepare_cmd = [
        sys.executable, "-m", "protein_lm", "prepare", str(args.fasta),
        "--out", str(args.out), "--force", "-q", "--workers", str(args.workers),
    ]  # fmt: skip
    zcat_cmd = f"zcat {args.fasta} > /dev/null"

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"zcat": [], "prepare": []}
    for i in range(args.repeats):
        runs["zcat"].append(run_measured(zcat_cmd, shell=True))
        runs["prepare"].append(run_measured(prepare_cmd, env=env))
        print(f"round {i + 1}: zcat {runs['zcat'][-1]['wall_s']:.2f} s, prepare {runs['prepare'][-1]['wall_s']:.2f} s",
              file=sys.stderr)  # fmt: skip
    hit = run_measured([c for c in prepare_cmd if c != "--force"], env=env)
    breakdown = stages(args.fasta, env)
    load_after = os.getloadavg()

    manifest = json.loads((args.out / "manifest.json").read_text())

    def summary(rs: list[dict]) -> dict:
        walls = [r["wall_s"] for r in rs]
        return {
            "wall_s_min": min(walls),
            "wall_s_median": statistics.median(walls),
            "cpu_s_min": min(r["cpu_s"] for r in rs),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
            "runs": rs,
        }

    z, p = summary(runs["zcat"]), summary(runs["prepare"])
    ratio_min = p["wall_s_min"] / z["wall_s_min"]
    ratio_median = statistics.median(
        pr["wall_s"] / zr["wall_s"] for pr, zr in zip(runs["prepare"], runs["zcat"], strict=True)
    )
    cpu_ratio = p["cpu_s_min"] / z["cpu_s_min"]
    result = {
        "command": " ".join(["python", "-m", "bench.prepare", *sys.argv[1:]]),
        "input": {
            "path": str(args.fasta),
            "compressed_bytes": args.fasta.stat().st_size,
            "num_sequences": manifest["num_sequences"],
            "num_residues": manifest["num_residues"],
        },
        "cache": str(args.out),
        "cache_stats": cache_stats(args.out),
        "zcat": z,
        "prepare": p,
        "prepare_cache_hit": hit,
        "stages_in_process": breakdown,
        "ratio_prepare_over_zcat": {
            "of_min_walls": round(ratio_min, 3),
            "median_per_round": round(ratio_median, 3),
            "of_min_cpu": round(cpu_ratio, 3),
        },
        "targets": {"ratio_max": 2.0, "peak_rss_mb_max": 1024},
        "meets_targets": ratio_median <= 2.0 and p["peak_rss_mb_max"] < 1024,
        "machine": machine(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    mres = manifest["num_residues"] / 1e6
    print(
        f"\nprepare benchmark: {args.fasta.name} ({manifest['num_sequences']:,} sequences, {mres:,.1f} M residues)"
    )
    print(f"machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs (shared), "
          f"load {result['loadavg_before'][0]:.1f} -> {result['loadavg_after'][0]:.1f}")  # fmt: skip
    print(f"{'':22}{'wall min':>10}{'wall med':>10}{'CPU min':>10}{'peak RSS':>11}")
    for name, s in (("zcat > /dev/null", z), ("protein-lm prepare", p)):
        print(f"{name:22}{s['wall_s_min']:>9.2f}s{s['wall_s_median']:>9.2f}s{s['cpu_s_min']:>9.2f}s"
              f"{s['peak_rss_mb_max']:>8.0f} MB")  # fmt: skip
    print(
        f"{'prepare (cache hit)':22}{hit['wall_s']:>9.2f}s{'':>10}{hit['cpu_s']:>9.2f}s{hit['peak_rss_mb']:>8.0f} MB"
    )
    print(f"prepare / zcat: wall {ratio_median:.2f}x (median of rounds), {ratio_min:.2f}x (min/min), "
          f"CPU {cpu_ratio:.2f}x; "
          f"target <= 2x, RSS < 1 GB: {'met' if result['meets_targets'] else 'NOT met'}")  # fmt: skip
    b = breakdown
    print(f"in-process CPU: gzip inflate alone {b['inflate_only']['cpu_s']:.2f} s, "
          f"inflate + tokenise (no writes) {b['tokenize_no_write']['cpu_s']:.2f} s "
          f"(wall {b['tokenize_no_write']['wall_s']:.2f} s); reference path (SimpleFastaParser) "
          f"{b['reference_path_no_write']['cpu_s']:.2f} s")  # fmt: skip
    print(f"prepare throughput: {mres / p['wall_s_median']:.0f} M residues/s; results -> {args.json}")


if __name__ == "__main__":
    main()
