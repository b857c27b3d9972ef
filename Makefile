# The two commands a new user needs (both install what they need into .venv first):
#   make quickstart   train a small Performer on data/ -> checkpoint, metrics, similarity heatmap
#   make test         the whole test suite (CPU; GPU tests are skipped without CUDA)
PY := .venv/bin/python
RUN := runs/quickstart

.PHONY: env quickstart test gpu-test lint clean

env:
	@bash scripts/setup_env.sh

quickstart: env
	$(PY) -m protein_lm fit --config configs/quickstart.yaml
	$(PY) -m protein_lm analyze --checkpoint $(RUN)/checkpoints/last.ckpt \
	    --fasta data/swissprot_sample.fasta.gz --max-sequences 300 --out $(RUN)/analysis
	@echo
	@echo "checkpoints: $(RUN)/checkpoints/   metrics: $(RUN)/csv/version_*/metrics.csv"
	@echo "heatmap    : $(RUN)/analysis/similarity_vs_blosum62.png   summary: $(RUN)/analysis/summary.json"

test: env
	$(PY) -m pytest -q

gpu-test: env
	$(PY) -m pytest -q -m gpu

lint: env
	$(PY) -m ruff check protein_lm tests bench

clean:
	rm -rf runs .pytest_cache
