#!/usr/bin/env bash
# Device-side steps of the H200 recipe campaign (bench/experiments/campaigns/h200_recipes.yaml), one phase per
# device call, so the 30-minute lease is spent training rather than waiting:
#   setup    wheels, first half of the corpus, a GPU smoke run of the speedrun, analyze on CUDA
#   launch   second half of the corpus, `protein-lm prepare`, start the campaign (detached)
#   status   the campaign's last rows and GPU load (call it again within 30 s of the last call)
#   collect  curves, analysis of the best Performer and of exact attention, the weights to ship
# Corpus: the 435,059 distinct Swiss-Prot 2014 sequences, shuffled (seed 2014), as one xz stream
# split into .gpu/part_aa + .gpu/part_ab (a call carries <= 64 MiB); wheels in .whl (device README).
set -uo pipefail
phase=${1:?phase}
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=disabled PYTHONPATH=/tmp/site
CAMP=.gpu/campaign
mkdir -p /root/gd "$OUT"
case "$phase" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mv .gpu/part_aa /root/gd/ && cp .gpu/cath_s40_lt50id.fasta.gz /root/gd/
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
  timeout 240 python3 -m bench.experiments.speedrun --config configs/protein_bid_performer_softmax.yaml --minutes 0.3 \
    --eval-every 40 --ood .gpu/cath_s40_lt50id.fasta.gz --json "$OUT/smoke.json" --test-sequences 100 \
    --ood-sequences 200 --data.data_dir data/swissprot_sample.fasta.gz --model.config.depth 2 \
    --model.config.dim 128 --model.config.heads 2 --data.num_workers 2 --data.tokens_per_batch 16384 \
    --model.warmup_steps 20 2>&1 | tail -20
  time python3 -m protein_lm analyze --checkpoint checkpoints/performer-softmax-bid-swissprot2014.pt \
    --fasta data/swissprot_sample.fasta.gz --max-sequences 300 --out /root/gd/an_shipped --device cuda 2>&1 | tail -4
  cp /root/gd/an_shipped/summary.json "$OUT/analyze_shipped_sample300.json"
  ;;
launch)
  cat /root/gd/part_aa .gpu/part_ab > /root/gd/sp.fasta.xz && rm .gpu/part_ab
  sha256sum /root/gd/sp.fasta.xz
  xz -d -T8 -c /root/gd/sp.fasta.xz > /root/gd/sp.fasta || exit 1
  time python3 -m protein_lm prepare /root/gd/sp.fasta --out .gpu/cache -q || exit 1
  python3 -m bench.experiments.speedrun_campaign bench/experiments/campaigns/h200_recipes.yaml --out "$CAMP"
  sleep 75
  python3 -m bench.experiments.speedrun_campaign --out "$CAMP" --status
  for f in "$CAMP"/*.log; do echo "== $f"; tail -3 "$f"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  ;;
status)
  sleep "${2:-0}"
  python3 -m bench.experiments.speedrun_campaign --out "$CAMP" --status
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  ;;
collect)
  python3 -m bench.experiments.speedrun_campaign --out "$CAMP" --status
  python3 -m bench.experiments.speedrun --plot "$CAMP"/*.json --png "$CAMP/curves.png" > "$CAMP/table.md"; cat "$CAMP/table.md"
  best=$(python3 - <<'EOF'
import json, pathlib
runs = {p.stem: json.loads(p.read_text()) for p in pathlib.Path(".gpu/campaign").glob("*.json")}
perf = {k: v for k, v in runs.items() if k.startswith("performer")}
print(min(perf, key=lambda k: perf[k]["summary"]["final_ood_ppl"] or 1e9))
EOF
)
  echo "best performer: $best"
  mkdir -p "$CAMP/analysis"
  for run in "$best" exact; do
    ckpt=$(ls "$CAMP/${run}_run/checkpoints/last.ckpt")
    python3 -m protein_lm analyze --checkpoint "$ckpt" --fasta .gpu/cath_s40_lt50id.fasta.gz --max-sequences 1000 \
      --out "$CAMP/analysis/$run" --device cuda 2>&1 | tail -2
  done
  python3 - "$best" <<'EOF'
import sys, torch
from protein_lm.checkpoint import read_checkpoint, save_weights, weights_payload
run = sys.argv[1]
ck = read_checkpoint(f".gpu/campaign/{run}_run/checkpoints/last.ckpt")
# Parameters in bf16 (half the file; they trained in bf16-mixed), buffers such as projections in fp32.
state = {k: (v.to(torch.bfloat16) if v.is_floating_point() and ".kernel." not in k else v) for k, v in ck["state_dict"].items()}
payload = weights_payload(ck["config"], ck["objective"], state, ck["metrics"], global_step=ck["global_step"], epoch=ck["epoch"])
save_weights(payload, "/root/gd/shipped.pt")
EOF
  split -b 15000000 /root/gd/shipped.pt "$OUT/shipped.pt.part_"
  tar czf "$OUT/campaign.tgz" --exclude='*_run' "$CAMP"
  ls -la "$OUT"
  ;;
esac
