#!/usr/bin/env bash
# Device-side steps of the throughput work (docs/benchmarks.md, "End to end"), one phase per device call:
#   setup      wheels, the 100k-sequence Swiss-Prot 2014 subset (.gpu/sp100k.fasta.xz) -> token cache
#   attention  the attention-op table against SDPA's default backend, each backend forced and FlexAttention
#   fit        `protein-lm fit` end to end: real tokens/s and GPU load of RUNS (default: all four)
set -uo pipefail
phase=${1:?phase}
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=disabled PYTHONPATH=/tmp/site
mkdir -p "$OUT"
case "$phase" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
  if [ ! -f .gpu/cache/manifest.json ]; then
    xz -d -T8 -c .gpu/sp100k.fasta.xz > /tmp/sp100k.fasta || exit 1
    time python3 -m protein_lm prepare /tmp/sp100k.fasta --out .gpu/cache -q || exit 1
  fi
  ;;
attention)
  python3 -m bench.attention --only "${2:-sdpa,flex,ours_triton_softmax/,ours_triton_relu}" \
    --lengths 1024 8192 65536 --warmup 10 --rep 40 --out "$OUT/attention_h200.json" 2>&1 | grep -v '^{'
  ;;
fit)
  python3 -m bench.fit_throughput --cache .gpu/cache --runs ${RUNS:-exact-padded performer-padded exact-packed performer-packed} \
    --steps "${STEPS:-300}" ${PROFILE:+--profile} --out "$OUT/fit_throughput_h200.json"
  ;;
esac
