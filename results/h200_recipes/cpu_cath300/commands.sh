set -x
cd /work/main
export OMP_NUM_THREADS=2
CATH=/work/shared/data/ood_cath_s40/cath_s40_lt50id.fasta.gz
.venv/bin/python - <<'PY'
import json, torch
from protein_lm.model import ModelConfig, ProteinLM
from protein_lm.checkpoint import save_weights, weights_payload, load_model
m, _ = load_model("checkpoints/performer-softmax-bid-swissprot2014.pt")
cfg = ModelConfig.from_dict({**m.config.to_dict(), "attention": "exact"})
torch.manual_seed(77)
save_weights(weights_payload(cfg, "mlm", ProteinLM(cfg).state_dict()), "/tmp/cpuan/random_exact.pt")
PY
time .venv/bin/python -m protein_lm analyze --checkpoint checkpoints/performer-softmax-bid-swissprot2014.pt --fasta $CATH --max-sequences 300 --out /tmp/cpuan/shipped_cath300
time .venv/bin/python -m protein_lm analyze --checkpoint /tmp/cpuan/random_exact.pt --fasta $CATH --max-sequences 300 --out /tmp/cpuan/random_exact_cath300 --random-inits 1
